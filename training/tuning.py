"""The fine-tuning steps: `lora` (instruction pairs) and `raft` (pairs answered from retrieved
passages). The training loop itself is Django-free (`ml/lora.py`, `ml/raft.py`); these steps feed
it the project's data in the prompt format the chat serves with, report the loss curve live, and
resume from the last checkpoint when a build is picked up again after its worker was lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from projects.models import InstructionPair
from projects.privacy import pairs_for_models

from .models import BuildStep
from .steps import BuildCancelled, StepContext, StepError, register

# The context the chat serves with (inference.services.N_CTX) and the answer room it keeps: a
# trained example must fit the same window the model will be asked in.
SERVE_N_CTX = 2048
SERVE_MAX_NEW_TOKENS = 256
# How often the loss curve reaches the database (the build page polls every 2 s).
HISTORY_WRITE_SECONDS = 2.0


def _pairs(ctx: StepContext) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    train, held = [], []
    # Redacted by the project's policy: training (and a teacher asked these questions) sees what
    # the policy lets out.
    for pair in pairs_for_models(project=ctx.build.project):
        (held if pair.split == InstructionPair.Split.EVAL else train).append((pair.question, pair.response))
    if not train:
        raise StepError(
            "Fine-tuning needs instruction pairs: import some on the Instruction pairs tab, then build again."
        )
    return train, held


def _chat_counter(tokenizer: Any) -> Callable[[list[dict]], int]:
    def count(messages: list[dict]) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))

    return count


def _plain_examples(pairs: list[tuple[str, str]], count: Callable[[list[dict]], int]) -> list:
    """Pairs in the serving prompt with no passages: what a version without an index is asked."""
    from .ml.lora import Example
    from .ml.prompt import build_messages

    return [
        Example(
            messages=build_messages(
                question, [], [], count_tokens=count, n_ctx=SERVE_N_CTX, max_new_tokens=SERVE_MAX_NEW_TOKENS
            )
            + [{"role": "assistant", "content": answer}]
        )
        for question, answer in pairs
    ]


def _train(
    ctx: StepContext, weights: Path, train: list, held: list, extra: dict, *, distill: Any = None
) -> dict:
    """Train on `train` (lora.Example) with the step's settings; `distill` (lora.Distillation)
    adds a teacher's logits to the loss."""
    from .ml import lora

    tokens = (
        sum(len(e.text) + sum(len(m["content"]) for m in e.messages) for e in train) // 4
    )  # a rough count for the defaults
    settings = lora.default_settings(train_examples=len(train), train_tokens=tokens)
    try:
        settings = settings.with_overrides(ctx.step.params.get("overrides", {}))
    except ValueError as exc:
        raise StepError(str(exc)) from None
    history: list[dict] = list(ctx.step.metrics.get("history", []))
    last_write = 0.0

    def on_point(point: lora.TrainPoint) -> None:
        nonlocal last_write
        history.append(
            {
                "step": point.step,
                "train_loss": point.train_loss,
                "eval_loss": point.eval_loss,
                "tokens_per_second": round(point.tokens_per_second, 1),
            }
            | (
                {"distill_loss": point.distill_loss}
                if getattr(point, "distill_loss", None) is not None
                else {}
            )
        )
        eta = f", about {_duration(point.eta_seconds)} left" if point.eta_seconds else ""
        ctx.progress(point.step, point.total_steps, f"Step {point.step} of {point.total_steps}{eta}")
        now = time.monotonic()
        if now - last_write >= HISTORY_WRITE_SECONDS or point.step == point.total_steps:
            last_write = now
            ctx.step.metrics = {"history": history, "total_steps": point.total_steps}
            BuildStep.objects.filter(pk=ctx.step.pk).update(metrics=ctx.step.metrics)

    ctx.progress(0, 1, f"Training on {len(train)} examples", force=True)
    try:
        result = lora.train_lora(
            weights, train, held, ctx.workdir, settings, on_point=on_point, should_stop=ctx.cancel_requested,
            # Said when it happens: a resumed run may itself be stopped before it ends.
            on_resume=lambda step: ctx.log(f"Resumed training from the checkpoint at step {step}."),
            **(
                {
                    "distill": distill,
                    "on_teacher": lambda done, total: ctx.progress(
                        done, total, f"The teacher reads the training examples: {done} of {total}"
                    ),
                }
                if distill is not None
                else {}
            ),
        )  # fmt: skip
    except lora.TrainingStopped:
        ctx.step.metrics = {"history": history}
        BuildStep.objects.filter(pk=ctx.step.pk).update(metrics=ctx.step.metrics)
        raise BuildCancelled from None
    ctx.output("hf_dir", result.merged_dir)
    if result.adapter_dir is not None:  # a full fine-tune has no adapter
        ctx.output("adapter_dir", result.adapter_dir)
    ctx.log(
        f"Trained {result.steps} steps on {len(train)} examples: eval loss "
        f"{_loss(result.base_eval_loss)} before, {_loss(result.eval_loss)} after."
    )
    return extra | {
        "train_examples": len(train),
        "eval_examples": len(held),
        "steps": result.steps,
        "tokens": result.tokens,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "base_eval_loss": result.base_eval_loss,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()},
        # The same points the live chart drew, the distillation term included (it was dropped
        # here once, so a finished distill build lost its KD curve).
        "history": [
            {"step": p.step, "train_loss": p.train_loss, "eval_loss": p.eval_loss}
            | ({"distill_loss": p.distill_loss} if p.distill_loss is not None else {})
            for p in result.history
        ],
    }


