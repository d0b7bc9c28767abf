"""Build lifecycle: start, claim, run, cancel, and recovery of builds whose worker was lost."""

from __future__ import annotations

import errno
import logging
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models import F, Max, Q, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from ops import queues
from projects.models import Project
from projects.privacy import redaction_check
from slmstudio.lib.workers import worker_id, worker_is_dead
from slmstudio.logs import log_context

from .models import BaseModel, Build, BuildLog, BuildStep, ModelVersion, stored_path
from .recipes import DEFAULT_RECIPE, RecipeError, recipe_plan
from .registry import base_has_weights, base_model_default
from .steps import (
    SHUTDOWN_REQUESTED,
    STEP_LABELS,
    STEP_QUEUES,
    STEP_RUNNERS,
    BuildCancelled,
    BuildInterrupted,
    StepContext,
    StepError,
    build_outputs,
)

log = logging.getLogger(__name__)


@transaction.atomic
def build_start(
    *,
    project: Project,
    user: AbstractBaseUser | None,
    recipe: str = DEFAULT_RECIPE,
    base: BaseModel | None = None,
    params: dict[str, dict] | None = None,
    steps: list[dict] | None = None,
) -> Build:
    """Create a build of `recipe` from `base` (the bundled model when None) and queue it once
    the row is committed. `params` adds parameters per step name (e.g. {"rag": {"chunk_chars":
    500}}); `steps` replaces the recipe's steps outright (tests)."""
    base = base or base_model_default()
    if steps is None:
        try:
            plan = recipe_plan(recipe, base_has_gguf=bool(base.gguf_path))
        except RecipeError as exc:
            raise ValidationError(str(exc)) from None
        if (plan.quantize or plan.tune or plan.prune) and not base_has_weights(base):
            raise ValidationError(
                f"{base.name} is a GGUF file without its original weights: it can answer from documents, "
                "but not be quantized, fine-tuned or pruned. Register its safetensors folder for that."
            )
        problems = recipe_problems(project, plan)
        if problems:
            raise ValidationError(" ".join(problems))
        if plan.produces_model:
            # What is known now; the parse step checks again after scanning what is new.
            redaction_check(project=project, scan=False)
        recipe, steps = plan.recipe, plan.steps
    step_list = [s | {"params": s.get("params", {}) | (params or {}).get(s["name"], {})} for s in steps]
    unknown = [s["name"] for s in step_list if s["name"] not in STEP_RUNNERS]
    if unknown:
        raise ValidationError(f"Unknown build step: {', '.join(unknown)}.")
    build = Build.objects.create(project=project, created_by=user, recipe=recipe, base=base)
    BuildStep.objects.bulk_create(
        BuildStep(build=build, index=i, name=s["name"], params=s["params"]) for i, s in enumerate(step_list)
    )
    BuildLog.objects.create(build=build, message="Build queued.")
    _dispatch(build)
    return build


def _next_queue(build: Build) -> str:
    """The queue for the build's next unfinished step, where live workers consume it."""
    step = build.steps.exclude(status=BuildStep.Status.SUCCEEDED).order_by("index").first()
    return queues.route(STEP_QUEUES.get(step.name, queues.CPU) if step else queues.CPU)


def _dispatch(build: Build) -> str:
    """Send the build's task message to the queue of its next step, once the current transaction
    commits. Each message carries a fresh token and only the newest may claim the build
    (build_claim), so re-sending never makes two runs. A message the broker did not take (Redis
    restarting) leaves `sent_at` empty and the sweep sends it again (builds_resend_unsent).
    Returns the queue."""
    queue, token = _next_queue(build), uuid.uuid4().hex
    Build.objects.filter(pk=build.pk).update(
        queue=queue, dispatch_token=token, dispatched_at=timezone.now(), sent_at=None
    )
    build.queue, build.dispatch_token = queue, token
    pk = build.pk
    transaction.on_commit(lambda: _send(pk, token, queue))
    return queue


def _send(build_id: int, token: str, queue: str) -> None:
    from .tasks import run_build_task

    try:
        run_build_task.apply_async(args=(build_id,), kwargs={"token": token}, queue=queue)
    except Exception:
        # Not the caller's failure (a web request, a finishing step): the build waits, unsent,
        # and a worker's sweep sends it once the broker answers again.
        log.exception("could not send build %s to the %s queue; a worker's sweep will retry", build_id, queue)
        return
    Build.objects.filter(pk=build_id, dispatch_token=token).update(sent_at=timezone.now())


