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
folder and renamed into place) hold the LoRA weights (safetensors), the optimizer and scheduler
state and the torch RNG (`optimizer.pt`, read back with `weights_only=True`), and the step, epoch
position, history, python and numpy RNG states in `state.json`. A run started on a work_dir that
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
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
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
    "Encoded",
    "Example",
    "LoraResult",
    "LoraSettings",
    "TrainPoint",
    "TrainingStopped",
    "default_settings",
    "encode",
    "length_buckets",
    "train_lora",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
KEEP_CHECKPOINTS = 2
MAX_BAD_STEPS = 10  # consecutive steps with non-finite gradients before the run is declared diverged
IGNORE_INDEX = -100  # the label of a token that is not learned (PyTorch's cross-entropy convention)


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


@dataclass(frozen=True)
class LoraResult:
    adapter_dir: Path  # PEFT adapter (adapter_config.json + adapter_model.safetensors)
    merged_dir: Path  # merged fp32 safetensors model + tokenizer files (+ chat template)
    steps: int
    tokens: int
    tokens_per_second: float  # over the whole run's training time
    train_loss: float | None  # mean step loss over the last epoch's worth of steps
    eval_loss: float | None
    base_eval_loss: float | None  # eval loss of the base model before training, same examples
    history: list[TrainPoint]
    resumed_from: int | None  # step of the checkpoint it resumed from


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


