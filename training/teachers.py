"""Teachers (a larger model that writes answers) and the background job in which a teacher writes
question/answer pairs from the project's documents.

The clients themselves are Django-free (`ml/teachers.py`); this module stores teachers (API keys
encrypted, never shown again), picks the passages to ask about, runs the job with bounded
concurrency towards the teacher, and files each answer as an instruction pair waiting for review.
A run that fails or is cancelled keeps what it wrote; the next run for the same teacher skips the
passages already answered, so nothing is generated twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from ops import queues
from projects.models import Document, InstructionPair, Project
from projects.privacy import RedactionRequired, Redactor, document_for_models, redaction_check
from projects.services import data_changed, pair_create
from slmstudio.lib import crypto
from slmstudio.lib.workers import worker_id

from .ml import base_models, netpolicy
from .models import GenerationRun, Teacher

log = logging.getLogger(__name__)

# What a teacher is asked to write per passage, and how long its answer may be.
GENERATION_MAX_TOKENS = 400
# How often a running job writes its counters and reads the cancel flag.
PROGRESS_EVERY = 1


def teacher_add(
    *,
    project: Project,
    name: str,
    user: AbstractBaseUser | None,
    endpoint: str = "",
    model: str = "",
    api_key: str = "",
    path: str = "",
    requests_per_minute: float | None = None,
    timeout_seconds: float = 60.0,
    max_concurrency: int = 2,
) -> Teacher:
    """Register a teacher: an OpenAI-compatible endpoint (`endpoint` + `model`) or a local HF
    folder / GGUF file (`path`). The API key is stored encrypted."""
    name = name.strip()
    if not name:
        raise ValidationError("Give the teacher a name.")
    if project.teachers.filter(name=name).exists():
        raise ValidationError(f"This project already has a teacher called “{name}”.")
    if bool(endpoint) == bool(path):
        raise ValidationError(
            "A teacher is either an endpoint (URL and model name) or a local path, not both."
        )
    if (
        timeout_seconds <= 0
        or max_concurrency < 1
        or (requests_per_minute is not None and requests_per_minute <= 0)
    ):
        raise ValidationError("Timeout, concurrency and rate limit must be positive.")
    teacher = Teacher(
        project=project, name=name, added_by=user, requests_per_minute=requests_per_minute,
        timeout_seconds=timeout_seconds, max_concurrency=max_concurrency,
    )  # fmt: skip
    if endpoint:
        endpoint = endpoint.strip().rstrip("/")
        if not endpoint.startswith(("http://", "https://")):
            raise ValidationError(
                "The endpoint is a URL starting with http:// or https://, e.g. http://host:8000/v1."
            )
        _check_endpoint(endpoint)
        if not model.strip():
            raise ValidationError("Name the model the endpoint should use.")
        teacher.kind, teacher.base_url, teacher.model_name = Teacher.Kind.ENDPOINT, endpoint, model.strip()
        teacher.api_key_encrypted = crypto.encrypt(api_key) if api_key else ""
    else:
        local = Path(path).expanduser().resolve()
        if local.is_dir() and any(local.glob("*.safetensors")):
            teacher.kind = Teacher.Kind.HF
        elif local.is_file() and local.suffix == ".gguf":
            teacher.kind = Teacher.Kind.GGUF
        else:
            _refuse_pickles(local)  # a pickle is named as such, not just as the wrong kind of file
            raise ValidationError(
                f"{path} is neither a folder with .safetensors weights nor a .gguf file on this server."
            )
        _check_teacher_model(local)
        teacher.path = str(local)
    teacher.save()
    return teacher


def endpoint_policy() -> netpolicy.EndpointPolicy:
    """Where teacher endpoints may be reached, from TEACHER_ENDPOINTS and TEACHER_ALLOWED_HOSTS."""
    return netpolicy.EndpointPolicy(
        mode=settings.TEACHER_ENDPOINTS, allowed_hosts=tuple(settings.TEACHER_ALLOWED_HOSTS)
    )


def _check_endpoint(url: str) -> None:
    """Refuse, at registration, an address the policy refuses now; requests check again later."""
    try:
        netpolicy.check_endpoint(url, endpoint_policy())
    except netpolicy.EndpointRefused as exc:
        raise ValidationError(str(exc)) from None


def _check_teacher_model(path: Path) -> None:
    """Refuse pickles and malformed model files when the teacher is added, not when a job loads it."""
    try:
        base_models.inspect_model(path)
    except (base_models.UnsafeModelFile, base_models.ModelUnavailable) as exc:
        raise ValidationError(str(exc)) from None


def _refuse_pickles(path: Path) -> None:
    try:
        base_models.refuse_pickles(path)
    except base_models.UnsafeModelFile as exc:
        raise ValidationError(str(exc)) from None


@contextmanager
def teacher_client(teacher: Teacher) -> Iterator:  # type: ignore[type-arg]
    """The Django-free client for a teacher, closed after use."""
    from .ml import teachers as ml

    if teacher.kind == Teacher.Kind.ENDPOINT:
        client = ml.EndpointTeacher(
            ml.EndpointConfig(
                base_url=teacher.base_url,
                model=teacher.model_name,
                api_key=crypto.decrypt(teacher.api_key_encrypted) if teacher.api_key_encrypted else None,
                timeout_seconds=teacher.timeout_seconds,
                requests_per_minute=teacher.requests_per_minute,
                max_concurrency=teacher.max_concurrency,
                policy=endpoint_policy(),
            )
        )
    elif teacher.kind == Teacher.Kind.GGUF:
        client = ml.GGUFTeacher(Path(teacher.path))
    else:
        client = ml.HFTeacher(Path(teacher.path))
    try:
        yield client
    finally:
        client.close()


def teacher_check(*, teacher: Teacher) -> dict:
    """ "Test connection": one small request; the outcome is kept on the teacher and returned."""
    from .ml import teachers as ml

    if teacher.kind == Teacher.Kind.ENDPOINT:
        try:
            with teacher_client(teacher) as client:
                result = client.check()
        except crypto.SecretUnreadable as exc:
            result = {"ok": False, "error": str(exc)}
    else:
        try:
            with teacher_client(teacher) as client:
                reply = client.complete([{"role": "user", "content": "Reply with OK."}], max_tokens=4)
            result = {"ok": True, "reply": reply}
        except (ml.TeacherError, OSError, ValueError) as exc:
            result = {"ok": False, "error": str(exc)}
    teacher.checked_at, teacher.check_ok = timezone.now(), bool(result.get("ok"))
    teacher.check_message = "" if result.get("ok") else str(result.get("error", ""))[:2000]
    teacher.save(update_fields=["checked_at", "check_ok", "check_message"])
    return result


# --- Passages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Passage:
    id: str  # the chunk id: "<document pk>-<n>"
    document_id: int
    title: str
    text: str


def generation_passages(*, project: Project, per_document: int) -> list[Passage]:
    """Up to `per_document` passages of every readable document, spread evenly over it (not
    just its first pages), in a fixed order: a resumed run sees the same list."""
    from .ml import rag

    passages: list[Passage] = []
    # A teacher is told only what the project's redaction policy lets out.
    redactor = Redactor(project)
    for document in project.documents.filter(status=Document.Status.PARSED).order_by("pk"):
        parsed = document_for_models(document=document, redactor=redactor)
        if parsed is None:
            continue
        title = parsed.title or document.original_name
        chunks = [c for c in rag.chunk_document(document.pk, title, parsed.sections) if len(c.text) >= 80]
        if not chunks:
            continue
        count = min(per_document, len(chunks))
        picks = (
            sorted({round(i * (len(chunks) - 1) / max(1, count - 1)) for i in range(count)})
            if count > 1
            else [0]
        )
        passages += [Passage(chunks[i].id, document.pk, title, chunks[i].text) for i in picks]
    return passages


# --- The job ----------------------------------------------------------------------------------


def generation_start(
    *, project: Project, teacher: Teacher, per_document: int, user: AbstractBaseUser | None
) -> GenerationRun:
    if teacher.project_id != project.pk:
        raise ValidationError("That teacher belongs to another project.")
    if not 1 <= per_document <= 100:
        raise ValidationError("Ask for 1 to 100 questions per document.")
    if not project.documents.filter(status=Document.Status.PARSED).exists():
        raise ValidationError("There are no readable documents to write questions about yet.")
    # Passages go to the teacher: a project that requires redaction is checked now, and again
    # by the run after scanning what is new.
    redaction_check(project=project, scan=False)
    run = GenerationRun.objects.create(
        project=project, teacher=teacher, per_document=per_document, created_by=user
    )
    from .tasks import generate_pairs_task

    transaction.on_commit(lambda: queues.send(generate_pairs_task, run.pk))
    return run


def generation_cancel(*, run: GenerationRun) -> GenerationRun:
    now = timezone.now()
    if GenerationRun.objects.filter(pk=run.pk, status=GenerationRun.Status.QUEUED).update(
        status=GenerationRun.Status.CANCELLED, cancel_requested_at=now, ended_at=now
    ):
        pass
    else:
        GenerationRun.objects.filter(pk=run.pk, status=GenerationRun.Status.RUNNING).update(
            cancel_requested_at=now
        )
    run.refresh_from_db()
    return run


def _already_done(teacher: Teacher) -> set[str]:
    """Passages any run of this teacher already answered (or found to duplicate a pair)."""
    done: set[str] = set()
    for ids in teacher.runs.values_list("done", flat=True):
        done.update(ids or [])
    return done


def generation_run(*, run_id: int) -> None:
    """Claim the run and ask the teacher about every passage not done yet; each answer becomes
    an instruction pair waiting for review. Counters are written as results arrive."""
    from .ml import teachers as ml

    me = worker_id()
    now = timezone.now()
    if not GenerationRun.objects.filter(pk=run_id, status=GenerationRun.Status.QUEUED).update(
        status=GenerationRun.Status.RUNNING, claimed_by=me, started_at=now, heartbeat_at=now
    ):
        return
    run = GenerationRun.objects.select_related("teacher", "project").get(pk=run_id)
    teacher, project = run.teacher, run.project
    try:
        redaction_check(project=project)
        passages = generation_passages(project=project, per_document=run.per_document)
        skip = _already_done(teacher)
        todo = [p for p in passages if p.id not in skip]
        GenerationRun.objects.filter(pk=run.pk).update(
            total=len(passages), done=sorted(skip & {p.id for p in passages})
        )
        run.refresh_from_db()

        def cancelled() -> bool:
            return GenerationRun.objects.filter(pk=run.pk, cancel_requested_at__isnull=False).exists()

        with teacher_client(teacher) as client:

            def ask(client: ml.TeacherClient, passage: Passage) -> tuple[str, str]:
                reply = client.complete(
                    ml.generation_messages(passage.title, passage.text), max_tokens=GENERATION_MAX_TOKENS
                )
                return ml.parse_generated_pair(reply)

            for passage, outcome in ml.map_bounded(
                client, todo, ask, max_concurrency=teacher.max_concurrency, should_stop=cancelled
            ):
                _record(run, teacher, passage, outcome)
        run.refresh_from_db()
        error = ""
        if cancelled():
            status = GenerationRun.Status.CANCELLED
        elif run.failed and not (run.added or run.duplicates):
            # Nothing usable came back: that is a failure, whatever the transport said.
            status = GenerationRun.Status.FAILED
            error = f"None of {teacher.name}'s replies could be used. The last problem: {run.last_error}"
        else:
            status = GenerationRun.Status.SUCCEEDED
        GenerationRun.objects.filter(pk=run.pk).update(
            status=status, ended_at=timezone.now(), error=error[:2000]
        )
        if run.added:  # one report for the run, not one per pair
            data_changed(project=project)
    except Exception as exc:  # the run must end with a state the page can show, whatever happened
        log.exception("generation run %s failed", run_id)
        message = (
            exc.messages[0]
            if isinstance(exc, RedactionRequired)
            else str(exc)
            if isinstance(exc, ml.TeacherError | crypto.SecretUnreadable)
            else (f"The generation stopped with an unexpected error: {exc.__class__.__name__}: {exc}")
        )
        GenerationRun.objects.filter(pk=run.pk).update(
            status=GenerationRun.Status.FAILED, ended_at=timezone.now(), error=message[:2000]
        )


def _record(run: GenerationRun, teacher: Teacher, passage: Passage, outcome: object) -> None:
    """File one teacher answer (in the job's own thread, never the client's)."""
    from .ml import teachers as ml

    counters: dict = {"heartbeat_at": timezone.now()}
    if isinstance(outcome, BaseException):
        counters["failed"] = F("failed") + 1
        counters["last_error"] = (
            str(outcome)
            if isinstance(outcome, ml.TeacherError | ValueError)
            else f"{outcome.__class__.__name__}: {outcome}"
        )[:2000]
        GenerationRun.objects.filter(pk=run.pk).update(**counters)
        if isinstance(outcome, ml.TeacherError) and getattr(outcome, "fatal", False):
            raise outcome  # the teacher refuses every request (a wrong key, URL or model)
        return
    question, answer = outcome  # type: ignore[misc]
    try:
        with transaction.atomic():
            pair = pair_create(
                project=run.project, instruction=question, input="", response=answer,
                source=InstructionPair.Source.GENERATED, notify=False,
            )  # fmt: skip
            InstructionPair.objects.filter(pk=pair.pk).update(
                review=InstructionPair.Review.PENDING, document_id=passage.document_id, passage=passage.text,
                passage_id=passage.id, origin=f"{teacher.name} (generation #{run.pk})",
            )  # fmt: skip
        counters["added"] = F("added") + 1
    except ValidationError:  # exactly this pair is already in the project
        counters["duplicates"] = F("duplicates") + 1
    with transaction.atomic():
        locked = GenerationRun.objects.select_for_update().get(pk=run.pk)
        GenerationRun.objects.filter(pk=run.pk).update(done=[*locked.done, passage.id], **counters)


def generation_runs_recover_stale() -> list[int]:
    """Runs a lost worker left behind: a queued run whose message was lost is sent again; a
    running run whose worker is gone ends as failed (its pairs stay; running again continues)."""
    from datetime import timedelta

    from django.conf import settings

    from slmstudio.lib.workers import worker_is_dead

    from .tasks import generate_pairs_task

    cutoff = timezone.now() - timedelta(seconds=settings.BUILD_STALE_SECONDS)
    touched: list[int] = []
    for run in GenerationRun.objects.filter(status=GenerationRun.Status.QUEUED, created_at__lt=cutoff):
        queues.send(generate_pairs_task, run.pk)  # claiming is conditional: a duplicate is harmless
        touched.append(run.pk)
    # A slow teacher may take minutes per answer (timeouts times retries); only a silence far
    # longer than that, or a worker known dead, means the run is lost.
    long_silence = timezone.now() - timedelta(seconds=10 * settings.BUILD_STALE_SECONDS)
    for run in GenerationRun.objects.filter(status=GenerationRun.Status.RUNNING):
        stale = run.heartbeat_at is None or run.heartbeat_at < long_silence
        if (stale or worker_is_dead(run.claimed_by)) and GenerationRun.objects.filter(
            pk=run.pk, status=GenerationRun.Status.RUNNING, heartbeat_at=run.heartbeat_at
        ).update(
            status=GenerationRun.Status.FAILED,
            ended_at=timezone.now(),
            error="The worker writing these pairs stopped. Run again to continue where it stopped.",
        ):
            touched.append(run.pk)
    return touched