# A queued build whose message was not taken by the broker this long after it was sent is sent
# again by the sweep (seconds); one the broker took but no longer holds, after LOST_AFTER.
RESEND_AFTER = 60
LOST_AFTER = 300


def builds_resend_unsent() -> list[int]:
    """Send again the queued builds whose message never reached the broker, builds queued before
    messages carried tokens (an upgrade: their message went to a queue no worker reads), and
    builds whose message the broker lost after taking it (a Redis restarted without its data):
    still waiting LOST_AFTER after it was sent while their queue holds no message at all."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=RESEND_AFTER)
    waiting = Build.objects.filter(status=Build.Status.QUEUED, requeue_requested_at__isnull=True)
    candidates = list(
        waiting.filter(
            Q(sent_at__isnull=True, dispatched_at__lt=cutoff)
            | Q(sent_at__isnull=True, dispatched_at__isnull=True, created_at__lt=cutoff)
        )
    )
    lost = list(waiting.filter(sent_at__lt=now - timedelta(seconds=LOST_AFTER)))
    if lost:
        from ops.broker import broker_probe

        state = broker_probe()
        # Only where the broker answered and the build's queue is empty: a message behind a long
        # build is still waiting, not lost.
        candidates += [b for b in lost if state.reachable and state.depths.get(b.queue, 1) == 0]
    sent = []
    for build in candidates:
        with transaction.atomic():
            # Conditional on what we saw: of two sweeping workers, one sends it.
            if Build.objects.filter(
                pk=build.pk, status=Build.Status.QUEUED, dispatch_token=build.dispatch_token
            ).update(dispatched_at=timezone.now()):
                _dispatch(build)
                sent.append(build.pk)
    return sent


def recipe_problems(project: Project, plan) -> list[str]:  # type: ignore[no-untyped-def]
    """What the project lacks for a recipe, as sentences a non-ML user can act on (before any
    build starts, rather than a failed step minutes later)."""
    from projects.models import Document, InstructionPair

    documents = project.documents.exclude(status=Document.Status.FAILED).exists()
    pairs = project.pairs.usable().filter(split=InstructionPair.Split.TRAIN).exists()
    problems = []
    if (plan.rag or plan.prune) and not documents and plan.tune != "raft":
        what = "answer from documents" if plan.rag else "prune (pruning measures what your documents need)"
        problems.append(f"To {what}, upload documents first.")
    if plan.tune == "raft" and not (documents and pairs):
        problems.append(
            "RAFT trains on your instruction pairs together with passages of your documents: it needs both."
        )
    if plan.tune == "lora" and not pairs:
        problems.append(
            "Fine-tuning learns from instruction pairs: import some on the Instruction pairs tab first."
        )
    if plan.tune == "distill" and not project.teachers.exists():
        problems.append("Distillation needs a teacher model: add one on the Teachers tab first.")
    return problems


# Which steps a "--set PREFIX.KEY=VALUE" reaches, and under which parameter. LoRA settings apply
# to RAFT and healing too: both train a LoRA adapter (heal.KEY sets healing alone).
SETTING_PREFIXES: dict[str, list[tuple[str, str | None]]] = {
    "lora": [("lora", "overrides"), ("raft", "overrides"), ("heal", "overrides"), ("distill", "overrides")],
    "raft": [("raft", "raft")],
    "rag": [("rag", None)],
    "prune": [("prune", None)],
    "distill": [("distill", None)],
    "heal": [("heal", "overrides")],
}


def step_settings(assignments: list[str]) -> dict[str, dict]:
    """`["lora.epochs=1", "rag.chunk_chars=500"]` → step params for build_start. Values stay
    strings; each step parses and checks its own (an unknown key fails the build with a message)."""
    params: dict[str, dict] = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        prefix, dot, key = name.strip().partition(".")
        if not (sep and dot and key) or prefix not in SETTING_PREFIXES:
            raise ValueError(
                f"“{assignment}” is not STEP.KEY=VALUE with STEP one of {', '.join(SETTING_PREFIXES)}."
            )
        for step, group in SETTING_PREFIXES[prefix]:
            target = params.setdefault(step, {})
            if group is None:
                target[key] = value.strip()
            else:
                target.setdefault(group, {})[key] = value.strip()
    return params


def build_cancel(*, build: Build) -> Build:
    """Ask a build to stop. Queued builds stop at once; running ones at their next check."""
    now = timezone.now()
    if Build.objects.filter(pk=build.pk, status=Build.Status.QUEUED).update(
        status=Build.Status.CANCELLED, cancel_requested_at=now, ended_at=now
    ):
        BuildLog.objects.create(build=build, message="Cancelled before it started.")
    elif Build.objects.filter(pk=build.pk, status=Build.Status.RUNNING).update(
        status=Build.Status.CANCELLING, cancel_requested_at=now
    ):
        BuildLog.objects.create(build=build, message="Cancel requested; stopping at the next safe point.")
    build.refresh_from_db()
    return build


def build_claim(*, build_id: int, worker: str, token: str | None = None) -> bool:
    """Move a queued build to running for this worker. False when it is not ours to run.

    One conditional UPDATE: of two deliveries of the same message, exactly one gets the row; a
    message older than the build's latest dispatch (`token`) gets none.
    """
    now = timezone.now()
    waiting = Build.objects.filter(pk=build_id, status=Build.Status.QUEUED)
    if token is not None:
        waiting = waiting.filter(dispatch_token=token)
    return bool(
        waiting.update(
            status=Build.Status.RUNNING,
            claimed_by=worker,
            attempts=F("attempts") + 1,
            # A resumed build keeps its first start time, so its duration covers every attempt.
            started_at=Coalesce(F("started_at"), Value(now)),
            heartbeat_at=now,
            requeue_requested_at=None,
        )
    )


def build_run(*, build_id: int, token: str | None = None) -> None:
    """Claim and run a build's steps in order; steps already done (before a lost worker) are kept.

    A step that prefers another queue than this worker consumes (training on a GPU worker while
    this one serves only `cpu`) is handed over: the build goes back to waiting, on that queue."""
    me = worker_id()
    if not build_claim(build_id=build_id, worker=me, token=token):
        log.info("build %s not claimable (already taken, finished, or sent again since); skipping", build_id)
        return
    build = Build.objects.select_related("project").get(pk=build_id)
    with log_context(build=build.pk, project=build.project.slug, worker=queues.node_name() or me):
        _build_run_claimed(build, me)


def _build_run_claimed(build: Build, me: str) -> None:
    started = build.steps.filter(status=BuildStep.Status.SUCCEEDED).exists()
    if build.attempts > 1:
        BuildLog.objects.create(build=build, message=f"Resuming (attempt {build.attempts}).")
    elif not started:
        BuildLog.objects.create(build=build, message="Build started.")
    # Each attempt gets BUILD_TIME_LIMIT; past it the running step stops at its next safe point
    # (a training step writes a checkpoint first) and the build ends as timed out. Celery's own
    # soft limit, a little later, is the backstop for a step that never reaches a safe point.
    deadline = time.monotonic() + settings.BUILD_TIME_LIMIT
    # A flag left by a SIGTERM that reached only this pool process (its parent kept consuming)
    # concerned the build it was running then, not this one.
    SHUTDOWN_REQUESTED.clear()
    step: BuildStep | None = None
    ctx: StepContext | None = None
    hardware = _hardware_summary()
    with _Heartbeat(build.pk, me):
        try:
            for step in build.steps.exclude(status=BuildStep.Status.SUCCEEDED):
                ctx = StepContext(build=build, step=step, deadline=deadline)
                ctx.check_cancel(force=True)  # a build cancelled meanwhile ends here, not on another queue
                queue = queues.route(STEP_QUEUES.get(step.name, queues.CPU))
                if not queues.serves(queue):
                    _build_hand_over(build, me, step)
                    return
                _remove_half_written(ctx.workdir)
                _step_started(step, hardware)
                with log_context(step=step.name):
                    metrics = STEP_RUNNERS[step.name](ctx)
                _step_finished(step, BuildStep.Status.SUCCEEDED, metrics)
            with transaction.atomic():
                versions = _versions_create(build)
                names = ", ".join(v.name for v in versions)
                _build_finished(
                    build, me, Build.Status.SUCCEEDED,
                    note=f"Build finished: {names} {'is' if len(versions) == 1 else 'are'} ready." if versions else "",
                )  # fmt: skip
        except (BuildCancelled, BuildInterrupted) as exc:
            # A step's own stop exception (TrainingStopped, ...) arrives as BuildCancelled; the
            # context knows why it was asked to stop.
            reason = exc.reason if isinstance(exc, BuildInterrupted) else (ctx.stop_reason if ctx else None)
            if reason == BuildInterrupted.SHUTDOWN:
                _build_requeue_for_shutdown(build, me, step)
            elif reason == BuildInterrupted.TIME_LIMIT:
                _build_timed_out(build, me, step)
            else:
                _step_finished(step, BuildStep.Status.CANCELLED)
                _build_finished(build, me, Build.Status.CANCELLED, note="Build cancelled.")
        except StepError as exc:
            _step_finished(step, BuildStep.Status.FAILED)
            _build_finished(build, me, Build.Status.FAILED, error=str(exc))
        except SoftTimeLimitExceeded:
            _build_timed_out(build, me, step)
        except Exception as exc:
            log.exception("build %s failed in step %s", build.pk, step)
            _step_finished(step, BuildStep.Status.FAILED)
            _build_finished(build, me, Build.Status.FAILED, error=_unexpected_error(exc, step))


def _hardware_summary() -> dict:
    from ops.hardware import machine

    hw = machine()
    return {"cores": hw["cores"], "gpu": hw["gpu"]}


def _build_hand_over(build: Build, worker: str, step: BuildStep) -> None:
    """Give the build back to the queue of `step` (this worker does not consume it). Not a new
    attempt: nothing went wrong."""
    with transaction.atomic():
        if not Build.objects.filter(pk=build.pk, claimed_by=worker, status=Build.Status.RUNNING).update(
            status=Build.Status.QUEUED, claimed_by="", attempts=F("attempts") - 1
        ):
            return
        queue = _dispatch(build)
        where = "a GPU worker" if queue == queues.GPU else "a CPU worker"
        BuildLog.objects.create(
            build=build,
            message=f"Step “{STEP_LABELS.get(step.name, step.name)}” runs on {where}: handed over to the "
            f"{queue} queue.",
        )
    log.info("build %s handed over to the %s queue for step %s", build.pk, queue, step.name)


def _remove_half_written(workdir: Path) -> None:
    """Delete what an earlier attempt of this step left half-written in its folder when its
    worker was killed: every writer here writes under a dot-name and renames into place, and
    no other process writes into this build's folders while we hold its claim."""
    if not workdir.is_dir():
        return
    for leftover in workdir.glob(".*"):
        log.info("removing %s, left half-written by an earlier attempt", leftover)
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _unexpected_error(exc: BaseException, step: BuildStep | None) -> str:
    """What the user reads when a step failed without a message of its own: disk full and out of
    memory say what to do about them; anything else names the error."""
    label = f"“{STEP_LABELS.get(step.name, step.name)}”" if step else "start-up"
    free = _free_megabytes(Path(settings.DATA_DIR))
    if _disk_full(exc, free):
        return (
            f"The disk is full: step {label} could not write its files under {settings.DATA_DIR}"
            + (f" ({free} MB free)" if free is not None else "")
            + ". Free some space there (delete old builds or model versions, or move DATA_DIR to a larger "
            "disk) and start the build again. Your documents, pairs and earlier models are untouched."
        )
    if _out_of_memory(exc):
        return (
            f"Step {label} ran out of memory. Start the build again with a smaller base model or recipe "
            "(for training, a lower lora.batch_tokens), or run the worker on a machine with more memory. "
            "Your documents, pairs and earlier models are untouched."
        )
    return f"Step {label} stopped with an unexpected error: {exc.__class__.__name__}: {exc}"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


