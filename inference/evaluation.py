"""The evaluation every build ends with (the `evaluate` step) and `manage.py evaluate`.

It lives in inference because answer quality is measured through the same path the chat page
and the API answer with (retrieval, prompt, llama.cpp engine); training must not import
inference, so this module registers the step into training's registry when the app loads.

Every number is measured the same way for every version so they compare: the project's
held-out document text (cut at EVAL_MAX_TOKENS) for perplexity, bits per byte and KL divergence
against the unquantized parent; its held-out instruction pairs (the first EVAL_MAX_PAIRS,
answered greedily) for answer quality; a fixed prompt in a fresh process for speed and memory.
A number that does not apply (no parent, no pairs, no text) is None, never invented.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
from django.conf import settings

from projects.models import InstructionPair, Project
from projects.privacy import pairs_for_models
from projects.services import documents_held_out_text
from training.embedding import shared_embedder
from training.ml import evaluate, quantize
from training.ml.rag import HybridIndex
from training.models import ModelVersion
from training.services import build_candidates
from training.steps import BuildCancelled, StepContext, register

from .engines.llama import engines
from .services import ChatSettings, answer_from

log = logging.getLogger(__name__)

# The keys `manage.py evaluate` prints (a contract), then the others a version keeps.
CONTRACT_KEYS = (
    "perplexity",
    "bits_per_byte",
    "kl_divergence",
    "answer_f1",
    "tokens_per_second",
    "size_bytes",
    "peak_memory_bytes",
)
OTHER_KEYS = (
    "top1_agreement",
    "rouge_l",
    "embedding_similarity",
    "prompt_tokens_per_second",
    "bits_per_weight",
    "eval_tokens",
    "eval_bytes",
    "eval_pairs",
    "held_out",
    "eval_text_sha256",  # which text the perplexity is over: equal hashes, comparable numbers
    "gguf_identity",  # which file was measured (path, size, mtime): equal identities, same weights
    "carried_over",  # {"from_version": N, "keys": [...]}: numbers taken from an earlier version
    "measured_on",  # the machine speed and memory were measured on (host, cores, CPU)
)

# Numbers that depend only on the GGUF file (speed, memory, size), and those that depend on the
# file and the held-out document text (perplexity and KL divergence). A refresh carries them over
# from the version it refreshes when those inputs are the same; answer quality depends on the
# index and is always measured again.
FILE_KEYS = (
    "tokens_per_second",
    "prompt_tokens_per_second",
    "peak_memory_bytes",
    "size_bytes",
    "bits_per_weight",
)
TEXT_KEYS = (
    "perplexity",
    "bits_per_byte",
    "kl_divergence",
    "top1_agreement",
    "eval_tokens",
    "eval_bytes",
    "held_out",
)


def gguf_identity(gguf: Path, parent: Path | None = None) -> str:
    """The measured file (and the parent KL divergence is against), as path, size and mtime."""
    parts = []
    for path in (gguf, parent):
        if path is not None:
            st = Path(path).stat()
            parts.append(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def evaluate_model(
    *,
    project: Project,
    gguf: Path,
    parent: Path | None,
    index_dir: Path | None,
    report: Callable[[str], None] = lambda message: None,
    should_stop: Callable[[], bool] | None = None,
    carry_from: tuple[int, dict] | None = None,
) -> dict:
    """Measure one GGUF (with its index, when it answers from documents).

    `carry_from` is (version number, its evaluate metrics): numbers that depend only on inputs
    that are the same here (the same GGUF file; for perplexity also the same held-out text) are
    taken from it instead of measured, and listed under "carried_over"."""
    stop = should_stop or (lambda: False)
    metrics: dict = dict.fromkeys(CONTRACT_KEYS + OTHER_KEYS)
    identity = gguf_identity(gguf, parent)
    metrics["gguf_identity"] = identity
    earlier_number, earlier = carry_from or (None, {})
    same_file = bool(earlier) and earlier.get("gguf_identity") == identity
    carried: list[str] = []

    held = documents_held_out_text(project=project)
    held_sha = hashlib.sha256(held.text.encode()).hexdigest()[:16]
    score = None
    if (
        same_file
        and held.text.strip()
        and earlier.get("eval_text_sha256") == held_sha
        and earlier.get("perplexity") is not None
    ):
        metrics |= {key: earlier.get(key) for key in TEXT_KEYS} | {"eval_text_sha256": held_sha}
        carried += [key for key in TEXT_KEYS if earlier.get(key) is not None]
    elif held.text.strip():
        report(
            "perplexity on held-out document text" + (" and KL divergence to the parent" if parent else "")
        )
        try:
            score = evaluate.score_text(
                gguf, held.text, reference=parent, max_tokens=settings.EVAL_MAX_TOKENS, should_stop=stop
            )
        except evaluate.EvaluationStopped:
            raise BuildCancelled from None
        except ValueError as exc:  # a text of a token or two: nothing to measure, so no number
            log.info("no perplexity for %s: %s", gguf.name, exc)
    if score is not None:
        metrics |= {
            "perplexity": _round(score.perplexity, 4),
            "bits_per_byte": _round(score.bits_per_byte, 4),
            "kl_divergence": _round(score.kl_divergence, 6),
            "top1_agreement": _round(score.top1_agreement, 4),
            "eval_tokens": score.tokens,
            "eval_bytes": score.bytes,
            "held_out": held.held_out,
            "eval_text_sha256": held_sha,
        }
    if stop():
        raise BuildCancelled

    # Asked and scored as the models were trained and indexed: with the redaction applied.
    pairs = pairs_for_models(project=project, split=InstructionPair.Split.EVAL, limit=settings.EVAL_MAX_PAIRS)
    if pairs:
        report(f"answering {len(pairs)} held-out questions")
        # Opened for this evaluation only: the worker must not keep every build's index open.
        index = HybridIndex.open(index_dir, shared_embedder()) if index_dir is not None else None
        chat = ChatSettings(temperature=0.0, max_tokens=settings.EVAL_ANSWER_TOKENS)
        answers = []
        try:
            for pair in pairs:
                if stop():
                    raise BuildCancelled
                answer = answer_from(gguf=gguf, index=index, question=pair.question, history=[], chat=chat)
                answers.append(answer.complete().text)
        finally:
            if index is not None:
                index.close()
        references = [pair.response for pair in pairs]
        vectors = shared_embedder().embed(answers + references)
        similarity = (vectors[: len(pairs)] * vectors[len(pairs) :]).sum(axis=1)
        metrics |= {
            "answer_f1": _round(statistics.fmean(map(evaluate.token_f1, answers, references)), 4),
            "rouge_l": _round(statistics.fmean(map(evaluate.rouge_l, answers, references)), 4),
            "embedding_similarity": _round(float(np.mean(similarity)), 4),
            "eval_pairs": len(pairs),
        }

    # Speed and memory also depend on the machine: carried over only when measured on this one.
    metrics["measured_on"] = _machine_identity()
    if (
        same_file
        and earlier.get("tokens_per_second") is not None
        and earlier.get("measured_on") == metrics["measured_on"]
    ):
        metrics |= {key: earlier.get(key) for key in FILE_KEYS}
        carried += list(FILE_KEYS)
    else:
        report("speed and memory")
        speed = evaluate.measure_speed(gguf)
        metrics |= {
            "tokens_per_second": _round(speed.tokens_per_second, 1),
            "prompt_tokens_per_second": _round(speed.prompt_tokens_per_second, 1),
            "peak_memory_bytes": speed.peak_memory_bytes,
            "size_bytes": gguf.stat().st_size,
            "bits_per_weight": _round(quantize.gguf_bits_per_weight(gguf)[0], 3),
        }
    if carried:
        metrics["carried_over"] = {"from_version": earlier_number, "keys": carried}
    return metrics


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


@register("evaluate", "Evaluate")
def evaluate_step(ctx: StepContext) -> dict:
    """Measure every model the build made; the numbers go onto each new ModelVersion."""
    candidates = build_candidates(ctx.build, ctx.outputs())
    earlier = _refreshed_version(ctx)
    results: dict[str, dict] = {}
    for i, candidate in enumerate(candidates):
        ctx.check_cancel(force=True)
        name = candidate.label.upper() or "model"

        def report(message: str, i: int = i, name: str = name) -> None:
            ctx.progress(i, len(candidates), f"{name}: {message}", force=True)

        try:
            results[candidate.label] = evaluate_model(
                project=ctx.build.project,
                gguf=candidate.gguf,
                parent=candidate.parent,
                index_dir=candidate.index_dir,
                report=report,
                should_stop=ctx.cancel_requested,
                carry_from=(
                    (earlier.number, earlier.evaluation)
                    if earlier is not None and earlier.quant_type == candidate.label
                    else None
                ),
            )
        finally:
            engines.drop(candidate.gguf)  # the worker keeps no model a build only measured
        ctx.log(f"{name}: {_summary(results[candidate.label])}")
    baseline = _baseline(ctx, candidates[0].index_dir if candidates else None)
    ctx.progress(len(candidates), len(candidates), f"{len(candidates)} model(s) measured", force=True)
    return {"models": results} | ({"baseline": baseline} if baseline else {})


def _refreshed_version(ctx: StepContext) -> ModelVersion | None:
    """The version a refresh build refreshes (its evaluate step's "refresh_of"), if any."""
    pk = ctx.step.params.get("refresh_of")
    if not pk:
        return None
    return ModelVersion.objects.filter(pk=pk, project=ctx.build.project).first()


def _baseline(ctx: StepContext, index_dir: Path | None) -> dict | None:
    """What a changed model is compared with, asked the same held-out questions the same way (with
    the same index): a pruned model with the model just before pruning (its GGUF, kept by the
    prune step); a fine-tuned one with the base it started from, when that can be served as is."""
    from training.registry import base_model_default

    base = ctx.build.base or base_model_default()
    unpruned = ctx.outputs().get("unpruned_gguf")
    tuned = ctx.build.steps.filter(name__in=("lora", "raft", "distill")).exists()
    if unpruned is not None and unpruned.is_file():
        gguf, name, kind = unpruned, f"{base.name}{', fine-tuned' if tuned else ''}", "unpruned"
    elif tuned:
        if base.gguf_file is None or not base.gguf_file.is_file():
            ctx.log(
                f"{base.name} has no GGUF to serve as it is; the fine-tuned model is not compared with it."
            )
            return None
        gguf, name, kind = base.gguf_file, base.name, "base"
    else:
        return None
    ctx.progress(0, 1, f"{name}: the same questions, for comparison", force=True)
    try:
        metrics = evaluate_model(
            project=ctx.build.project, gguf=gguf, parent=None, index_dir=index_dir,
            should_stop=ctx.cancel_requested,
        )  # fmt: skip
    finally:
        engines.drop(gguf)
    ctx.log(f"{'Before pruning' if kind == 'unpruned' else 'Base model'} ({name}): {_summary(metrics)}")
    return metrics | {"model": name, "kind": kind}


def _summary(m: dict) -> str:
    parts = []
    if m["perplexity"] is not None:
        parts.append(f"perplexity {m['perplexity']:.2f}")
    if m["kl_divergence"] is not None:
        parts.append(f"KL {m['kl_divergence']:.4f}")
    if m["answer_f1"] is not None:
        parts.append(f"answer F1 {m['answer_f1']:.2f}")
    parts.append(f"{m['tokens_per_second']} tokens/s, {m['size_bytes'] / 1e6:.1f} MB")
    return ", ".join(parts)


def version_evaluate(*, version: ModelVersion) -> dict:
    """Measure a version again (same protocol) and keep the numbers on it. A parent or index
    that is gone (a cleared model cache) leaves its numbers null rather than failing."""
    parent, index = version.parent_gguf, version.index_path
    metrics = evaluate_model(
        project=version.project,
        gguf=version.gguf_file,
        parent=parent if parent is not None and parent.is_file() else None,
        index_dir=index if index is not None and (index / "manifest.json").is_file() else None,
    )
    version.metrics = version.metrics | {"evaluate": metrics}
    version.save(update_fields=["metrics"])
    return metrics


def _machine_identity() -> str:
    import os
    import platform

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{platform.node()}|{os.cpu_count()}|{cpu or platform.machine()}"
