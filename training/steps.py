"""The steps a Build runs, and the context through which a step reports and is stopped.

A step is a function `(ctx: StepContext) -> dict` returning its metrics. Later steps (rag, lora,
quantize, ...) register here; their heavy work lives in Django-free code under training/ml/.
"""

from __future__ import annotations

import shutil
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from projects.models import Document, InstructionPair
from projects.privacy import RedactionRequired, Redactor, document_for_models, project_scan, redaction_check
from projects.services import document_parse, documents_reset_stale

from .models import Build, BuildLog, BuildStep, data_path, stored_path


def build_outputs(build: Build, *, before: int | None = None) -> dict[str, Path]:
    """What a build's finished steps produced, in step order, later steps winning (a LoRA step's
    model folder replaces the base's), as absolute paths."""
    steps = build.steps.filter(status=BuildStep.Status.SUCCEEDED).order_by("index")
    if before is not None:
        steps = steps.filter(index__lt=before)
    merged: dict[str, Path] = {}
    for outputs in steps.values_list("outputs", flat=True):
        merged |= {name: Path(str(data_path(stored))) for name, stored in outputs.items() if stored}
    return merged


class BuildCancelled(Exception):
    """Raised inside a step when the user asked to cancel; the runner records it."""


class BuildInterrupted(Exception):
    """Raised inside a step that stopped at a safe point (its checkpoints written) for a reason
    other than the user's: the worker is shutting down (SHUTDOWN: the build goes back to the
    queue) or the build ran past its time limit (TIME_LIMIT: it ends as timed out)."""

    SHUTDOWN = "shutdown"
    TIME_LIMIT = "time limit"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StepError(Exception):
    """A step that cannot go on for a reason the user can act on; the message is shown as is."""


# Set in a worker's pool process that received SIGTERM (training.worker): its build stops at the
# next safe point and goes back to the queue.
SHUTDOWN_REQUESTED = threading.Event()

# How often a step's progress reaches the database, and how often it re-reads the cancel flag.
# Coarse on purpose: a step may call progress() thousands of times a second.
WRITE_EVERY_SECONDS = 1.0