# Below this much free space under DATA_DIR, a failed write is taken for a full disk: libraries
# do not all keep the errno (safetensors wraps it in its own error; torch.save says only "file
# write failed"), and a disk this full explains the failure either way.
DISK_FULL_BELOW_MB = 64


def _disk_full(exc: BaseException, free_mb: int | None) -> bool:
    for error in _chain(exc):
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error).lower()
        if "no space left on device" in text or "storagefull" in text:
            return True
    return free_mb is not None and free_mb < DISK_FULL_BELOW_MB


def _out_of_memory(exc: BaseException) -> bool:
    for error in _chain(exc):
        if isinstance(error, MemoryError) or (isinstance(error, OSError) and error.errno == errno.ENOMEM):
            return True
        # torch reports a failed allocation as a RuntimeError ("DefaultCPUAllocator: can't allocate
        # memory", "CUDA out of memory"); safetensors and llama.cpp's bindings with text of their own.
        text = str(error).lower()
        if any(
            phrase in text
            for phrase in (
                "can't allocate memory",
                "out of memory",
                "cannot allocate memory",
                "can't start new thread",
            )
        ):
            return True
    return False


def _free_megabytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free // 2**20
    except OSError:
        return None


def _build_timed_out(build: Build, worker: str, step: BuildStep | None) -> None:
    """End an attempt that ran past BUILD_TIME_LIMIT: the unfinished step goes back to waiting
    (its checkpoints stay in its work folder), so build_resume continues where it stopped."""
    hours = settings.BUILD_TIME_LIMIT / 3600
    limit = (
        f"{hours:g} hour{'s' if hours != 1 else ''}" if hours >= 1 else f"{settings.BUILD_TIME_LIMIT} seconds"
    )
    label = f" in step “{STEP_LABELS.get(step.name, step.name)}”" if step else ""
    _step_finished(step, BuildStep.Status.PENDING)
    _build_finished(
        build, worker, Build.Status.TIMED_OUT,
        error=(
            f"The build ran past its time limit of {limit} and stopped{label}, keeping what it had done "
            "(training keeps its last checkpoint). Resume it to continue from there, or raise "
            "BUILD_TIME_LIMIT."
        ),
    )  # fmt: skip


