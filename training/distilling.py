"""The `distill` step: the build's base model (the student) learns from a project's teacher.

Two modes (`distill.mode`):
- `logits`: the teacher shares the student's tokenizer (e.g. the SmolLM2 family) and is a local
  Hugging Face folder; the student trains on the project's pairs with the loss
  α·T²·KL(teacher‖student at temperature T) + (1−α)·CE (ml/lora.py), the teacher's top-k
  probabilities (plus the mass of all other tokens) computed once and cached.
- `sequence`: any teacher, local or behind an endpoint, answers the project's prompts (the
  training pairs' instructions); its answers are the student's training targets (LoRA SFT).
  Answers are kept beside the step, so a resumed build does not ask the teacher again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from .models import Teacher
from .steps import BuildCancelled, StepContext, StepError, register
from .tuning import _chat_counter, _pairs, _plain_examples, _train, _weights

MODES = ("logits", "sequence")
ANSWER_MAX_TOKENS = 256
# The teacher answers as an expert of the team's domain would, briefly: its answer is what the
# student learns to say.
TEACHER_SYSTEM = (
    "You are an expert assistant for an organisation's staff. Answer the question correctly and "
    "concisely, in one to four sentences, without preamble."
)


def _settings(ctx: StepContext) -> dict[str, Any]:
    params = ctx.step.params
    known = {"teacher", "mode", "temperature", "alpha", "top_k", "overrides"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise StepError(
            f"Unknown distillation setting “{unknown[0]}”; known: teacher, mode, temperature, alpha, top_k."
        )
    try:
        return {
            "teacher": int(params.get("teacher", 0) or 0),
            "mode": str(params.get("mode", "")).strip().lower(),
            "temperature": float(params.get("temperature", 4.0)),
            "alpha": float(params.get("alpha", 0.5)),
            "top_k": int(params.get("top_k", 64)),
        }
    except ValueError as exc:
        raise StepError(f"Distillation settings: {exc}") from None


def _teacher(ctx: StepContext, teacher_id: int) -> Teacher:
    teacher = ctx.build.project.teachers.filter(pk=teacher_id).first() if teacher_id else None
    if teacher is None:
        names = ", ".join(f"{t.pk} ({t.name})" for t in ctx.build.project.teachers.all()) or "none yet"
        raise StepError(f"Choose a teacher with distill.teacher=ID; this project's teachers: {names}.")
    return teacher


@register("distill", "Learn from the teacher (distillation)", queue="gpu")
def distill_step(ctx: StepContext) -> dict:
    from .ml import lora

    settings = _settings(ctx)
    teacher = _teacher(ctx, settings["teacher"])
    mode = settings["mode"] or ("logits" if teacher.kind == Teacher.Kind.HF else "sequence")
    if mode not in MODES:
        raise StepError(f"distill.mode is logits or sequence, not “{mode}”.")
    weights = _weights(ctx)
    train, held = _pairs(ctx)
    count = _chat_counter(AutoTokenizer.from_pretrained(str(weights), local_files_only=True))
    extra = {"teacher": teacher.name, "teacher_kind": teacher.kind, "mode": mode}
    if mode == "logits":
        if teacher.kind != Teacher.Kind.HF:
            raise StepError(
                "Logit distillation reads the teacher's weights: register it as a local Hugging Face folder "
                "with the student's tokenizer, or use distill.mode=sequence."
            )
        try:
            distill = lora.Distillation(
                teacher_dir=Path(teacher.path), temperature=settings["temperature"], alpha=settings["alpha"],
                top_k=settings["top_k"],
            )  # fmt: skip
        except ValueError as exc:
            raise StepError(f"Distillation settings: {exc}") from None
        ctx.log(
            f"Logit distillation from {teacher.name}: temperature {distill.temperature}, α {distill.alpha}, "
            f"the teacher's top {distill.top_k} tokens (and the mass of the rest) cached once."
        )
        extra |= {"temperature": distill.temperature, "alpha": distill.alpha, "top_k": distill.top_k}
        try:
            return _train(
                ctx,
                weights,
                _plain_examples(train, count),
                _plain_examples(held, count),
                extra,
                distill=distill,
            )
        except ValueError as exc:  # a teacher with another tokenizer, unreadable weights
            raise StepError(str(exc)) from None
    answers = _teacher_answers(ctx, teacher, [question for question, _ in train])
    written = [(q, a) for q, a in zip((q for q, _ in train), answers, strict=True) if a]
    if not written:
        raise StepError(f"{teacher.name} gave no usable answer; see the log, then build again.")
    ctx.log(
        f"{teacher.name} answered {len(written)} of {len(train)} training prompts; the student learns its answers."
    )
    extra |= {"teacher_answers": len(written), "prompts": len(train)}
    # Held-out pairs keep their reference answers: validation measures the task, not the teacher.
    return _train(ctx, weights, _plain_examples(written, count), _plain_examples(held, count), extra)


def _teacher_answers(ctx: StepContext, teacher: Teacher, prompts: list[str]) -> list[str]:
    """The teacher's answer to every prompt ("" where it failed), asked with bounded concurrency,
    kept in the step's folder as they arrive so a resumed build asks only for the missing ones."""
    from .ml import teachers as ml
    from .teachers import teacher_client

    path = ctx.workdir / "teacher-answers.json"
    stored: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
    missing = [p for p in dict.fromkeys(prompts) if p not in stored]
    failures: list[str] = []
    if missing:
        ctx.progress(0, len(missing), f"Asking {teacher.name} {len(missing)} questions", force=True)

        def ask(client: ml.TeacherClient, prompt: str) -> str:
            messages = [{"role": "system", "content": TEACHER_SYSTEM}, {"role": "user", "content": prompt}]
            return client.complete(messages, max_tokens=ANSWER_MAX_TOKENS).strip()

        with teacher_client(teacher) as client:
            answers = ml.map_bounded(
                client,
                missing,
                ask,
                max_concurrency=teacher.max_concurrency,
                should_stop=ctx.cancel_requested,
            )
            for done, (prompt, outcome) in enumerate(answers, start=1):
                if isinstance(outcome, BaseException):
                    failures.append(str(outcome))
                    if getattr(outcome, "fatal", False):
                        raise StepError(str(outcome))
                else:
                    stored[prompt] = outcome
                    _write_json(path, stored)
                ctx.progress(done, len(missing), f"{teacher.name} answered {done} of {len(missing)}")
        if ctx.cancel_requested(force=True):
            raise BuildCancelled
    if failures:
        ctx.log(
            f"{len(failures)} questions got no answer from {teacher.name}; the last error: {failures[-1]}",
            "warning",
        )
    return [stored.get(p, "") for p in prompts]


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False))
    tmp.replace(path)
