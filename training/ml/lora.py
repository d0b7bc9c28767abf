"""LoRA fine-tuning of a local causal LM: our own loop, built for CPU speed and resumability.

Django-free on purpose (see `training/ml/__init__.py`). The loop reads top to bottom: encode the
chat examples, attach LoRA (PEFT), evaluate the base model, train with checkpoints, evaluate,
save the adapter and a merged model. It takes a progress callback and a stop callback; a build step
joins them to its database row.

Why not `transformers.Trainer`: on a 2-core CPU the seed recipe (Trainer, batches of 4 padded
examples) processed 130 real tokens/s in fp32 and 181 in bf16. This loop differs where it pays:

* Batches are length-bucketed up to a token budget (`batch_tokens`), so there is little padding.
* The output layer runs only at the response positions. For SmolLM2 the 49,152-word output
  projection is a fifth of the forward pass per token, and prompts are usually most of a pair.
* bf16 autocast with fp32 master weights where the CPU multiplies bf16 in hardware (AMX or
  AVX512-BF16): 152 against 65 GFLOP/s for matrix products on our reference machine. The frozen
  block weights are stored in bf16 once rather than cast on every pass (bitwise the same).
* Memory is bounded by splitting a step into micro-batches before resorting to gradient
  checkpointing, which would redo a third of the work (see `_memory_plan`).

Checkpoints (`<work_dir>/checkpoints/step-NNNNNN`, the last two kept, each written to a temporary
folder and renamed into place) hold the trained weights (safetensors: the LoRA matrices, or every
weight of a full fine-tune, a tied output layer once under its embedding's name), the optimizer
and scheduler state and the torch RNG (`optimizer.pt`, read back with `weights_only=True`), and
the step, epoch position, history, python and numpy RNG states in `state.json`. A run started on a work_dir that
has one continues from it. Batch order is a pure function of (seed, epoch), so the only state a
resume needs is what the checkpoint holds; on the same machine and thread count a resumed run ends
with bitwise the same adapter as an unbroken one (tested on the CPU; also seen on an H200). A
different machine or thread count may sum in another order, so across machines "the same" means
within float rounding. A step whose gradients are not finite is skipped, not applied (see
`_train_step`).

Finished runs leave, in one rename each:

    <work_dir>/adapter/   PEFT adapter: adapter_config.json + adapter_model.safetensors
    <work_dir>/merged/    fp32 safetensors model with the adapter merged in, tokenizer, chat
                          template, licence: what `gguf_convert.convert_hf_to_gguf` reads

With `LoraSettings.full_finetune` every weight trains instead (no adapter): `merged/` is then the
trained model itself and there is no `adapter/`.

Logit distillation (`Distillation`): a teacher with the student's tokenizer scores the training
examples once, before the first step; the log-probabilities (at the run's temperature) of its top
k tokens at the response positions are cached in `<work_dir>/teacher-topk.safetensors` (a resumed
run reads them back, the teacher is not run again), and the training loss mixes the KL divergence
from the teacher's softened distribution with the usual cross-entropy on the gold response (see
`distillation_loss_sum`). Caching the top k rather than the whole distribution keeps it small:
SmolLM2's 49,152 logits per token would be 192 KB; 64 of them with their ids are 512 bytes. The
teacher's mass outside its top k is not dropped but kept as one "rest" bucket, which matters at
T=4: softened that much, a real teacher puts a good share of its mass outside any 64 tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import time
import types
import typing
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.ml.base_models import LICENCE_NAMES, load_causal_lm
from training.ml.rag import PRECISIONS
from training.ml.rag import resolve_precision as _cpu_precision

__all__ = [
    "Distillation",
    "Encoded",
    "Example",
    "LoraResult",
    "LoraSettings",
    "TrainPoint",
    "TrainingStopped",
    "default_settings",
    "distillation_loss_sum",
    "encode",
    "length_buckets",
    "teacher_topk",
    "train_lora",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
KEEP_CHECKPOINTS = 2
MAX_BAD_STEPS = 10  # consecutive steps with non-finite gradients before the run is declared diverged
IGNORE_INDEX = -100  # the label of a token that is not learned (PyTorch's cross-entropy convention)
TEACHER_CACHE = "teacher-topk.safetensors"  # in the work_dir of a distillation run
TEACHER_CACHE_FORMAT = "2"  # 2: true log-probabilities at the temperature (1: raw logits)


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16  # LoRA rank r; 8-16 is plenty for teaching a small model a domain's answers
    alpha: int = 32  # scaling alpha / r = 2; kept plain (no rsLoRA) because llama.cpp scales by alpha / r
    dropout: float = 0.05  # on the LoRA input only; the base model's own dropouts are 0 for Llama
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )  # every linear layer of a Llama block; the MLP layers hold most of what the model knows
    learning_rate: float = 2e-4  # the common LoRA rate; full fine-tuning would want 10x less
    epochs: float = 2.0  # passes over the training set; fractions allowed
    max_steps: int | None = None  # caps the steps (tests, quick builds)
    batch_tokens: int = 4096  # tokens per optimizer step, padding included (length-bucketed batches)
    max_length: int = 512  # longer examples are truncated, the prompt side first, keeping the response
    warmup_ratio: float = 0.05  # share of the steps over which the learning rate rises from 0
    weight_decay: float = 0.0  # LoRA matrices are small and start at zero (B); decay only slows them
    checkpoint_every: int = 25  # steps; a resumed run repeats at most this many
    eval_every: int | None = None  # steps; None = four times per run (plus before and at the end)
    seed: int = 0  # LoRA initialisation, dropout and batch order
    precision: str = "auto"  # "auto" = bf16 autocast where the CPU (or GPU) supports it, else fp32
    gradient_checkpointing: bool | None = None  # None = only when one example's activations do not fit
    max_grad_norm: float = 1.0  # gradient clipping; guards the first steps on a fresh adapter
    # Train every weight instead of an adapter (rank, alpha, dropout and target_modules are then
    # unused). It wants a learning rate about 10x lower than LoRA's (2e-5 rather than 2e-4), which
    # is not applied automatically, and AdamW keeps two fp32 moments per weight: 16 bytes per
    # parameter with the gradients, besides the activations.
    full_finetune: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.rank >= 1, "rank must be at least 1."),
            (self.alpha > 0, "alpha must be positive."),
            (0.0 <= self.dropout < 1.0, "dropout must be at least 0 and below 1."),
            (len(self.target_modules) > 0, "target_modules must name at least one module."),
            (self.learning_rate > 0, "learning_rate must be positive."),
            (self.epochs > 0, "epochs must be positive."),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be at least 1 (or None)."),
            (self.batch_tokens >= 1, "batch_tokens must be at least 1."),
            (self.max_length >= 8, "max_length must be at least 8."),
            (0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be at least 0 and below 1."),
            (self.weight_decay >= 0, "weight_decay must be at least 0."),
            (self.checkpoint_every >= 1, "checkpoint_every must be at least 1."),
            (self.eval_every is None or self.eval_every >= 1, "eval_every must be at least 1 (or None)."),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}."),
            (self.max_grad_norm > 0, "max_grad_norm must be positive."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if isinstance(self.target_modules, str | list):  # "q_proj" would iterate as letters
            object.__setattr__(self, "target_modules", _as_tuple(self.target_modules))

    def with_overrides(self, overrides: Mapping[str, str]) -> LoraSettings:
        """A copy with fields set from strings, as given on a command line (`--set lora.epochs=1`).

        Keys may carry the "lora." prefix. Values are parsed by the field's type: "none" clears an
        optional field, booleans accept true/false/yes/no/on/off/1/0, tuples are comma-separated.
        An unknown key raises ValueError naming the known ones.
        """
        hints = typing.get_type_hints(type(self))
        known = [f.name for f in dataclasses.fields(self)]
        changes: dict[str, Any] = {}
        for raw_key, raw_value in overrides.items():
            key = raw_key.strip().removeprefix("lora.")
            if key not in known:
                raise ValueError(f"Unknown LoRA setting {raw_key!r}; known settings: {', '.join(known)}.")
            try:
                changes[key] = _parse_value(hints[key], _as_text(raw_value))
            except ValueError as exc:
                raise ValueError(f"lora.{key}: {exc}") from None
        return dataclasses.replace(self, **changes)


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _as_tuple(value: str | Sequence[str]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    return tuple(item.strip() for item in items if item.strip())


def _as_text(value: Any) -> str:
    """Overrides arrive as strings from a command line, but JSON step parameters may hold values."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    return str(value).strip()