def _build_requeue_for_shutdown(build: Build, worker: str, step: BuildStep | None) -> None:
    """The worker is shutting down (a deploy): hand the build back to the queue. The attempt is
    not counted against BUILD_MAX_ATTEMPTS, since nothing went wrong with the build.

    No task message is sent from here: the worker that is stopping would still take it and run
    the rest of the build before it exits (measured with the embedded broker). The build keeps
    requeue_requested_at instead, and the next sweep of a running worker (or of this one after
    its restart) sends the message (builds_dispatch_requeued)."""
    _step_finished(step, BuildStep.Status.PENDING)
    with transaction.atomic():
        if not Build.objects.filter(pk=build.pk, claimed_by=worker, status__in=Build.ACTIVE).update(
            status=Build.Status.QUEUED,
            claimed_by="",
            requeue_requested_at=Coalesce(F("requeue_requested_at"), Value(timezone.now())),
            attempts=F("attempts") - 1,
        ):
            return
        BuildLog.objects.create(
            build=build, level="warning",
            message="The worker is shutting down (a restart or deploy): the build stopped at a safe point "
            "and is queued again; a running worker resumes it from there.",
        )  # fmt: skip


def builds_dispatch_requeued() -> list[int]:
    """Send the task message of each build a stopping worker handed back (see above)."""
    sent = []
    for pk, flagged in Build.objects.filter(
        status=Build.Status.QUEUED, requeue_requested_at__isnull=False
    ).values_list("pk", "requeue_requested_at"):
        # Conditional: of two sweeping workers, one sends it.
        with transaction.atomic():
            if Build.objects.filter(pk=pk, status=Build.Status.QUEUED, requeue_requested_at=flagged).update(
                requeue_requested_at=None
            ):
                _dispatch(Build.objects.get(pk=pk))
                sent.append(pk)
    return sent