@dataclass
class StepContext:
    build: Build
    step: BuildStep
    # time.monotonic() after which the build stops at its next safe point as timed out; None: never.
    deadline: float | None = None
    _last_write: float = field(default=0.0, repr=False)
    _last_cancel_check: float = field(default=0.0, repr=False)
    _reason: str | None = field(default=None, repr=False)

    @property
    def workdir(self) -> Path:
        return Path(settings.DATA_DIR) / "builds" / str(self.build.pk) / f"{self.step.index}-{self.step.name}"

    def progress(self, current: int, total: int, message: str = "", *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < WRITE_EVERY_SECONDS and current < total:
            return
        self._last_write = now
        self.step.progress_current, self.step.progress_total = current, total
        fields = ["progress_current", "progress_total"]
        if message:
            self.step.message = message[:300]
            fields.append("message")
        BuildStep.objects.filter(pk=self.step.pk).update(**{f: getattr(self.step, f) for f in fields})
        Build.objects.filter(pk=self.build.pk).update(heartbeat_at=timezone.now())

    def output(self, name: str, path: Path) -> None:
        """Record something the step produced (relative to DATA_DIR when inside it)."""
        self.step.outputs = self.step.outputs | {name: stored_path(path)}
        BuildStep.objects.filter(pk=self.step.pk).update(outputs=self.step.outputs)

    def outputs(self) -> dict[str, Path]:
        """What the earlier steps of this build produced."""
        return build_outputs(self.build, before=self.step.index)

    def log(self, message: str, level: str = "info") -> None:
        BuildLog.objects.create(build=self.build, level=level, message=message)

    def cancel_requested(self, *, force: bool = False) -> bool:
        """Whether the step should stop at this safe point: the user cancelled, the worker is
        shutting down, or the time limit has passed. Cheap to call in a tight loop: reads the
        database at most once a second. Every step's `should_stop` is this."""
        now = time.monotonic()
        if self._reason is not None:
            return True
        if self.deadline is not None and now >= self.deadline:
            self._reason = BuildInterrupted.TIME_LIMIT
            return True
        if SHUTDOWN_REQUESTED.is_set():
            self._reason = BuildInterrupted.SHUTDOWN
            return True
        if not force and now - self._last_cancel_check < WRITE_EVERY_SECONDS:
            return False
        self._last_cancel_check = now
        cancel, requeue = (
            Build.objects.filter(pk=self.build.pk)
            .values_list("cancel_requested_at", "requeue_requested_at")
            .first()
        ) or (None, None)
        if cancel:
            self._reason = "cancel"
        elif requeue:
            self._reason = BuildInterrupted.SHUTDOWN
        return self._reason is not None

    def check_cancel(self, *, force: bool = False) -> None:
        """Raise BuildCancelled or BuildInterrupted if the step should stop."""
        if self.cancel_requested(force=force):
            self.raise_stopped()

    @property
    def stop_reason(self) -> str | None:
        """Why cancel_requested last said stop: "cancel", BuildInterrupted.SHUTDOWN or .TIME_LIMIT."""
        return self._reason

    def raise_stopped(self) -> typing.NoReturn:
        """Raise the exception for why the step stopped (after a loop's own stop exception)."""
        if self._reason is None:
            self.cancel_requested(force=True)
        if self._reason in (BuildInterrupted.SHUTDOWN, BuildInterrupted.TIME_LIMIT):
            raise BuildInterrupted(self._reason)
        raise BuildCancelled


StepRunner = Callable[[StepContext], dict]
STEP_RUNNERS: dict[str, StepRunner] = {}
STEP_LABELS: dict[str, str] = {}
# The queue each step prefers (ops.queues): "gpu" for the steps a GPU speeds up by an order of
# magnitude (training, distillation, pruning's calibration passes), "cpu" for the rest.
STEP_QUEUES: dict[str, str] = {}


def register(name: str, label: str, *, queue: str = "cpu") -> Callable[[StepRunner], StepRunner]:
    def wrap(fn: StepRunner) -> StepRunner:
        STEP_RUNNERS[name] = fn
        STEP_LABELS[name] = label
        STEP_QUEUES[name] = queue
        return fn

    return wrap


@register("parse", "Read documents")
def parse_step(ctx: StepContext) -> dict:
    """Parse every document not read yet: uploads waiting for a worker, and parses that were lost."""
    project = ctx.build.project
    stale_after = timedelta(seconds=settings.BUILD_STALE_SECONDS)
    read = failed = 0

    def parse_waiting() -> None:
        nonlocal read, failed
        documents_reset_stale(documents=project.documents.all(), stale_after=stale_after)
        waiting = list(project.documents.filter(status=Document.Status.PENDING).values_list("pk", flat=True))
        for pk in waiting:
            ctx.check_cancel()
            document = document_parse(document_id=pk)
            if document is None:  # another worker claimed it first
                continue
            read += 1
            if document.status == Document.Status.FAILED:
                failed += 1
                ctx.log(f"{document.original_name}: {document.error}", level="warning")
            total = read + project.documents.filter(status=Document.Status.PENDING).count()
            ctx.progress(read, total, f"{read} of {total} new documents read")

    ctx.progress(0, 0, "Looking for documents to read", force=True)
    parse_waiting()
    # Parses running elsewhere (an upload handed to a worker) must end before later steps use
    # the text; a parse whose process died is handed back and read here.
    while project.documents.filter(status=Document.Status.PARSING).exists():
        ctx.check_cancel()
        time.sleep(0.5)
        parse_waiting()
    # Every text a later step reads is scanned for personal data first, so the redaction policy
    # covers it; a project that requires redaction stops here while a finding is kept.
    scan = project_scan(
        project=project, progress=lambda done, total: ctx.progress(done, total, "Looking for personal data")
    )
    if scan.documents or scan.pairs:
        ctx.log(
            f"Scanned {scan.documents} documents and {scan.pairs} pairs for personal data: {scan.findings} findings."
        )
    if any(step.name not in ("parse", "validate") for step in ctx.build.steps.all()):
        try:
            redaction_check(project=project, scan=False)
        except RedactionRequired as exc:
            raise StepError(exc.messages[0]) from None
    parsed = project.documents.filter(status=Document.Status.PARSED)
    metrics = {
        "documents": project.documents.count(),
        "parsed": parsed.count(),
        "failed": project.documents.filter(status=Document.Status.FAILED).count(),
        "newly_read": read - failed,
        "pages": sum(d.page_count or 0 for d in parsed.only("page_count")),
        "sections": sum(d.section_count for d in parsed.only("section_count")),
    }
    ctx.progress(
        read,
        read,
        f"{metrics['parsed']} document{'s' if metrics['parsed'] != 1 else ''} ready, {metrics['failed']} failed",
        force=True,
    )
    return metrics


@register("validate", "Check data")
def validate_step(ctx: StepContext) -> dict:
    """Check that the project holds usable data, and record what a training step would get."""
    project = ctx.build.project
    ctx.progress(0, 1, "Checking documents and instruction pairs", force=True)
    documents = project.documents.filter(status=Document.Status.PARSED).count()
    train = project.pairs.usable().filter(split=InstructionPair.Split.TRAIN).count()
    eval_ = project.pairs.usable().filter(split=InstructionPair.Split.EVAL).count()
    if documents == 0 and train + eval_ == 0:
        raise StepError(
            "This project has no usable data yet: add documents or instruction pairs, then build again."
        )
    if train + eval_ and eval_ == 0:
        ctx.log(
            "No instruction pair is held out for evaluation yet; add more pairs so quality can be measured.",
            level="warning",
        )
    ctx.progress(1, 1, f"{documents} documents, {train} training and {eval_} evaluation pairs", force=True)
    return {"documents": documents, "train_pairs": train, "eval_pairs": eval_}


@register("rag", "Index documents for retrieval")
def rag_step(ctx: StepContext) -> dict:
    """Split every readable document into passages and index them for hybrid retrieval."""
    from projects.privacy import redaction_fingerprint

    from .embedding import project_embedding_cache, shared_embedder
    from .ml import rag

    project = ctx.build.project
    params = ctx.step.params
    config = rag.ChunkConfig(
        chunk_chars=int(params.get("chunk_chars", rag.ChunkConfig.chunk_chars)),
        overlap_chars=int(params.get("overlap_chars", rag.ChunkConfig.overlap_chars)),
    )
    documents = list(project.documents.filter(status=Document.Status.PARSED).order_by("pk"))
    if not documents:
        raise StepError(
            "There are no readable documents to index. Upload documents (PDF, Word, HTML, Markdown, "
            "text or CSV), then build again."
        )
    chunks: list[rag.Chunk] = []
    # The index holds the text as the project's redaction policy leaves it; what it was built
    # from is kept inside it (sources.json), so a version can tell what changed since.
    fingerprint = redaction_fingerprint(project=project)
    redactor = Redactor(project)
    indexed: list[dict] = []
    for i, document in enumerate(documents, start=1):
        ctx.check_cancel()
        parsed = document_for_models(document=document, redactor=redactor)
        if parsed is None:
            ctx.log(f"{document.original_name}: its extracted text is missing; skipped.", level="warning")
            continue
        indexed.append({"id": document.pk, "sha256": document.sha256, "name": document.original_name})
        title = parsed.title or document.original_name
        chunks += rag.chunk_document(document.pk, title, parsed.sections, config)
        ctx.progress(i, len(documents), f"{i} of {len(documents)} documents split into passages")
    ctx.log(
        f"{len(chunks)} passages from {len(documents)} document{'s' if len(documents) != 1 else ''}; embedding them."
    )
    ctx.progress(0, len(chunks), "Loading the embedding model", force=True)
    embedder = shared_embedder()
    cache = project_embedding_cache(project)
    out = ctx.workdir / "index"
    if out.exists():  # left by an attempt whose worker was lost; nothing refers to it
        shutil.rmtree(out)
    try:
        stats = rag.build_index(
            chunks,
            out,
            embedder,
            config=config,
            progress=lambda done, total: ctx.progress(done, total, f"{done} of {total} passages embedded"),
            should_stop=ctx.cancel_requested,
            cache=cache,
            sources={"documents": indexed, "redaction": fingerprint},
        )
    except rag.IndexBuildStopped:
        raise BuildCancelled from None
    ctx.output("index_dir", out)
    ctx.progress(stats.chunks, stats.chunks, f"{stats.chunks} passages indexed", force=True)
    if stats.reused:
        ctx.log(
            f"{stats.reused} of {stats.chunks} passages were unchanged: their vectors came from the cache."
        )
    return {
        "documents": stats.documents,
        "chunks": stats.chunks,
        "embedding_model": stats.embedding_model,
        "seconds": round(stats.seconds, 2),
        "chunks_per_second": round(stats.chunks / stats.seconds, 1) if stats.seconds else None,
        "chunk_chars": config.chunk_chars,
        "overlap_chars": config.overlap_chars,
        # Passages whose vectors came from the project's embedding cache, and passages embedded.
        "reused": stats.reused,
        "embedded": stats.embedded,
        "redaction": fingerprint,
    }


def _build_base(ctx: StepContext):  # type: ignore[no-untyped-def]
    from .registry import base_model_default

    return ctx.build.base or base_model_default()


@register("base", "Prepare the base model")
def base_step(ctx: StepContext) -> dict:
    """The base model's safetensors weights, which conversion and training read."""
    from .registry import BaseNotConvertible, base_model_weights

    base = _build_base(ctx)
    ctx.progress(0, 1, f"Preparing {base.name}", force=True)
    try:
        weights = base_model_weights(
            base, progress=lambda done, total: ctx.progress(done, total, "Unpacking")
        )
    except BaseNotConvertible as exc:
        raise StepError(str(exc)) from None
    ctx.output("hf_dir", weights)
    ctx.progress(1, 1, f"{base.name} ready", force=True)
    return {"base_model": base.name, "parameters": base.info.get("parameters")}


@register("convert", "Convert to GGUF")
def convert_step(ctx: StepContext) -> dict:
    """Write the model folder as an unquantized GGUF: the parent every quantized type is made
    from and compared with. An unchanged base is converted once and cached."""
    out_type = ctx.step.params.get("type", "f16")
    weights = ctx.outputs().get("hf_dir")
    if weights is None:
        raise StepError("There is no model folder to convert; the recipe lacks a base step.")
    ctx.progress(0, 1, f"Converting to {out_type.upper()} GGUF", force=True)
    started = time.monotonic()
    out, cached = gguf_of(ctx, weights, out_type=out_type, out=ctx.workdir / f"model-{out_type}.gguf")
    ctx.output("parent_gguf", out)
    ctx.progress(1, 1, f"{out_type.upper()} GGUF: {out.stat().st_size / 1e6:.1f} MB", force=True)
    return {
        "type": out_type,
        "size_bytes": out.stat().st_size,
        "seconds": round(time.monotonic() - started, 2),
        "cached": cached,
    }


def gguf_of(ctx: StepContext, weights: Path, *, out_type: str, out: Path) -> tuple[Path, bool]:
    """`weights` as a GGUF of `out_type` at `out`; the unchanged base's F16 comes from the cache
    (converted once). True when the cached file was used."""
    from .ml import gguf_convert
    from .registry import base_model_f16

    base = _build_base(ctx)

    def convert(src: Path, dst: Path) -> gguf_convert.ConvertResult:
        try:
            return gguf_convert.convert_hf_to_gguf(src, dst, out_type=out_type, name=base.name)
        except gguf_convert.UnsupportedModel as exc:
            raise StepError(str(exc)) from None

    if out_type == "f16" and _is_base_weights(base, weights):
        return base_model_f16(base, weights, convert)
    out.parent.mkdir(parents=True, exist_ok=True)
    convert(weights, out)
    return out, False


def _is_base_weights(base, weights: Path) -> bool:  # type: ignore[no-untyped-def]
    """Whether `weights` is the base's own folder (not one a training step changed)."""
    from .registry import base_model_weights

    return base_model_weights(base).resolve() == weights.resolve()


@register("quantize", "Quantize")
def quantize_step(ctx: StepContext) -> dict:
    """One llama.cpp quantization of the parent GGUF; a build may hold several, one per type."""
    from .ml import quantize

    qtype = ctx.step.params.get("type", "")
    parent = ctx.outputs().get("parent_gguf")
    if parent is None:
        raise StepError("There is no GGUF to quantize; the recipe lacks a convert step.")
    imatrix = _imatrix(ctx) if ctx.step.params.get("imatrix") else None
    ctx.progress(0, 1, f"Quantizing to {qtype.upper()}", force=True)
    out = ctx.workdir / f"model-{qtype}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = quantize.quantize_gguf(parent, out, qtype, imatrix=imatrix.values if imatrix else None)
    ctx.output(f"gguf:{qtype}", out)
    parent_size = parent.stat().st_size
    ctx.log(
        f"{qtype.upper()}: {result.size_bytes / 1e6:.1f} MB ({result.size_bytes / parent_size:.0%} of the "
        f"parent), {result.bits_per_weight:.2f} bits per weight"
        + (
            f"; {result.fallback_tensors} tensors fell back to another type"
            if result.fallback_tensors
            else ""
        )
    )
    ctx.progress(
        1,
        1,
        f"{qtype.upper()}: {result.size_bytes / 1e6:.1f} MB, {result.bits_per_weight:.2f} bits per weight",
        force=True,
    )
    return {
        "type": qtype,
        "size_bytes": result.size_bytes,
        "size_ratio": round(result.size_bytes / parent_size, 4),
        "bits_per_weight": round(result.bits_per_weight, 3),
        "tensor_types": result.tensor_types,
        "fallback_tensors": result.fallback_tensors,
        "imatrix_tokens": imatrix.tokens if imatrix else None,
        "seconds": round(result.seconds, 2),
    }


@dataclass(frozen=True)
class _Imatrix:
    values: dict
    tokens: int


def _imatrix(ctx: StepContext) -> _Imatrix | None:
    """The importance matrix of this build's model over the project's training sections (never
    the held-out ones the evaluation reads), computed once per build and kept beside its steps."""
    import numpy as np

    from projects.services import documents_held_out_text, documents_training_text

    from .ml import base_models, quantize

    path = ctx.workdir.parent / "imatrix.npz"
    if path.is_file():
        with np.load(path) as stored:
            values = {name: stored[name] for name in stored.files if name != "__tokens__"}
            return _Imatrix(values, int(stored["__tokens__"]))
    project = ctx.build.project
    if not documents_held_out_text(project=project).held_out:
        # Evaluation then reads all the text; calibrating on it would flatter the numbers.
        ctx.log(
            "Too little document text to keep calibration apart from evaluation; quantizing without an "
            "importance matrix.",
            "warning",
        )
        return None
    texts = documents_training_text(project=project)
    weights = ctx.outputs().get("hf_dir")
    if not texts or weights is None:
        ctx.log("No training text to compute an importance matrix from; quantizing without one.", "warning")
        return None
    ctx.progress(0, 1, "Measuring which weights matter on your documents (importance matrix)", force=True)
    model, tokenizer = base_models.load_causal_lm(weights)
    tokens = 0
    for text in texts:  # what compute_imatrix will read: the texts joined with EOS, cut at the budget
        tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        if tokens >= settings.IMATRIX_MAX_TOKENS:
            break
    tokens = min(tokens, settings.IMATRIX_MAX_TOKENS)
    values = quantize.compute_imatrix(model, tokenizer, texts, max_tokens=settings.IMATRIX_MAX_TOKENS)
    del model
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, __tokens__=np.asarray(tokens), **values)
    tmp.replace(path)
    ctx.log(f"Importance matrix from {tokens} tokens of your documents' training sections.")
    return _Imatrix(values, tokens)