def _parse_value(hint: Any, text: str) -> Any:
    """`text` as a value of the annotated type (the few types LoraSettings uses)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options:
        if text.lower() in ("none", "null", ""):
            return None
        options = tuple(option for option in options if option is not type(None))
    (kind,) = options
    if typing.get_origin(kind) is tuple:
        return _as_tuple(text)
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"{text!r} is not a boolean (true/false).")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            number = float(text)  # "1e3" and "100.0" are whole numbers too
            if not number.is_integer():
                raise ValueError(f"{text!r} is not a whole number.") from None
            return int(number)
    if kind is float:
        return float(text)
    return text


# Settings fields added after CHECKPOINT_FORMAT 1, with their defaults: a field at its default is
# left out of the run fingerprint, so the checkpoints of runs started before it existed resume.
_LATER_FIELDS: dict[str, Any] = {"full_finetune": False}


@dataclass(frozen=True)
class Distillation:
    """Logit distillation from a teacher that shares the student's tokenizer.

    The loss per response token is alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE,
    with both distributions softened by the temperature T (see `distillation_loss_sum`).
    """

    teacher_dir: Path  # a local safetensors model folder, loadable with base_models.load_causal_lm
    temperature: float = 4.0  # softens both distributions so the teacher's runner-up tokens teach too
    alpha: float = 0.5  # weight of the distillation term; the gold response gets 1 - alpha
    top_k: int = 64  # teacher tokens cached per position; the rest of its mass is one bucket

    def __post_init__(self) -> None:
        checks = [
            (self.temperature > 0, "temperature must be positive."),
            (0.0 <= self.alpha <= 1.0, "alpha must be between 0 and 1."),
            (self.top_k >= 1, "top_k must be at least 1."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        object.__setattr__(self, "teacher_dir", Path(self.teacher_dir))


# Tokens the default settings may process in one run (epochs x training tokens). Two cores with
# AMX trained a SmolLM2-135M-shaped model at about 220 tokens/s with bf16 (180 with fp32), so this
# keeps a default LoRA build near 75 minutes there; an H200 did 12,000-57,000 tokens/s.
TOKEN_BUDGET = 1_000_000


def default_settings(*, train_examples: int, train_tokens: int) -> LoraSettings:
    """Settings a team without ML experience can start from, scaled to the training set.

    The rule, in order:

    * epochs: 5 below 100 examples, 3 below 1,000, 2 below 10,000, else 1. A tiny set needs several
      passes before answers stick; a large one overfits (and costs) with more.
    * epochs shrink further so that epochs x train_tokens stays within TOKEN_BUDGET, which bounds
      the run's length on a CPU whatever the data size (the step count follows: about
      TOKEN_BUDGET / batch_tokens at most).
    * batch_tokens: about a tenth of the training tokens, rounded down to a power of two and kept
      within 1,024..4,096, so even a tiny set gets ten or so optimizer steps per epoch.
    * max_length: 1,024 when the average example is longer than 256 tokens, else 512.
    * checkpoints every 25 steps, or about ten per run when that is fewer steps.
    """
    if train_examples < 1 or train_tokens < 1:
        raise ValueError("default_settings needs at least one training example and token.")
    if train_examples < 100:
        epochs = 5.0
    elif train_examples < 1_000:
        epochs = 3.0
    elif train_examples < 10_000:
        epochs = 2.0
    else:
        epochs = 1.0
    epochs = min(epochs, max(0.01, round(TOKEN_BUDGET / train_tokens, 2)))
    batch_tokens = 1 << max(10, min(12, int(math.log2(max(1, train_tokens // 10)))))
    average = train_tokens / train_examples
    steps = max(1, math.ceil(epochs * train_tokens / batch_tokens))
    return LoraSettings(
        epochs=epochs,
        batch_tokens=batch_tokens,
        max_length=1024 if average > 256 else 512,
        checkpoint_every=max(1, min(25, steps // 10)),
    )


# --------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, str]]  # chat messages; the LAST one is the assistant response to learn
    # Or plain text (no chat): every token is learned. Healing a pruned model uses document text.
    text: str = ""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX everywhere except the response tokens (and its end-of-turn token)

    @property
    def response_tokens(self) -> int:
        # Position 0 predicts nothing (no token before it), so a label there is never learned.
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def encode(tokenizer: Any, examples: Sequence[Example], *, max_length: int) -> list[Encoded]:
    """Tokenize chat examples with the model's chat template; only the response is labelled.

    The prompt is rendered with the generation prompt ("<|im_start|>assistant\\n" in ChatML) and
    must be a prefix of the full rendering, which holds for ChatML-style templates; a template that
    rewrites earlier turns (e.g. strips reasoning) is refused rather than mislabelled. Prompt and
    response are tokenized separately and joined, so the prompt tokens are exactly the ones the
    model sees at inference. The response keeps its end-of-turn token (the model must learn to
    stop); anything the template writes after it (ChatML's newline) is dropped.

    Over max_length, the prompt loses tokens from its start (the question sits at its end); a
    response that alone does not fit keeps its start and at least a quarter of the window goes to
    the prompt. A truncated response loses its end-of-turn token: it did not end there.
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2.")
    special = set(tokenizer.all_special_ids)
    if any(example.text for example in examples):
        # Plain-text examples (every token learned) may sit among chats; each keeps its place.
        chats = iter(encode(tokenizer, [e for e in examples if not e.text], max_length=max_length))
        texts = iter(tokenizer([e.text for e in examples if e.text], add_special_tokens=False)["input_ids"])
        mixed = []
        for example in examples:
            if not example.text:
                mixed.append(next(chats))
                continue
            ids = list(next(texts))[:max_length]
            if len(ids) >= 2:
                mixed.append(Encoded(input_ids=ids, labels=[IGNORE_INDEX] + ids[1:]))
        return mixed
    prompts: list[str] = []
    responses: list[str] = []
    for number, example in enumerate(examples):
        messages = list(example.messages)
        if len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise ValueError(
                f"Example {number} must end with an assistant message after at least one other message."
            )
        prompt = _render(tokenizer, messages[:-1], add_generation_prompt=True)
        full = _render(tokenizer, messages, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError(
                "The chat template renders the conversation without the prompt as its prefix, so the "
                "response tokens cannot be located (a ChatML-style template is needed)."
            )
        prompts.append(prompt)
        responses.append(full[len(prompt) :])
    if not prompts:
        return []
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]

    encoded = []
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        ends = [i for i, token in enumerate(response) if token in special]
        if ends:
            response = response[: ends[-1] + 1]
        if len(prompt) + len(response) > max_length:
            keep_prompt = max(max_length - len(response), min(len(prompt), max_length // 4))
            prompt = prompt[len(prompt) - keep_prompt :]
            response = response[: max_length - len(prompt)]
        labels = [IGNORE_INDEX] * len(prompt) + list(response)
        if labels:
            labels[0] = IGNORE_INDEX
        encoded.append(Encoded(input_ids=list(prompt) + list(response), labels=labels))
    return encoded


def _render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except ValueError as exc:  # transformers: no chat template set
        raise ValueError(f"The model's tokenizer cannot render chats: {exc}") from exc


def length_buckets(
    encoded: Sequence[Encoded], *, batch_tokens: int, seed: int, epoch: int
) -> list[list[int]]:
    """Batches of indices into `encoded`: similar lengths together, order fixed by (seed, epoch).

    Examples are sorted by length (equal lengths in a seeded random order, so batches differ
    between epochs) and cut into consecutive runs whose padded size, rows x longest row, stays
    within batch_tokens; an example longer than that forms a batch alone. The batches are then
    shuffled. Every index appears exactly once, and the batch count depends only on the lengths,
    so every epoch has the same number of steps.
    """
    rng = random.Random(f"lora-buckets:{seed}:{epoch}")  # str seeds hash deterministically
    order = list(range(len(encoded)))
    rng.shuffle(order)
    order.sort(key=lambda i: len(encoded[i].input_ids))  # stable: ties keep the shuffled order
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        length = len(encoded[index].input_ids)  # sorted, so the longest row so far
        if current and (len(current) + 1) * length > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class TrainPoint:
    step: int
    total_steps: int
    epoch: float  # steps done / steps per epoch
    train_loss: float | None  # this step's loss: mean over its response tokens
    eval_loss: float | None  # set on the steps where the eval set was scored
    tokens: int  # response+prompt tokens processed so far (real, not padding)
    tokens_per_second: float  # real tokens per second of training in this session
    seconds: float  # training time so far, over all sessions of the run
    eta_seconds: float | None
    # Distillation runs: this step's KD term, T^2 x KL per response token before the alpha weight
    # (train_loss = alpha x distill_loss + (1 - alpha) x cross-entropy). Defaults to None so the
    # history in checkpoints written before it existed still loads.
    distill_loss: float | None = None


@dataclass(frozen=True)
class LoraResult:
    # PEFT adapter (adapter_config.json + adapter_model.safetensors); None after a full fine-tune
    adapter_dir: Path | None
    merged_dir: Path  # merged fp32 safetensors model + tokenizer files (+ chat template)
    steps: int
    tokens: int
    tokens_per_second: float  # over the whole run's training time
    train_loss: float | None  # mean step loss over the last epoch's worth of steps
    eval_loss: float | None
    base_eval_loss: float | None  # eval loss of the base model before training, same examples
    history: list[TrainPoint]
    resumed_from: int | None  # step of the checkpoint it resumed from


class CheckpointMismatch(ValueError):
    """A checkpoint written by a run with other data, model or settings: never resumed from."""


class TrainingStopped(Exception):
    """should_stop() said stop; the last checkpoint was written first."""

    def __init__(self, step: int | None = None, checkpoint: Path | None = None) -> None:
        where = f" at step {step}" if step is not None else ""
        kept = f"; checkpoint {checkpoint.name} was written" if checkpoint is not None else ""
        super().__init__(f"Training stopped{where}{kept}.")
        self.step = step
        self.checkpoint = checkpoint


# --------------------------------------------------------------------------------------------
# Device, precision, memory


def _resolve_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_precision(precision: str, device: str) -> str:
    """Like rag.resolve_precision on a CPU; on a GPU "auto" means bf16 where the GPU has it."""
    import torch

    if precision == "auto" and device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return _cpu_precision(precision, device.split(":")[0])


def _cpu_threads() -> int:
    # The affinity mask, not os.cpu_count(): a container or taskset may allow fewer cores.
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _memory_bytes(device: str) -> int:
    """Memory this process may use on `device`: the GPU's, or RAM capped by a cgroup limit."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            total = min(total, int(Path(limit_file).read_text().strip()))
    return total


# Share of memory the activations of one micro-batch may take. Total, not free, memory: the plan
# must come out the same when a run resumes, or the micro-batches would sum in another order.
ACTIVATION_SHARE = 0.25


@dataclass(frozen=True)
class _MemoryPlan:
    micro_tokens: int  # padded tokens per forward/backward pass; a step's batch is split to fit
    gradient_checkpointing: bool
    bytes_per_token: int  # estimated activation bytes kept for backward, per token


def _memory_plan(
    config: Any, settings: LoraSettings, *, precision: str, memory: int, distilling: bool = False
) -> _MemoryPlan:
    """How to keep one step's activations within ACTIVATION_SHARE of memory.

    Per token, a Llama block with LoRA on every linear layer keeps about 14 x hidden +
    7 x intermediate values for backward (norm inputs and outputs, q/k/v/o, the attention output,
    MLP gate/up/product, the LoRA dropout copies), charged at 3 bytes (bf16 and fp32 copies mix)
    or 4; attention is flash-style, so nothing per token pair. The output layer adds vocab x 12
    bytes (bf16 logits, their fp32 copy, the gradient), charged to every token although it runs
    on response tokens only. For SmolLM2-135M with bf16 that is 2.3 MB per token; peak memory
    measured 1.6 MB more per extra token of a pass. On a 24 GiB machine the defaults give passes
    of up to 2,767 tokens, and a 20-step run on SmolLM2 peaked at 9.9 GB resident in all (model,
    tokenizer, allocator slack and the merge at the end included).

    First the step is split into micro-batches (gradient accumulation: the same result, no extra
    work). Gradient checkpointing, which recomputes every block's forward pass in backward (about
    a third more work), is switched on only when not even one max_length example fits; then a
    token keeps each block's input (4 x hidden bytes per layer) plus one live block.

    Distillation computes a second, softened log-softmax over the vocabulary at the response
    positions and its gradient: charged as another vocab x 12 bytes (estimated, not measured).
    """
    element = max(3, 2 if precision == "bfloat16" else 4)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    intermediate = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    layers = int(getattr(config, "num_hidden_layers", 0) or 1)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    block = (14 * hidden + 7 * intermediate) * element
    head = vocab * (24 if distilling else 12)
    per_token = layers * block + head
    budget = int(memory * ACTIVATION_SHARE)
    fits = budget // max(1, per_token)
    checkpointing = settings.gradient_checkpointing
    if checkpointing is None:
        checkpointing = fits < settings.max_length
    if checkpointing:
        per_token = layers * hidden * 4 + block + head
        fits = budget // max(1, per_token)
    return _MemoryPlan(
        # Never below one max_length row: a row cannot be split, and going lower gains nothing.
        micro_tokens=max(settings.max_length, min(settings.batch_tokens, fits)),
        gradient_checkpointing=bool(checkpointing),
        bytes_per_token=per_token,
    )


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Progress:
    """What a checkpoint carries besides tensors."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0  # training time over all sessions
    base_eval_loss: float | None = None
    base_evaluated: bool = False
    history: list[TrainPoint] = dataclasses.field(default_factory=list)


def train_lora(
    model_dir: Path,
    train: Sequence[Example],
    eval: Sequence[Example],
    work_dir: Path,
    settings: LoraSettings,
    *,
    on_point: Callable[[TrainPoint], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str | None = None,
    distill: Distillation | None = None,
    on_teacher: Callable[[int, int], None] | None = None,
    on_resume: Callable[[int], None] | None = None,
) -> LoraResult:
    """Train a LoRA adapter on `train`, resuming from `work_dir`'s last checkpoint if it has one
    (`on_resume(step)` is told at once, before any training).

    `on_point` is called after every step (keep it cheap; it runs on the training thread).
    `should_stop` is asked before every step and between eval batches; when it says stop, a
    checkpoint of the current step is written and TrainingStopped raised, so a later call with the
    same arguments continues where this one stopped. A checkpoint written for other data, another
    model or other settings raises ValueError instead of being mixed in.

    `device` None means the GPU when torch sees one, else the CPU; on the CPU torch uses one thread
    per core this process may run on (restored afterwards). `eval` may be empty: then there are
    no eval losses.

    `distill` adds logit distillation from its teacher (which must share the student's tokenizer,
    else ValueError); the teacher runs once over `train` before the first step, reporting
    `on_teacher(examples done, examples)` and asking `should_stop` between its batches, unless
    `work_dir` already holds its logits. `settings.full_finetune` trains every weight instead
    of an adapter; the result's adapter_dir is then None.
    """
    import torch

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = _resolve_device(device)
    precision = _resolve_precision(settings.precision, device)
    threads_before = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(_cpu_threads())
    try:
        run = _Run(
            Path(model_dir),
            train,
            eval,
            work_dir,
            settings,
            device=device,
            precision=precision,
            distill=distill,
        )
        return run.execute(
            on_point=on_point,
            should_stop=should_stop or (lambda: False),
            on_teacher=on_teacher,
            on_resume=on_resume,
        )
    finally:
        torch.set_num_threads(threads_before)


class _Run:
    def __init__(
        self,
        model_dir: Path,
        train: Sequence[Example],
        eval_examples: Sequence[Example],
        work_dir: Path,
        settings: LoraSettings,
        *,
        device: str,
        precision: str,
        distill: Distillation | None = None,
    ) -> None:
        import torch

        self.model_dir, self.work_dir, self.settings = model_dir, work_dir, settings
        self.device, self.precision = device, precision
        self.checkpoints = work_dir / "checkpoints"
        self.distill = distill
        # Per training example, the teacher's (top-k ids, log-probabilities at T) at its response positions;
        # filled by _load_teacher before the first step.
        self.teacher: list[tuple[Any, Any]] | None = None
        self.last_distill_loss: float | None = None  # the last step's KD term, for its TrainPoint
        self._distill_sum = 0.0

        model, self.tokenizer = load_causal_lm(model_dir)
        # Positions past the model's context were never trained; cut there rather than extrapolate.
        context = getattr(model.config, "max_position_embeddings", None) or settings.max_length
        max_length = min(settings.max_length, int(context))
        self.train_set = encode(self.tokenizer, train, max_length=max_length)
        self.eval_set = encode(self.tokenizer, eval_examples, max_length=max_length)
        if not any(e.response_tokens for e in self.train_set):
            raise ValueError("There is nothing to train on: no example has response tokens.")
        self.pad_id = next(
            (i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if i is not None), 0
        )
        self.steps_per_epoch = len(
            length_buckets(self.train_set, batch_tokens=settings.batch_tokens, seed=0, epoch=0)
        )
        self.total_steps = max(1, math.ceil(settings.epochs * self.steps_per_epoch))
        if settings.max_steps is not None:
            self.total_steps = min(self.total_steps, settings.max_steps)
        self.eval_every = settings.eval_every or max(1, self.total_steps // 4)
        self.memory = _memory_plan(
            model.config,
            settings,
            precision=precision,
            memory=_memory_bytes(device),
            distilling=distill is not None,
        )
        # Checked before any training: a teacher with another tokenizer is refused up front.
        self.teacher_fingerprint, self.teacher_vocab = (
            _check_teacher(distill.teacher_dir, self.tokenizer, model.config) if distill else ("", 0)
        )
        self.fingerprint = self._fingerprint(model.config)

        # Everything random from here on (LoRA init, dropout) follows the seed; a resume
        # overwrites the weights and the generator state from the checkpoint.
        _seed_all(settings.seed)
        self.model = self._prepare_full(model) if settings.full_finetune else self._attach_lora(model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        warmup = math.ceil(settings.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _lr_factor(step, warmup=warmup, total=self.total_steps)
        )
        self.uses_head_shortcut = _plain_lm_head(model.config)
        self._batches: list[list[int]] = []
        self._batches_epoch = -1
        self.bad_steps = 0  # consecutive steps skipped for non-finite gradients

    # -- setup ------------------------------------------------------------------------------

    def _attach_lora(self, model: Any) -> Any:
        from peft import LoraConfig, get_peft_model

        settings = self.settings
        config = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(settings.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        model.config.use_cache = False
        peft_model = get_peft_model(model, config)
        if self.precision == "bfloat16":
            _prepare_for_autocast(peft_model)
        if self.memory.gradient_checkpointing:
            _enable_checkpointing(peft_model.get_base_model())
        return peft_model.to(self.device)

    def _prepare_full(self, model: Any) -> Any:
        """The plain model with every weight trainable (full fine-tuning). The weights stay fp32
        under bf16 autocast: they are the master copy the optimizer updates, so unlike LoRA's
        frozen weights they cannot be stored in bf16 once (`_prepare_for_autocast`)."""
        model.config.use_cache = False
        for param in model.parameters():
            param.requires_grad_(True)
        if self.memory.gradient_checkpointing:
            _enable_checkpointing(model)
        return model.to(self.device)

    def _base_model(self) -> Any:
        """The transformers model the forward pass runs: under the PEFT wrapper, or the model itself."""
        return self.model if self.settings.full_finetune else self.model.get_base_model()

    def _fingerprint(self, config: Any) -> str:
        """What a checkpoint must match to be resumed: the data, the model and the settings that
        shape the trajectory (not how often it checkpoints or evaluates)."""
        digest = hashlib.sha256()
        unrelated = {"checkpoint_every", "eval_every", "gradient_checkpointing"}
        chosen = {k: v for k, v in dataclasses.asdict(self.settings).items() if k not in unrelated}
        for name, default in _LATER_FIELDS.items():
            if chosen.get(name) == default:
                del chosen[name]
        digest.update(json.dumps(chosen, sort_keys=True, default=list).encode())
        if self.distill is not None:
            # The teacher's files (by name, size and time) and how its logits are used; a run
            # without distillation adds nothing here, so its fingerprint is what it always was.
            recipe = {
                "temperature": self.distill.temperature,
                "alpha": self.distill.alpha,
                "top_k": self.distill.top_k,
                "teacher": self.teacher_fingerprint,
            }
            digest.update(b"distill:" + json.dumps(recipe, sort_keys=True).encode())
        digest.update(config.to_json_string(use_diff=False).encode())
        for dataset in (self.train_set, self.eval_set):
            for item in dataset:
                digest.update(np.asarray(item.input_ids, dtype=np.int64).tobytes())
                digest.update(np.asarray(item.labels, dtype=np.int64).tobytes())
            digest.update(b"|")
        return digest.hexdigest()

    # -- main -------------------------------------------------------------------------------

    def execute(
        self,
        *,
        on_point: Callable[[TrainPoint], None] | None,
        should_stop: Callable[[], bool],
        on_teacher: Callable[[int, int], None] | None = None,
        on_resume: Callable[[int], None] | None = None,
    ) -> LoraResult:
        progress = _Progress()
        resumed_from = None
        loaded = self._resume()
        if loaded is not None:
            progress = loaded
            resumed_from = progress.step
            if on_resume is not None:
                on_resume(progress.step)
        if self.distill is not None and progress.step < self.total_steps:
            # A stop while the teacher runs leaves self.teacher None; the checkpoint is written
            # outside the handler, so the TrainingStopped raised then has no chained context.
            with contextlib.suppress(TrainingStopped):
                self.teacher = self._load_teacher(should_stop, on_teacher)
            if self.teacher is None:
                self._stop(progress)
        if not progress.base_evaluated:
            loss = self._evaluate(should_stop)
            if loss is _STOPPED:
                self._stop(progress)
            progress.base_eval_loss, progress.base_evaluated = loss, True

        session_start = time.perf_counter()
        session_train_seconds, session_tokens, session_steps = 0.0, 0, 0
        last_eval = None
        while progress.step < self.total_steps:
            if should_stop():
                self._stop(progress)
            epoch, position = divmod(progress.step, self.steps_per_epoch)
            batch = self._epoch_batches(epoch)[position]
            started = time.perf_counter()
            loss, tokens = self._train_step(batch)
            elapsed = time.perf_counter() - started
            progress.step += 1
            progress.tokens += tokens
            progress.seconds += elapsed
            session_train_seconds += elapsed
            session_tokens += tokens
            session_steps += 1

            stopped = False
            eval_loss = None
            if progress.step % self.eval_every == 0 or progress.step == self.total_steps:
                measured = self._evaluate(should_stop)
                stopped = measured is _STOPPED
                eval_loss = None if stopped else measured
                last_eval = eval_loss
            per_step = (time.perf_counter() - session_start) / session_steps
            point = TrainPoint(
                step=progress.step,
                total_steps=self.total_steps,
                epoch=progress.step / self.steps_per_epoch,
                train_loss=loss,
                eval_loss=eval_loss,
                tokens=progress.tokens,
                tokens_per_second=session_tokens / session_train_seconds if session_train_seconds else 0.0,
                seconds=progress.seconds,
                eta_seconds=per_step * (self.total_steps - progress.step),
                distill_loss=self.last_distill_loss,
            )
            progress.history.append(point)
            if stopped:  # during the evaluation: the step itself is done and goes in the checkpoint
                self._stop(progress)
            if progress.step % self.settings.checkpoint_every == 0 or progress.step == self.total_steps:
                self._save_checkpoint(progress)
            if on_point is not None:
                on_point(point)

        if last_eval is None and progress.history:
            # Resumed at the very end: the final evaluation is in the history, unless a stop
            # interrupted it.
            final = progress.history[-1]
            last_eval = final.eval_loss
            if last_eval is None:
                measured = self._evaluate(should_stop)
                if measured is _STOPPED:
                    self._stop(progress)
                last_eval = measured
                progress.history[-1] = dataclasses.replace(final, eval_loss=measured)
        adapter_dir, merged_dir = self._export()
        recent = [p.train_loss for p in progress.history[-self.steps_per_epoch :] if p.train_loss is not None]
        return LoraResult(
            adapter_dir=adapter_dir,
            merged_dir=merged_dir,
            steps=progress.step,
            tokens=progress.tokens,
            tokens_per_second=progress.tokens / progress.seconds if progress.seconds else 0.0,
            train_loss=sum(recent) / len(recent) if recent else None,
            eval_loss=last_eval,
            base_eval_loss=progress.base_eval_loss,
            history=list(progress.history),
            resumed_from=resumed_from,
        )

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._batches_epoch != epoch:
            self._batches = length_buckets(
                self.train_set, batch_tokens=self.settings.batch_tokens, seed=self.settings.seed, epoch=epoch
            )
            self._batches_epoch = epoch
        return self._batches

    def _stop(self, progress: _Progress) -> typing.NoReturn:
        path = self._save_checkpoint(progress)
        raise TrainingStopped(progress.step, path)

    # -- teacher ----------------------------------------------------------------------------

    def _load_teacher(
        self, should_stop: Callable[[], bool], on_progress: Callable[[int, int], None] | None
    ) -> list[tuple[Any, Any]]:
        """The teacher's top-k log-probabilities for every training example: from the cache in
        work_dir when it was computed for this teacher, top_k, temperature and data, else by
        running the teacher once (and caching the result, so a resumed run does not run it
        again)."""
        import torch

        assert self.distill is not None
        cache = self.work_dir / TEACHER_CACHE
        digest = hashlib.sha256()
        key = {
            "format": TEACHER_CACHE_FORMAT,
            "teacher": self.teacher_fingerprint,
            "top_k": self.distill.top_k,
            "temperature": self.distill.temperature,
            "vocab": self.teacher_vocab,
            "precision": self.precision,  # bf16 autocast rounds the teacher's logits
        }
        digest.update(json.dumps(key, sort_keys=True).encode())
        for item in self.train_set:
            digest.update(np.asarray(item.input_ids, dtype=np.int64).tobytes())
            digest.update(np.asarray(item.labels, dtype=np.int64).tobytes())
        fingerprint = digest.hexdigest()
        cached = _read_teacher_cache(cache, fingerprint, len(self.train_set))
        if cached is not None:
            logger.info("Teacher logits read from %s.", cache)
            return cached

        started = time.perf_counter()
        teacher, _ = load_causal_lm(self.distill.teacher_dir)
        try:
            teacher.to(self.device)
            rows = teacher_topk(
                teacher,
                self.train_set,
                top_k=self.distill.top_k,
                temperature=self.distill.temperature,
                # No gradients and no activations kept: the training pass's budget is ample.
                batch_tokens=self.memory.micro_tokens,
                vocab_size=self.teacher_vocab,
                precision=self.precision,
                should_stop=should_stop,
                on_progress=on_progress,
            )
        finally:
            del teacher  # the student trains without it beside
            gc.collect()
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        _write_teacher_cache(cache, fingerprint, rows)
        logger.info(
            "Teacher scored %d examples in %.1f s; logits cached in %s.",
            len(rows),
            time.perf_counter() - started,
            cache,
        )
        return rows

    def _teacher_rows(self, indices: Sequence[int]) -> dict[str, Any]:
        """The teacher's top-k ids and log-probabilities for a batch of training examples, their rows in the
        order `_loss_sum` selects the student's positions: example by example in `indices`' order,
        each example's response positions in order (the mask's row-major order)."""
        import torch

        assert self.teacher is not None
        ids = torch.cat([self.teacher[i][0] for i in indices])
        log_probs = torch.cat([self.teacher[i][1] for i in indices])
        return {"teacher_ids": ids.to(self.device), "teacher_log_probs": log_probs.to(self.device)}

    # -- compute ----------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        if self.precision != "bfloat16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)

    def _collate(self, indices: Sequence[int], data: Sequence[Encoded]) -> dict[str, Any]:
        """Right-padded tensors. Positions count from 0 in every row; with right padding and a
        causal mask no real token ever looks at a pad, and the mask keeps pads out of attention."""
        batch = _padded([data[i] for i in indices], self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _loss_sum(self, batch: dict[str, Any]) -> Any:
        """Summed loss over the batch's response tokens (fp32): cross-entropy, or with teacher rows
        in the batch (training steps of a distillation run) the distillation loss."""
        import torch.nn.functional as F

        base = self._base_model()
        targets = batch["labels"][:, 1:]
        selected = targets != IGNORE_INDEX
        if self.uses_head_shortcut:
            # The output layer only where a response token is predicted, not at every position.
            hidden = base.get_decoder()(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                use_cache=False,
            ).last_hidden_state
            logits = base.get_output_embeddings()(hidden[:, :-1][selected])
        else:
            logits = base(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                use_cache=False,
            ).logits[:, :-1][selected]
        if "teacher_ids" not in batch:
            return F.cross_entropy(logits.float(), targets[selected], reduction="sum")
        assert self.distill is not None
        loss, kd = _distillation_terms(
            logits,
            targets[selected],
            batch["teacher_ids"],
            batch["teacher_log_probs"],
            temperature=self.distill.temperature,
            alpha=self.distill.alpha,
        )
        if kd is not None:
            self._distill_sum += float(kd.detach())
        return loss

    def _micro_batches(self, indices: list[int]) -> list[list[int]]:
        """Consecutive rows of a (length-sorted) batch, each within the memory plan's tokens."""
        parts: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for index in sorted(indices, key=lambda i: len(self.train_set[i].input_ids)):
            length = len(self.train_set[index].input_ids)
            if current and (len(current) + 1) * max(longest, length) > self.memory.micro_tokens:
                parts.append(current)
                current, longest = [], 0
            current.append(index)
            longest = max(longest, length)
        if current:
            parts.append(current)
        return parts

    def _train_step(self, indices: list[int]) -> tuple[float | None, int]:
        import torch

        self.model.train()
        responses = sum(self.train_set[i].response_tokens for i in indices)
        tokens = sum(len(self.train_set[i].input_ids) for i in indices)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        self._distill_sum = 0.0
        for part in self._micro_batches(indices):
            batch = self._collate(part, self.train_set)
            if self.teacher is not None:
                # Built for the same examples in the same order as the batch (micro-batches
                # included), so teacher row j is the student's j-th selected position.
                batch |= self._teacher_rows(part)
            with self._autocast():
                loss_sum = self._loss_sum(batch)
            # Divided by the whole step's response tokens: the mean over real response tokens of
            # the step, however it was split into micro-batches.
            (loss_sum / max(1, responses)).backward()
            total += float(loss_sum.detach())
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        loss = total / max(1, responses)
        distilling = self.teacher is not None and self.distill is not None and self.distill.alpha > 0
        kd = self._distill_sum / max(1, responses)
        self.last_distill_loss = kd if distilling and math.isfinite(kd) else None
        if torch.isfinite(norm):
            self.optimizer.step()
            self.bad_steps = 0
        else:
            # One overflowing batch must not turn the adapter into NaN for good (AMP's grad scaler
            # skips such steps the same way). The schedule moves on, so step numbers stay aligned.
            self.bad_steps += 1
            logger.warning("Step skipped: the gradients are not finite (loss %s).", loss)
            if self.bad_steps >= MAX_BAD_STEPS:
                raise FloatingPointError(
                    f"Training diverged: {MAX_BAD_STEPS} steps in a row had non-finite gradients. "
                    "Try a lower learning_rate or precision=float32."
                )
        self.scheduler.step()
        return (loss if math.isfinite(loss) else None), tokens

    def _evaluate(self, should_stop: Callable[[], bool]) -> Any:
        """Mean loss per response token over the eval set; None without one; _STOPPED on stop.

        Always plain cross-entropy on the gold responses, also when training distils (its batches
        carry no teacher rows): the eval loss then means the same in every run and compares a
        distilled model with a LoRA one and with its base. The teacher never sees the eval set."""
        import torch

        if not any(e.response_tokens for e in self.eval_set):
            return None
        self.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            buckets = length_buckets(self.eval_set, batch_tokens=self.settings.batch_tokens, seed=0, epoch=0)
            for indices in buckets:
                if should_stop():
                    return _STOPPED
                batch = self._collate(indices, self.eval_set)
                with self._autocast():
                    total += float(self._loss_sum(batch))
                count += sum(self.eval_set[i].response_tokens for i in indices)
        if not math.isfinite(total):
            logger.warning("The eval loss is not finite.")
            return None  # callers store it as JSON, which has no NaN
        return total / count

    # -- checkpoints ------------------------------------------------------------------------

    def _save_checkpoint(self, progress: _Progress) -> Path:
        import torch
        from safetensors.torch import save_file

        final = self.checkpoints / f"step-{progress.step:06d}"
        if final.is_dir():  # already written at this step (a stop right after a periodic save)
            return final
        state = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "step": progress.step,
            "total_steps": self.total_steps,
            "epoch": progress.step // self.steps_per_epoch,
            "batch_in_epoch": progress.step % self.steps_per_epoch,
            "tokens": progress.tokens,
            "seconds": progress.seconds,
            "base_eval_loss": progress.base_eval_loss,
            "base_evaluated": progress.base_evaluated,
            "history": [dataclasses.asdict(point) for point in progress.history],
            "python_rng": _python_rng_state(),
            "numpy_rng": _numpy_rng_state(),
            "settings": dataclasses.asdict(self.settings),
        }
        tensors = {
            name: param.detach().to("cpu").contiguous()
            for name, param in self.model.named_parameters()
            if param.requires_grad
        }
        with atomic_dir(final) as tmp:
            save_file(tensors, str(tmp / "trainable.safetensors"))
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
                tmp / "optimizer.pt",
            )
            (tmp / "state.json").write_text(json.dumps(state))
        for old in _checkpoint_dirs(self.checkpoints)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _resume(self) -> _Progress | None:
        """The newest checkpoint that reads back whole, or None to start from step 0.

        Checkpoints are written atomically, so a kill during a write leaves the previous one; but a
        checkpoint can still go bad afterwards (a full disk that truncated a file, a disk error).
        Such a one is moved aside (kept for inspection, never read again) and the one before it is
        used: a few steps lost rather than the whole run."""
        for path in reversed(_latest_checkpoints(self.checkpoints)):
            try:
                return self._load_checkpoint(path)
            except CheckpointMismatch:
                raise
            except Exception as exc:  # unreadable in any way: torch, safetensors, json, missing keys
                aside = path.with_name(f".unreadable-{path.name}-{uuid.uuid4().hex[:6]}")
                logger.warning("Checkpoint %s is unreadable (%s); moved to %s.", path, exc, aside.name)
                os.rename(path, aside)
        return None

    def _load_checkpoint(self, path: Path) -> _Progress:
        import torch
        from safetensors.torch import load_file

        # Everything is read before anything is applied: a file that fails to read leaves the
        # model, optimizer and random state as they were, so an older checkpoint can be tried.
        state = json.loads((path / "state.json").read_text())
        if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != self.fingerprint:
            raise CheckpointMismatch(
                f"The checkpoint in {path} belongs to a run with other data, model or settings; "
                "remove the checkpoints folder or use a new work folder to start over."
            )
        tensors = load_file(str(path / "trainable.safetensors"))
        blob = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True)
        named = dict(self.model.named_parameters())
        missing = sorted(set(tensors) - set(named))
        if missing:
            raise KeyError(f"the checkpoint holds weights this model lacks: {missing[:3]}")
        history = [TrainPoint(**point) for point in state["history"]]
        python_rng, numpy_rng = _tuples(state["python_rng"]), _numpy_state_from_json(state["numpy_rng"])
        with torch.no_grad():
            for name, value in tensors.items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"].cpu())
        if blob["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in blob["cuda_rng"]])
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        return _Progress(
            step=state["step"],
            tokens=state["tokens"],
            seconds=state["seconds"],
            base_eval_loss=state["base_eval_loss"],
            base_evaluated=state["base_evaluated"],
            history=history,
        )

    # -- export -----------------------------------------------------------------------------

    def _export(self) -> tuple[Path | None, Path]:
        """Adapter as PEFT saves it; merged weights from a fresh fp32 copy of the base model (not
        the training copy, which may have been moved or cast), each renamed into place. A full
        fine-tune has no adapter: its training copy is the model, saved in fp32."""
        import torch
        from peft import PeftModel

        adapter_dir = self.work_dir / "adapter"
        merged_dir = self.work_dir / "merged"
        if self.settings.full_finetune:
            model = self.model
            self.model = self.optimizer = self.scheduler = self.params = None  # AdamW moments: 2x the model
            gc.collect()
            # The weights are fp32 masters already (bf16 only inside autocast); the cast is a no-op
            # then, and guards a model that was loaded otherwise.
            model = model.to("cpu", dtype=torch.float32)
            model.config.use_cache = True
            with atomic_dir(merged_dir) as tmp:
                model.save_pretrained(str(tmp), safe_serialization=True)
                self.tokenizer.save_pretrained(str(tmp))
                copy_licence(
                    self.model_dir,
                    tmp,
                    title="full fine-tune",
                    summary="with every weight fine-tuned by SLM Studio (fp32)",
                )
            return None, merged_dir
        with atomic_dir(adapter_dir) as tmp:
            self.model.save_pretrained(str(tmp), safe_serialization=True)
        self.model = self.optimizer = self.scheduler = self.params = None  # free memory for the copy
        gc.collect()

        base, tokenizer = load_causal_lm(self.model_dir)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.config.use_cache = True
        with atomic_dir(merged_dir) as tmp:
            merged.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            copy_licence(self.model_dir, tmp)
        return adapter_dir, merged_dir


_STOPPED = object()


def _lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay towards 0 at `total`. Step s is the
    (0-based) optimizer step about to run, so the first step already learns."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _prepare_for_autocast(peft_model: Any) -> None:
    """Store the frozen linear weights of the decoder blocks in bf16 once, instead of letting
    autocast cast them again on every forward pass (it caches casts only of weights that require
    grad). The products are bitwise the same, since autocast would round them to bf16 anyway;
    memory and per-pass work drop. Embeddings, norms and a tied output layer stay fp32 (they are
    not cast by autocast, or are shared with something that is not). And PEFT would cast each
    LoRA input up to its fp32 weights' dtype for autocast to cast it down again: switched off."""
    import torch

    base = peft_model.get_base_model()
    keep = {id(p) for p in base.get_input_embeddings().parameters()}
    head = base.get_output_embeddings()
    if head is not None:
        keep |= {id(p) for p in head.parameters()}
    for module in base.get_decoder().modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
        if isinstance(module, torch.nn.Linear):
            for param in module.parameters(recurse=False):
                if not param.requires_grad and id(param) not in keep and param.dtype == torch.float32:
                    param.data = param.data.to(torch.bfloat16)


def _enable_checkpointing(model: Any) -> None:
    """Gradient checkpointing on a transformers model. Non-reentrant: recomputes with the saved RNG
    state (same dropout masks) and needs no gradient on the inputs. transformers 5 renamed the
    switch; the old name warns."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _padded(rows: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-padded CPU tensors of `rows`: input_ids, labels (IGNORE_INDEX on pads), attention_mask,
    position_ids counting from 0 in every row."""
    import torch

    width = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[r, :n] = torch.tensor(row.input_ids)
        labels[r, :n] = torch.tensor(row.labels)
        mask[r, :n] = 1
    positions = torch.arange(width).expand(len(rows), width)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "position_ids": positions}


def _plain_lm_head(config: Any) -> bool:
    """Whether logits are just the output layer applied to the decoder's last hidden state
    (Llama, Mistral, Qwen2), so it may run on the response positions alone."""
    scaled = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
    return not any(getattr(config, name, None) not in (None, 1, 1.0) for name in scaled)


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _python_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _tuples(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _numpy_rng_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_json(state: list[Any]) -> tuple[Any, ...]:
    name, keys, pos, has_gauss, cached = state
    return (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)


# --------------------------------------------------------------------------------------------
# Distillation


def distillation_loss_sum(
    student_logits: Any,
    targets: Any,
    teacher_ids: Any,
    teacher_log_probs: Any,
    *,
    temperature: float,
    alpha: float,
) -> Any:
    """Summed distillation loss over N positions (an fp32 scalar tensor).

    student_logits [N, V] are the student's logits at the positions that predict a response token,
    targets [N] the gold tokens there (rows whose target is IGNORE_INDEX count for nothing),
    teacher_ids [N, k] the teacher's top-k token ids and teacher_log_probs [N, k] their
    log-probabilities under the teacher's softmax(logits / T) over its whole vocabulary (what
    `teacher_topk` returns). Per position:

        alpha * T^2 * KL(p || q) + (1 - alpha) * CE(student, target)

    q is the student's softmax(logits / T). The KL is taken over k + 1 outcomes: the teacher's k
    tokens, and "any other token", which has the teacher's remaining mass r = 1 - sum(p_k) and the
    student's mass outside those k tokens. That is the exact KL between the two distributions seen
    at that resolution (a lower bound of the full KL, zero when the student matches the teacher),
    and with k = V it is the full KL. Renormalising p over its k tokens instead would ask the
    student to put all its softened mass on k tokens, which at T=4 means far too peaked logits.
    T^2 keeps the gradient's size independent of T (softening divides it by about T^2; Hinton et
    al., 2015). alpha = 0 is exactly the summed cross-entropy.
    """
    loss, _ = _distillation_terms(
        student_logits, targets, teacher_ids, teacher_log_probs, temperature=temperature, alpha=alpha
    )
    return loss


def _distillation_terms(
    student_logits: Any,
    targets: Any,
    teacher_ids: Any,
    teacher_log_probs: Any,
    *,
    temperature: float,
    alpha: float,
) -> tuple[Any, Any]:
    """(summed loss, summed T^2 x KL term or None when alpha is 0); see distillation_loss_sum."""
    import torch
    import torch.nn.functional as F

    if teacher_ids.shape != teacher_log_probs.shape or teacher_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"The teacher's rows {tuple(teacher_ids.shape)}/{tuple(teacher_log_probs.shape)} do not match "
            f"the student's positions {tuple(student_logits.shape)}."
        )
    logits = student_logits.float()
    if alpha == 0:
        return F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE_INDEX), None
    t = float(temperature)
    ids = teacher_ids.long()
    log_q_all = F.log_softmax(logits / t, dim=-1)
    log_q = log_q_all.gather(-1, ids)
    log_p = teacher_log_probs.float()
    per_position = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    if ids.shape[-1] < logits.shape[-1]:
        # The rest bucket. The student's rest is a log-sum-exp over the tokens outside the k (not
        # log(1 - sum q_k), which loses everything to rounding when q_k sum to nearly 1).
        rest_p = (1.0 - log_p.exp().sum(dim=-1)).clamp(min=0.0)
        log_rest_q = torch.logsumexp(log_q_all.scatter(-1, ids, float("-inf")), dim=-1)
        per_position = per_position + torch.xlogy(rest_p, rest_p) - rest_p * log_rest_q
    # where, not a boolean index: no device sync, and an ignored row's values never enter.
    kd = (t * t) * torch.where(targets != IGNORE_INDEX, per_position, 0.0).sum()
    if alpha == 1:
        return kd, kd
    ce = F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE_INDEX)
    return alpha * kd + (1 - alpha) * ce, kd


def teacher_topk(
    teacher: Any,
    encoded: Sequence[Encoded],
    *,
    top_k: int,
    temperature: float = 1.0,
    batch_tokens: int = 4096,
    vocab_size: int | None = None,
    precision: str = "float32",
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[tuple[Any, Any]]:
    """The teacher's top-k tokens at the positions the student learns, for every example.

    For example i, (ids, log_probs) are CPU tensors [n_i, k] (int32, float32; most likely first):
    the k most likely tokens and their log-probabilities under softmax(logits / temperature) over
    the whole (shared) vocabulary, so 1 - sum(exp(log_probs)) is the mass of every other token.
    There is one row per position p with labels[p + 1] != IGNORE_INDEX in increasing p: the rows
    `_Run._loss_sum` selects, n_i = encoded[i].response_tokens. k = min(top_k, vocabulary).
    `vocab_size` limits the ids to those below it (the rows the student's output layer shares).
    The teacher runs on its own device, without gradients, in eval mode, under bf16 autocast when
    precision is "bfloat16". `should_stop` is asked between batches (TrainingStopped when it says
    stop); `on_progress(examples done, examples)` follows each batch.
    """
    import torch

    teacher.eval()
    device = next(teacher.parameters()).device
    head = teacher.get_output_embeddings()
    rows_out = int(head.weight.shape[0]) if head is not None else int(teacher.config.vocab_size)
    vocab = min(vocab_size or rows_out, rows_out)
    k = min(top_k, vocab)
    plain = head is not None and _plain_lm_head(teacher.config)
    # The output layer runs on at most this many positions at a time: about 256 MB of fp32 logits.
    chunk = max(64, (256 << 20) // (4 * vocab))
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bfloat16"
        else contextlib.nullcontext()
    )
    results: list[tuple[Any, Any] | None] = [None] * len(encoded)
    done = 0
    # Length-bucketed like training, so there is little padding; the order does not matter.
    with torch.no_grad(), autocast:
        for indices in length_buckets(encoded, batch_tokens=batch_tokens, seed=0, epoch=0):
            if should_stop is not None and should_stop():
                raise TrainingStopped()
            # Pads are masked and sit after every real token (right padding, causal attention),
            # so their id changes nothing.
            rows = _padded([encoded[i] for i in indices], 0)
            batch = {name: tensor.to(device) for name, tensor in rows.items()}
            selected = batch["labels"][:, 1:] != IGNORE_INDEX
            inputs = {
                "input_ids": batch["input_ids"],
                "attention_mask": batch["attention_mask"],
                "position_ids": batch["position_ids"],
                "use_cache": False,
            }
            if plain:
                hidden = teacher.get_decoder()(**inputs).last_hidden_state[:, :-1][selected]
                parts = [
                    _top_log_probs(head(piece)[:, :vocab], k, temperature) for piece in hidden.split(chunk)
                ]
            else:
                logits = teacher(**inputs).logits[:, :-1][selected]
                parts = [_top_log_probs(piece[:, :vocab], k, temperature) for piece in logits.split(chunk)]
            values = torch.cat([part[1] for part in parts]).cpu()
            ids = torch.cat([part[0] for part in parts]).to(torch.int32).cpu()
            counts = selected.sum(dim=1).tolist()
            # The mask's row-major order: rows in batch order, each row's positions in order.
            for index, row_ids, row_values in zip(
                indices, ids.split(counts), values.split(counts), strict=True
            ):
                results[index] = (row_ids.clone(), row_values.clone())
            done += len(indices)
            if on_progress is not None:
                on_progress(done, len(encoded))
    return typing.cast(list[tuple[Any, Any]], results)


def _top_log_probs(logits: Any, k: int, temperature: float) -> tuple[Any, Any]:
    """(ids, log-probabilities) of the k most likely tokens under softmax(logits / temperature)."""
    import torch

    scaled = logits.float() / float(temperature)
    top = scaled.topk(k, dim=-1)
    return top.indices, top.values - torch.logsumexp(scaled, dim=-1, keepdim=True)


def _check_teacher(teacher_dir: Path, tokenizer: Any, config: Any) -> tuple[str, int]:
    """(fingerprint of the teacher's files, vocabulary rows teacher and student share), after
    making sure the teacher reads and writes the student's tokens: logit distillation compares the
    two distributions token by token, which means nothing across vocabularies."""
    from transformers import AutoConfig, AutoTokenizer

    from training.ml.base_models import ModelUnavailable, refuse_pickles

    teacher_dir = Path(teacher_dir)
    if not teacher_dir.is_dir():
        raise ModelUnavailable(f"The teacher model folder {teacher_dir} does not exist.")
    refuse_pickles(teacher_dir)
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir), local_files_only=True)
        teacher_config = AutoConfig.from_pretrained(
            str(teacher_dir), local_files_only=True, trust_remote_code=False
        )
    except OSError as exc:
        raise ModelUnavailable(f"Cannot load the teacher in {teacher_dir.name}: {exc}") from exc
    vocab = tokenizer.get_vocab()
    if teacher_tokenizer.get_vocab() != vocab:
        raise ValueError(
            "logit distillation needs a teacher with the student's tokenizer; use sequence-level "
            f"distillation (the teacher {teacher_dir.name} has another vocabulary)."
        )
    needed = max(vocab.values()) + 1
    student_rows = int(getattr(config, "vocab_size", 0) or needed)
    teacher_rows = int(getattr(teacher_config, "vocab_size", 0) or needed)
    if teacher_rows < needed:
        raise ValueError(
            f"The teacher {teacher_dir.name} has {teacher_rows} output rows for a vocabulary of "
            f"{needed} tokens; logit distillation needs a teacher that scores every token."
        )
    # Rows past the tokenizer's tokens (padding for fast kernels) are never the gold token; only
    # those both models have can be compared.
    return _folder_fingerprint(teacher_dir), min(student_rows, teacher_rows)


def _folder_fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of a folder's files: cheap, and changes when the model
    in it is replaced (hashing gigabytes of weights on every start would not be)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            stat = path.stat()
            digest.update(f"{relative.as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _write_teacher_cache(path: Path, fingerprint: str, rows: Sequence[tuple[Any, Any]]) -> None:
    """All examples' rows in two flat tensors plus offsets, written beside and renamed into place."""
    import torch
    from safetensors.torch import save_file

    counts = [len(ids) for ids, _ in rows]
    offsets = torch.tensor([0, *np.cumsum(counts).tolist()], dtype=torch.int64)
    tensors = {
        "ids": torch.cat([ids for ids, _ in rows]).contiguous(),
        "log_probs": torch.cat([values for _, values in rows]).contiguous(),
        "offsets": offsets,
    }
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint, "format": TEACHER_CACHE_FORMAT})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_teacher_cache(path: Path, fingerprint: str, examples: int) -> list[tuple[Any, Any]] | None:
    """The cached rows per example, or None when there is no cache for this fingerprint."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("fingerprint") != fingerprint or metadata.get("format") != TEACHER_CACHE_FORMAT:
            return None
        tensors = load_file(str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # unreadable: compute again
        logger.warning("Ignoring the teacher cache %s: %s", path, exc)
        return None
    offsets = tensors["offsets"].tolist()
    if len(offsets) != examples + 1:
        return None
    ids, log_probs = tensors["ids"], tensors["log_probs"]
    return [(ids[a:b], log_probs[a:b]) for a, b in itertools.pairwise(offsets)]


# --------------------------------------------------------------------------------------------
# Files


_CHECKPOINT_NAME = re.compile(r"^step-(\d{6,})$")


def _checkpoint_dirs(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders start with a dot and never match)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def _latest_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first, after removing leftovers of a write killed half-way."""
    if folder.is_dir():
        for leftover in folder.glob(".step-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return _checkpoint_dirs(folder)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it replaces `final` by renames.

    A reader sees the old folder or the new one, never a half-written one. Replacing takes two
    renames (old out of the way, new in), so a crash in between leaves no `final`, which every
    reader here treats as "not written yet".
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        old = final.parent / f".{final.name}.old-{tag}"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_licence(
    model_dir: Path,
    out_dir: Path,
    *,
    title: str = "LoRA (merged)",
    summary: str = "with a LoRA adapter trained by SLM Studio merged into its weights (fp32)",
) -> None:
    """A merged model is a derivative of the base model: it carries the base model's licence.
    `title` and `summary` say in the model card what was done to it."""
    for item in sorted(model_dir.iterdir()):
        if item.is_file() and LICENCE_NAMES.match(item.name):
            shutil.copy2(item, out_dir / item.name)
    card = model_dir / "README.md"
    front = ""
    if card.is_file():
        match = re.match(r"^---\s*\n.*?\n---\s*\n", card.read_text(errors="replace"), re.DOTALL)
        front = match.group(0) + "\n" if match else ""
    (out_dir / "README.md").write_text(
        f"{front}# {model_dir.name} + {title}\n\n`{model_dir.name}` {summary}.\n"
    )