def builds_reroute_stranded() -> list[int]:
    """Send again, to a queue someone consumes, the builds waiting in a queue no worker has
    consumed for QUEUE_FALLBACK_SECONDS (the only GPU worker is gone): they fall back to CPU
    workers rather than wait for one that may never come. A worker that is only restarting (a
    deploy) comes back within that time and keeps its work."""
    served = queues.served_queues()
    if not served:
        return []
    cutoff = timezone.now() - timedelta(seconds=settings.WORKER_STALE_SECONDS)
    moved = []
    for build in Build.objects.filter(
        status=Build.Status.QUEUED, requeue_requested_at__isnull=True, dispatched_at__lt=cutoff
    ).exclude(queue__in=[*served, ""]):
        with transaction.atomic():
            # Conditional on the token we saw: of two sweeping workers, one re-sends it.
            if Build.objects.filter(
                pk=build.pk, status=Build.Status.QUEUED, dispatch_token=build.dispatch_token
            ).update(dispatched_at=timezone.now()):
                was = build.queue
                queue = _dispatch(build)
                BuildLog.objects.create(
                    build=build, level="warning",
                    message=f"No worker consumes the {was} queue any more: sent to the {queue} queue instead.",
                )  # fmt: skip
                moved.append(build.pk)
    return moved