def _memory_plan(config: Any, settings: LoraSettings, *, precision: str, memory: int) -> _MemoryPlan:
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
    """
    element = max(3, 2 if precision == "bfloat16" else 4)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    intermediate = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    layers = int(getattr(config, "num_hidden_layers", 0) or 1)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    block = (14 * hidden + 7 * intermediate) * element
    per_token = layers * block + vocab * 12
    budget = int(memory * ACTIVATION_SHARE)
    fits = budget // max(1, per_token)
    checkpointing = settings.gradient_checkpointing
    if checkpointing is None:
        checkpointing = fits < settings.max_length
    if checkpointing:
        per_token = layers * hidden * 4 + block + vocab * 12
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
) -> LoraResult:
    """Train a LoRA adapter on `train`, resuming from `work_dir`'s last checkpoint if it has one.

    `on_point` is called after every step (keep it cheap; it runs on the training thread).
    `should_stop` is asked before every step and between eval batches; when it says stop, a
    checkpoint of the current step is written and TrainingStopped raised, so a later call with the
    same arguments continues where this one stopped. A checkpoint written for other data, another
    model or other settings raises ValueError instead of being mixed in.

    `device` None means the GPU when torch sees one, else the CPU; on the CPU torch uses one thread
    per core this process may run on (restored afterwards). `eval` may be empty: then there are
    no eval losses.
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
        run = _Run(Path(model_dir), train, eval, work_dir, settings, device=device, precision=precision)
        return run.execute(on_point=on_point, should_stop=should_stop or (lambda: False))
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
    ) -> None:
        import torch

        self.model_dir, self.work_dir, self.settings = model_dir, work_dir, settings
        self.device, self.precision = device, precision
        self.checkpoints = work_dir / "checkpoints"

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
        self.memory = _memory_plan(model.config, settings, precision=precision, memory=_memory_bytes(device))
        self.fingerprint = self._fingerprint(model.config)

        # Everything random from here on (LoRA init, dropout) follows the seed; a resume
        # overwrites the weights and the generator state from the checkpoint.
        _seed_all(settings.seed)
        self.model = self._attach_lora(model)
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
            base = peft_model.get_base_model()
            # Non-reentrant: recomputes with the saved RNG state (same dropout masks) and needs no
            # gradient on the inputs. transformers 5 renamed the switch; the old name warns.
            if hasattr(base, "activation_checkpointing_enable"):
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return peft_model.to(self.device)

    def _fingerprint(self, config: Any) -> str:
        """What a checkpoint must match to be resumed: the data, the model and the settings that
        shape the trajectory (not how often it checkpoints or evaluates)."""
        digest = hashlib.sha256()
        unrelated = {"checkpoint_every", "eval_every", "gradient_checkpointing"}
        chosen = {k: v for k, v in dataclasses.asdict(self.settings).items() if k not in unrelated}
        digest.update(json.dumps(chosen, sort_keys=True, default=list).encode())
        digest.update(config.to_json_string(use_diff=False).encode())
        for dataset in (self.train_set, self.eval_set):
            for item in dataset:
                digest.update(np.asarray(item.input_ids, dtype=np.int64).tobytes())
                digest.update(np.asarray(item.labels, dtype=np.int64).tobytes())
            digest.update(b"|")
        return digest.hexdigest()

    # -- main -------------------------------------------------------------------------------

    def execute(
        self, *, on_point: Callable[[TrainPoint], None] | None, should_stop: Callable[[], bool]
    ) -> LoraResult:
        progress = _Progress()
        resumed_from = None
        latest = _latest_checkpoint(self.checkpoints)
        if latest is not None:
            progress = self._load_checkpoint(latest)
            resumed_from = progress.step
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

    # -- compute ----------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        if self.precision != "bfloat16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)

    def _collate(self, indices: Sequence[int], data: Sequence[Encoded]) -> dict[str, Any]:
        """Right-padded tensors. Positions count from 0 in every row; with right padding and a
        causal mask no real token ever looks at a pad, and the mask keeps pads out of attention."""
        import torch

        rows = [data[i] for i in indices]
        width = max(len(row.input_ids) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            n = len(row.input_ids)
            input_ids[r, :n] = torch.tensor(row.input_ids)
            labels[r, :n] = torch.tensor(row.labels)
            mask[r, :n] = 1
        positions = torch.arange(width).expand(len(rows), width)
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "position_ids": positions}
        return {k: v.to(self.device) for k, v in batch.items()}

    def _loss_sum(self, batch: dict[str, Any]) -> Any:
        """Summed cross-entropy over the batch's response tokens (fp32)."""
        import torch.nn.functional as F

        base = self.model.get_base_model()
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
        return F.cross_entropy(logits.float(), targets[selected], reduction="sum")

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
        for part in self._micro_batches(indices):
            batch = self._collate(part, self.train_set)
            with self._autocast():
                loss_sum = self._loss_sum(batch)
            # Divided by the whole step's response tokens: the mean over real response tokens of
            # the step, however it was split into micro-batches.
            (loss_sum / max(1, responses)).backward()
            total += float(loss_sum.detach())
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        loss = total / max(1, responses)
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
        """Mean loss per response token over the eval set; None without one; _STOPPED on stop."""
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

    def _load_checkpoint(self, path: Path) -> _Progress:
        import torch
        from safetensors.torch import load_file

        state = json.loads((path / "state.json").read_text())
        if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"The checkpoint in {path} belongs to a run with other data, model or settings; "
                "remove the checkpoints folder or use a new work folder to start over."
            )
        tensors = load_file(str(path / "trainable.safetensors"))
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                named[name].copy_(value)
        blob = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"].cpu())
        if blob["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in blob["cuda_rng"]])
        random.setstate(_tuples(state["python_rng"]))
        np.random.set_state(_numpy_state_from_json(state["numpy_rng"]))
        return _Progress(
            step=state["step"],
            tokens=state["tokens"],
            seconds=state["seconds"],
            base_eval_loss=state["base_eval_loss"],
            base_evaluated=state["base_evaluated"],
            history=[TrainPoint(**point) for point in state["history"]],
        )

    # -- export -----------------------------------------------------------------------------

    def _export(self) -> tuple[Path, Path]:
        """Adapter as PEFT saves it; merged weights from a fresh fp32 copy of the base model (not
        the training copy, which may have been moved or cast), each renamed into place."""
        from peft import PeftModel

        adapter_dir = self.work_dir / "adapter"
        merged_dir = self.work_dir / "merged"
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
# Files


_CHECKPOINT_NAME = re.compile(r"^step-(\d{6,})$")


def _checkpoint_dirs(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders start with a dot and never match)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def _latest_checkpoint(folder: Path) -> Path | None:
    if folder.is_dir():  # leftovers of a write that was killed half-way
        for leftover in folder.glob(".step-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    found = _checkpoint_dirs(folder)
    return found[-1] if found else None


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


def copy_licence(model_dir: Path, out_dir: Path) -> None:
    """A merged model is a derivative of the base model: it carries the base model's licence."""
    for item in sorted(model_dir.iterdir()):
        if item.is_file() and LICENCE_NAMES.match(item.name):
            shutil.copy2(item, out_dir / item.name)
    card = model_dir / "README.md"
    front = ""
    if card.is_file():
        match = re.match(r"^---\s*\n.*?\n---\s*\n", card.read_text(errors="replace"), re.DOTALL)
        front = match.group(0) + "\n" if match else ""
    (out_dir / "README.md").write_text(
        f"{front}# {model_dir.name} + LoRA (merged)\n\n"
        f"`{model_dir.name}` with a LoRA adapter trained by SLM Studio merged into its weights (fp32).\n"
    )