def _loss(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _weights(ctx: StepContext) -> Path:
    weights = ctx.outputs().get("hf_dir")
    if weights is None:
        raise StepError("There is no model to fine-tune; the recipe lacks a base step.")
    return weights


@register("lora", "Fine-tune on your pairs (LoRA)", queue="gpu")
def lora_step(ctx: StepContext) -> dict:
    """LoRA on the train split of the instruction pairs; validation loss on the eval split."""
    from transformers import AutoTokenizer

    weights = _weights(ctx)
    train, held = _pairs(ctx)
    count = _chat_counter(AutoTokenizer.from_pretrained(str(weights), local_files_only=True))
    return _train(ctx, weights, _plain_examples(train, count), _plain_examples(held, count), {})


@register("raft", "Fine-tune to answer from passages (RAFT)", queue="gpu")
def raft_step(ctx: StepContext) -> dict:
    """LoRA on retrieval-augmented examples: each question with its oracle passage among
    distractors (or without it, in a share of examples), answered with a citation — exactly the
    prompt the chat builds from the version's index."""
    from transformers import AutoTokenizer

    from .embedding import shared_embedder
    from .ml import raft, rag

    weights = _weights(ctx)
    index_dir = ctx.outputs().get("index_dir")
    if index_dir is None:
        raise StepError("RAFT needs the document index; the recipe lacks a rag step.")
    train, held = _pairs(ctx)
    count = _chat_counter(AutoTokenizer.from_pretrained(str(weights), local_files_only=True))
    try:
        settings = raft.RaftSettings(**_typed(raft.RaftSettings, ctx.step.params.get("raft", {})))
    except (TypeError, ValueError) as exc:
        raise StepError(f"RAFT settings: {exc}") from None
    ctx.progress(0, 1, "Building retrieval-augmented training examples", force=True)
    with rag.HybridIndex.open(index_dir, shared_embedder()) as index:
        search = raft.index_search(index)  # what the chat retrieves, shown as the chat shows it
        train_examples, stats = raft.raft_examples(
            train, search, count_tokens=count, n_ctx=SERVE_N_CTX, max_new_tokens=SERVE_MAX_NEW_TOKENS,
            settings=settings,
        )  # fmt: skip
        held_examples, _ = raft.raft_examples(
            held, search, count_tokens=count, n_ctx=SERVE_N_CTX, max_new_tokens=SERVE_MAX_NEW_TOKENS,
            settings=settings,
        )  # fmt: skip
    ctx.log(
        f"RAFT examples: {stats.with_oracle} with their passage, {stats.without_oracle} without it"
        + (f", {stats.oracle_not_found} whose answer no passage supports" if stats.oracle_not_found else "")
    )
    extra = {"raft": asdict(stats)}
    return _train(ctx, weights, train_examples, held_examples, extra)


def _typed(cls: type, values: dict[str, str]) -> dict[str, Any]:
    """String settings from the CLI typed after the dataclass's defaults."""
    defaults = {name: getattr(cls(), name) for name in cls.__dataclass_fields__}  # type: ignore[attr-defined]
    typed: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in defaults:
            raise ValueError(f"unknown setting “{key}”; known: {', '.join(defaults)}")
        kind = type(defaults[key])
        typed[key] = (raw.lower() in ("1", "true", "yes")) if kind is bool else kind(raw)
    return typed