def build_resume(*, build: Build) -> Build:
    """Queue a timed-out build again; it continues from its last finished step and checkpoint."""
    with transaction.atomic():
        if Build.objects.filter(pk=build.pk, status=Build.Status.TIMED_OUT).update(
            status=Build.Status.QUEUED, error="", ended_at=None, claimed_by=""
        ):
            BuildLog.objects.create(build=build, message="Resumed: queued to continue where it stopped.")
            _dispatch(build)
    build.refresh_from_db()
    return build


def builds_stop_for_shutdown(*, pids: set[int]) -> list[int]:
    """Ask the builds that processes `pids` on this host are running to stop at their next safe
    point and go back to the queue (called by a worker receiving SIGTERM for its pool)."""
    host = socket.gethostname()
    claimed = [f"{host}:{pid}" for pid in pids]
    ids = list(
        Build.objects.filter(status=Build.Status.RUNNING, claimed_by__in=claimed).values_list("pk", flat=True)
    )
    if ids:
        Build.objects.filter(pk__in=ids, requeue_requested_at__isnull=True).update(
            requeue_requested_at=timezone.now()
        )
    return ids


@dataclass(frozen=True)
class Candidate:
    """A model a build produced, before it becomes a ModelVersion: what evaluate measures."""

    label: str  # the GGUF type: "q4_k_m", "f16", the bundled file's "q4_1"
    gguf: Path
    parent: Path | None  # the unquantized GGUF it was made from (KL divergence is against it)
    hf_dir: Path | None
    index_dir: Path | None


def build_candidates(build: Build, outputs: dict[str, Path]) -> list[Candidate]:
    """The models a build yields: one per quantized type; else the converted GGUF; else the
    base model's own GGUF (RAG over the bundled model)."""
    index, parent, hf_dir = outputs.get("index_dir"), outputs.get("parent_gguf"), outputs.get("hf_dir")
    quantized = [
        (name.removeprefix("gguf:"), path) for name, path in outputs.items() if name.startswith("gguf:")
    ]
    if quantized:
        return [Candidate(label, path, parent, hf_dir, index) for label, path in quantized]
    if parent is not None:
        return [Candidate(parent.stem.removeprefix("model-"), parent, None, hf_dir, index)]
    base = build.base or base_model_default()
    assert base.gguf_file is not None
    label = str(base.info.get("weights_format", "")).removeprefix("gguf:").lower()
    return [Candidate(label, base.gguf_file, None, base.hf_path, index)]


def _without_history(metrics: dict) -> dict:
    """A version keeps a training step's numbers, not its step-by-step loss curve (the build has it)."""
    return {k: v for k, v in metrics.items() if k != "history"}


def _versions_create(build: Build) -> list[ModelVersion]:
    """Record the models a finished build produced (once, even if the end is reached twice)."""
    try:
        if not recipe_plan(build.recipe).produces_model:
            return []
    except RecipeError:
        return []
    existing = list(build.model_versions.order_by("number"))
    if existing:
        return existing
    base = build.base or base_model_default()
    steps = list(build.steps.all())
    shared = {s.name: _without_history(s.metrics) for s in steps if s.name not in ("quantize", "evaluate")}
    per_type = {s.params.get("type"): s.metrics for s in steps if s.name == "quantize"}
    evaluation = next((s.metrics for s in steps if s.name == "evaluate"), {})
    evaluated = evaluation.get("models", {})
    number = build.project.model_versions.aggregate(n=Max("number"))["n"] or 0
    versions = []
    for n, c in enumerate(build_candidates(build, build_outputs(build)), start=number + 1):
        metrics = shared | ({"quantize": per_type[c.label]} if c.label in per_type else {})
        versions.append(
            ModelVersion.objects.create(
                project=build.project,
                build=build,
                number=n,
                recipe=build.recipe,
                base_model=f"{base.name}, {c.label.upper()}" if c.label else base.name,
                base=base,
                quant_type=c.label,
                gguf_path=stored_path(c.gguf),
                parent_gguf_path=stored_path(c.parent) if c.parent else "",
                hf_dir=stored_path(c.hf_dir) if c.hf_dir else "",
                index_dir=stored_path(c.index_dir) if c.index_dir else "",
                metrics=metrics
                | {"evaluate": evaluated.get(c.label, {})}
                | ({"baseline": evaluation["baseline"]} if evaluation.get("baseline") else {}),
            )
        )
    return versions


