"""The steps a Build runs, and the context through which a step reports and is stopped.

A step is a function `(ctx: StepContext) -> dict` returning its metrics. Later steps (rag, lora,
quantize, ...) register here; their heavy work lives in Django-free code under training/ml/.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from projects.models import Document, InstructionPair
from projects.services import document_parse, documents_reset_stale

from .models import Build, BuildLog, BuildStep


class BuildCancelled(Exception):
    """Raised inside a step when the user asked to cancel; the runner records it."""


class StepError(Exception):
    """A step that cannot go on for a reason the user can act on; the message is shown as is."""


# How often a step's progress reaches the database, and how often it re-reads the cancel flag.
# Coarse on purpose: a step may call progress() thousands of times a second.
WRITE_EVERY_SECONDS = 1.0


@dataclass
class StepContext:
    build: Build
    step: BuildStep
    _last_write: float = field(default=0.0, repr=False)
    _last_cancel_check: float = field(default=0.0, repr=False)

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

    def log(self, message: str, level: str = "info") -> None:
        BuildLog.objects.create(build=self.build, level=level, message=message)

    def check_cancel(self, *, force: bool = False) -> None:
        """Raise BuildCancelled if the user asked to stop. Cheap to call in a tight loop."""
        now = time.monotonic()
        if not force and now - self._last_cancel_check < WRITE_EVERY_SECONDS:
            return
        self._last_cancel_check = now
        requested = (
            Build.objects.filter(pk=self.build.pk).values_list("cancel_requested_at", flat=True).first()
        )
        if requested:
            raise BuildCancelled


StepRunner = Callable[[StepContext], dict]
STEP_RUNNERS: dict[str, StepRunner] = {}
STEP_LABELS: dict[str, str] = {}


def register(name: str, label: str) -> Callable[[StepRunner], StepRunner]:
    def wrap(fn: StepRunner) -> StepRunner:
        STEP_RUNNERS[name] = fn
        STEP_LABELS[name] = label
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
    parsed = project.documents.filter(status=Document.Status.PARSED)
    metrics = {
        "documents": project.documents.count(),
        "parsed": parsed.count(),
        "failed": project.documents.filter(status=Document.Status.FAILED).count(),
        "newly_read": read - failed,
        "pages": sum(d.page_count or 0 for d in parsed.only("page_count")),
        "sections": sum(d.section_count for d in parsed.only("section_count")),
    }
    ctx.progress(read, read, f"{metrics['parsed']} documents ready, {metrics['failed']} failed", force=True)
    return metrics


@register("validate", "Check data")
def validate_step(ctx: StepContext) -> dict:
    """Check that the project holds usable data, and record what a training step would get."""
    project = ctx.build.project
    ctx.progress(0, 1, "Checking documents and instruction pairs", force=True)
    documents = project.documents.filter(status=Document.Status.PARSED).count()
    train = project.pairs.filter(split=InstructionPair.Split.TRAIN).count()
    eval_ = project.pairs.filter(split=InstructionPair.Split.EVAL).count()
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


DEFAULT_RECIPE: list[dict] = [{"name": "parse"}, {"name": "validate"}]