def _step_started(step: BuildStep, hardware: dict) -> None:
    step.status, step.started_at, step.ended_at = BuildStep.Status.RUNNING, timezone.now(), None
    step.worker, step.hardware = queues.node_name() or worker_id(), hardware
    step.save(update_fields=["status", "started_at", "ended_at", "worker", "hardware"])


def _step_finished(step: BuildStep | None, status: str, metrics: dict | None = None) -> None:
    if step is None or step.status != BuildStep.Status.RUNNING:
        return
    step.status, step.ended_at = status, timezone.now()
    fields = ["status", "ended_at"]
    if metrics is not None:
        step.metrics = metrics
        fields.append("metrics")
    step.save(update_fields=fields)


def _build_finished(build: Build, worker: str, status: str, *, error: str = "", note: str = "") -> None:
    # Guarded by claimed_by: if this worker was presumed dead and the build handed to another,
    # the other worker's outcome stands.
    updated = Build.objects.filter(pk=build.pk, claimed_by=worker, status__in=Build.ACTIVE).update(
        status=status, error=error, ended_at=timezone.now()
    )
    if updated:
        message = note or error or {Build.Status.SUCCEEDED: "Build finished."}.get(status, "")
        BuildLog.objects.create(build=build, level="error" if error else "info", message=message)


def build_fail(*, build_id: int, message: str) -> None:
    """Mark a build failed from outside its run (a task that crashed before it could)."""
    now = timezone.now()
    if (
        Build.objects.filter(pk=build_id)
        .exclude(status__in=Build.TERMINAL)
        .update(status=Build.Status.FAILED, error=message, ended_at=now)
    ):
        BuildStep.objects.filter(build_id=build_id, status=BuildStep.Status.RUNNING).update(
            status=BuildStep.Status.FAILED, ended_at=now
        )
        BuildLog.objects.create(build_id=build_id, level="error", message=message)


# --- Heartbeat and recovery ----------------------------------------------------------------


class _Heartbeat:
    """Touch the build's heartbeat from a background thread while a step runs.

    Steps report progress, but some work (loading a model, one long matrix product) blocks for
    a while without reporting; the thread keeps such a build from looking abandoned.
    """

    def __init__(self, build_id: int, worker: str) -> None:
        self.build_id, self.worker = build_id, worker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{build_id}")

    def __enter__(self) -> _Heartbeat:
        if settings.BUILD_HEARTBEAT_THREAD:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        try:
            while not self._stop.wait(settings.BUILD_HEARTBEAT_SECONDS):
                Build.objects.filter(pk=self.build_id, claimed_by=self.worker).update(
                    heartbeat_at=timezone.now()
                )
        except Exception:  # the run itself must never die because a heartbeat failed
            log.exception("heartbeat for build %s failed", self.build_id)
        finally:
            connection.close()


def builds_recover_stale() -> list[int]:
    """Find running builds whose worker is gone and re-queue them (or give up after N attempts).

    Called when a worker starts and periodically while it runs. A build is stale when its
    heartbeat is older than BUILD_STALE_SECONDS, or at once when the process that claimed it
    on this host has died (a worker restarted after `kill -9` need not wait for the timeout).
    """
    cutoff = timezone.now() - timedelta(seconds=settings.BUILD_STALE_SECONDS)
    requeued: list[int] = []
    for build in Build.objects.filter(status__in=Build.ACTIVE).filter(
        Q(heartbeat_at__lt=cutoff)
        | Q(heartbeat_at__isnull=True)
        | Q(claimed_by__startswith=f"{socket.gethostname()}:")
    ):
        if build.heartbeat_at and build.heartbeat_at >= cutoff and not worker_is_dead(build.claimed_by):
            continue
        if _build_requeue(build):
            requeued.append(build.pk)
    return requeued


def _build_requeue(build: Build) -> bool:
    # Guard on the state we saw, so two sweeping workers cannot both act on one build.
    same = Build.objects.filter(
        pk=build.pk, status=build.status, claimed_by=build.claimed_by, heartbeat_at=build.heartbeat_at
    )
    now = timezone.now()
    if build.status == Build.Status.CANCELLING:
        if same.update(status=Build.Status.CANCELLED, ended_at=now):
            _abandon_running_steps(build, BuildStep.Status.CANCELLED)
            BuildLog.objects.create(build=build, message="Build cancelled (its worker had stopped).")
        return False
    if build.attempts >= settings.BUILD_MAX_ATTEMPTS:
        message = (
            f"The build stopped {build.attempts} times without finishing because its worker was lost "
            "(for example killed for using too much memory). Try a smaller recipe, or check the "
            "worker's log."
        )
        if same.update(status=Build.Status.FAILED, error=message, ended_at=now):
            _abandon_running_steps(build, BuildStep.Status.FAILED)
            BuildLog.objects.create(build=build, level="error", message=message)
        return False
    # One transaction: the build waits again only with its new token, so a late copy of the lost
    # worker's message cannot claim it in between (and have its running step reset under it).
    with transaction.atomic():
        if not same.update(status=Build.Status.QUEUED, claimed_by="", requeue_requested_at=None):
            return False
        _abandon_running_steps(build, BuildStep.Status.PENDING)
        BuildLog.objects.create(
            build=build,
            level="warning",
            message="The worker running this build stopped; re-queued to resume.",
        )
        _dispatch(build)
    return True


def _abandon_running_steps(build: Build, status: str) -> None:
    BuildStep.objects.filter(build=build, status=BuildStep.Status.RUNNING).update(status=status)


# --- Keeping a version current ----------------------------------------------------------------


@dataclass(frozen=True)
class VersionChanges:
    """What changed in the project's documents since a version's index was built."""

    known: bool  # False: the version has no record of its sources (no index, or built before)
    added: list[str]  # document names
    removed: list[str]
    changed: list[str]  # same name, different content
    policy_changed: bool  # the redaction policy or name list changed, so the indexed text would

    @property
    def documents(self) -> int:
        return len(self.added) + len(self.removed) + len(self.changed)

    @property
    def any(self) -> bool:
        return self.documents > 0 or self.policy_changed

    def as_dict(self) -> dict:
        return {
            "known": self.known,
            "documents_changed": self.documents,
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "policy_changed": self.policy_changed,
        }


def version_sources(version: ModelVersion) -> dict | None:
    """What the version's index was built from (the rag step's sources.json), or None."""
    import json

    index = version.index_path
    if index is None:
        return None
    try:
        return json.loads((index / "sources.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def version_changes(*, version: ModelVersion) -> VersionChanges:
    """Documents added, removed and changed since `version` was built, and whether the redaction
    policy changed. A document counts as changed when a readable document of the same name now
    has other content (an upload of a new file under the same name); one that only moved from
    one name to another counts as removed and added. (An upload never replaces a document: new
    content under an indexed name counts as changed whether or not the old file was deleted.)"""
    from projects.models import Document
    from projects.privacy import redaction_fingerprint

    sources = version_sources(version)
    if sources is None:
        return VersionChanges(known=False, added=[], removed=[], changed=[], policy_changed=False)
    then = {d["sha256"]: d["name"] for d in sources.get("documents", [])}
    # Uploads still waiting to be read count: the refresh build reads them first.
    now = dict(
        version.project.documents.exclude(status=Document.Status.FAILED).values_list(
            "sha256", "original_name"
        )
    )
    gone = {sha: name for sha, name in then.items() if sha not in now}
    new = {sha: name for sha, name in now.items() if sha not in then}
    then_names, new_names = set(then.values()), set(new.values())
    return VersionChanges(
        known=True,
        added=sorted({name for name in new.values() if name not in then_names}),
        # By content: deleting one of two indexed files that share a name is still a removal;
        # a file whose name now holds new content is "changed", not removed.
        removed=sorted({name for name in gone.values() if name not in new_names}),
        changed=sorted({name for name in new.values() if name in then_names}),
        policy_changed=sources.get("redaction") != redaction_fingerprint(project=version.project),
    )


def version_refresh(*, version: ModelVersion, user: AbstractBaseUser | None) -> Build:
    """Build the version again from the project's current documents: the same recipe, base model
    and step settings as the build that made it. Unchanged passages come from the embedding
    cache, and the evaluate step carries over the numbers whose inputs did not change."""
    build = version.build
    params: dict[str, dict] = {}
    if build is not None:
        steps = list(build.steps.order_by("index"))
        names = [s.name for s in steps]
        # A step that occurs more than once (quantize, one per type) takes its settings from
        # the recipe itself; build_start would give every one of them the same settings.
        params = {s.name: dict(s.params) for s in steps if names.count(s.name) == 1}
    params["evaluate"] = params.get("evaluate", {}) | {"refresh_of": version.pk}
    return build_start(
        project=version.project,
        user=user,
        recipe=build.recipe if build is not None else version.recipe,
        base=build.base if build is not None else version.base,
        params=params,
    )
