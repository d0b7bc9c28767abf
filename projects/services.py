"""Write-side operations on a team's data: projects, members, documents, instruction pairs.

Views, tasks and management commands call these; they call the Django-free parsing code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.text import slugify

from ops import queues
from slmstudio.lib.files import atomic_copy_stream, atomic_write_bytes, display_name, extension
from slmstudio.lib.workers import worker_id, worker_is_dead

from . import pairformats
from .models import Document, InstructionPair, Membership, Project
from .parsing import SUPPORTED_EXTENSIONS, ParsedDocument, ParseError, ParseTimeout, parse_file_isolated

log = logging.getLogger(__name__)


# --- Projects and members ------------------------------------------------------------------


def project_list_for_user(*, user: AbstractBaseUser) -> QuerySet[Project]:
    return Project.objects.filter(memberships__user=user)


def project_get_for_user(*, user: AbstractBaseUser, slug: str) -> Project:
    """The project if `user` is a member; Project.DoesNotExist otherwise (views turn it into 404)."""
    return project_list_for_user(user=user).get(slug=slug)


def _unique_slug(name: str) -> str:
    base = slugify(name)[:120] or "project"
    slug, n = base, 2
    while Project.objects.filter(slug=slug).exists():
        slug, n = f"{base}-{n}", n + 1
    return slug


@transaction.atomic
def project_create(*, name: str, owner: AbstractBaseUser, description: str = "") -> Project:
    name = name.strip()
    if not name:
        raise ValidationError("A project needs a name.")
    project = Project.objects.create(name=name, slug=_unique_slug(name), description=description)
    Membership.objects.create(project=project, user=owner, role=Membership.Role.OWNER)
    return project


def membership_role(*, project: Project, user: AbstractBaseUser) -> str | None:
    return Membership.objects.filter(project=project, user=user).values_list("role", flat=True).first()


def _require_owner(project: Project, actor: AbstractBaseUser) -> None:
    if membership_role(project=project, user=actor) != Membership.Role.OWNER:
        raise PermissionDenied("Only a project owner can manage members.")


def membership_invite(
    *, project: Project, actor: AbstractBaseUser, username: str, role: str = Membership.Role.MEMBER
) -> Membership:
    _require_owner(project, actor)
    User = get_user_model()
    try:
        user = User.objects.get(username=username.strip())
    except User.DoesNotExist:
        raise ValidationError(
            f"There is no user called “{username.strip()}”. They need to sign up first."
        ) from None
    if role not in Membership.Role.values:
        raise ValidationError("Unknown role.")
    try:
        with transaction.atomic():
            return Membership.objects.create(project=project, user=user, role=role)
    except IntegrityError:
        raise ValidationError(f"{user.get_username()} is already a member.") from None


def membership_remove(*, project: Project, actor: AbstractBaseUser, membership: Membership) -> None:
    _require_owner(project, actor)
    if (
        membership.role == Membership.Role.OWNER
        and project.memberships.filter(role=Membership.Role.OWNER).count() == 1
    ):
        raise ValidationError("A project needs at least one owner.")
    membership.delete()


# Jobs that write into a project's rows and folders while they run. projects imports nothing from
# training (dependencies point one way), so it reaches them through the reverse relations training
# declares, and asks each job model for its own TERMINAL statuses.
# (relation, what a job is called, the page where it is cancelled)
_PROJECT_JOBS = (("builds", "build", "Builds"), ("generation_runs", "pair generation", "Teachers"))


def _unfinished_jobs(project: Project) -> list[tuple[int, str, str]]:
    found = []
    for relation, label, page in _PROJECT_JOBS:
        jobs = getattr(project, relation)
        n = jobs.exclude(status__in=jobs.model.TERMINAL).count()
        if n:
            found.append((n, f"{n} {label}{'s' if n != 1 else ''}", page))
    return found


def _remove_folder(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError:
        # The rows are gone already; say where the files were so an administrator can remove them.
        log.exception("project deleted, but its folder %s could not be removed", path)


@transaction.atomic
def project_delete(*, project: Project, actor: AbstractBaseUser | None) -> None:
    """Delete a project and everything in it: its rows (documents, pairs, builds, model versions,
    conversations, teachers, recipes) and its files (the project's folder and its builds' folders).

    Owners only; `actor=None` is the server's operator (the `deleteproject` command), who holds the
    files anyway. Refused while a build or a pair generation is queued or running, because it would
    go on writing into what is being deleted: the user cancels it first.
    """
    if actor is not None and membership_role(project=project, user=actor) != Membership.Role.OWNER:
        raise PermissionDenied("Only a project owner can delete the project.")
    unfinished = _unfinished_jobs(project)
    if unfinished:
        them = "it" if sum(n for n, _, _ in unfinished) == 1 else "them"
        pages = " and ".join(page for _, _, page in unfinished)
        raise ValidationError(
            f"This project still has {' and '.join(text for _, text, _ in unfinished)} queued or running. "
            f"Cancel {them} on the {pages} page{'s' if len(unfinished) > 1 else ''} first, "
            "then delete the project."
        )
    # Build folders are DATA_DIR/builds/<build id> (training.steps.StepContext.workdir).
    builds_root = Path(settings.DATA_DIR) / "builds"
    folders = [project.data_dir] + [
        builds_root / str(pk) for pk in project.builds.values_list("pk", flat=True)
    ]
    project.delete()
    # Files go once the rows are committed: a failed delete must not leave rows without their files.
    transaction.on_commit(lambda: [_remove_folder(folder) for folder in folders])


# --- The data quality report -----------------------------------------------------------------

# The report is computed in `training` (it needs the embedding model), and projects must not
# import training. The task is looked up by name in Celery's registry rather than sent with
# `send_task`: a registered task honours CELERY_TASK_ALWAYS_EAGER and ops.queues' routing like
# every other task, where `send_task` would always go to the broker.
DATA_REPORT_TASK = "training.tasks.data_report_task"


def data_changed(*, project: Project) -> None:
    """Documents or pairs changed: mark the project's data report out of date and ask for a new
    one once the change is committed. The task skips work when the report is already newer than
    this mark, so a burst of uploads computes it about once."""
    now = timezone.now()
    Project.objects.filter(pk=project.pk).update(data_changed_at=now)
    project.data_changed_at = now
    project_id = project.pk
    transaction.on_commit(lambda: _send_data_report(project_id))


def _send_data_report(project_id: int) -> None:
    from celery import current_app

    task = current_app.tasks.get(DATA_REPORT_TASK)
    if task is None:
        # Task modules load lazily outside a worker: Celery's own autodiscovery imports them.
        current_app.loader.import_default_modules()
        task = current_app.tasks.get(DATA_REPORT_TASK)
    if task is None:  # an installation without the training app: nothing computes reports
        return
    try:
        queues.send(task, project_id)
    except Exception:  # a broker that does not answer must not fail the upload; Recompute retries
        log.exception("could not send the data report task for project %s", project_id)


# --- Documents -----------------------------------------------------------------------------


class UploadRefused(Exception):
    """A file refused before anything was stored; the message is for the user."""


@dataclass
class DocumentAdded:
    document: Document
    duplicate: bool


def document_add(
    *,
    project: Project,
    stream: BinaryIO,
    name: str,
    size: int | None,
    user: AbstractBaseUser | None = None,
) -> DocumentAdded:
    """Store an uploaded file under a generated name, de-duplicated by content.

    Returns the existing document (duplicate=True) when the project already holds the same bytes.
    """
    shown = display_name(name)
    if size is not None and size > settings.MAX_UPLOAD_BYTES:
        raise UploadRefused(too_big_message(shown))
    if extension(shown) not in SUPPORTED_EXTENSIONS:
        raise UploadRefused(
            f"{shown}: this type of file is not supported. "
            "Upload PDF, Word (.docx), HTML, Markdown, plain text or CSV."
        )
    document = Document(project=project, original_name=shown, uploaded_by=user)
    docs_dir = project.data_dir / "docs"
    incoming = docs_dir / f".incoming-{document.uid}"
    sha, stored_size = atomic_copy_stream(stream, incoming)
    if stored_size > settings.MAX_UPLOAD_BYTES:
        incoming.unlink(missing_ok=True)
        raise UploadRefused(too_big_message(shown))
    existing = project.documents.filter(sha256=sha).first()
    if existing:
        incoming.unlink(missing_ok=True)
        return DocumentAdded(existing, duplicate=True)
    document.sha256, document.size = sha, stored_size
    try:
        with transaction.atomic():
            document.save()
    except IntegrityError:
        # Another upload of the same bytes won the race between our check and our insert.
        incoming.unlink(missing_ok=True)
        return DocumentAdded(project.documents.get(sha256=sha), duplicate=True)
    os.replace(incoming, document.file_path)
    return DocumentAdded(document, duplicate=False)


def too_big_message(name: str) -> str:
    shown = display_name(name)
    limit_mb = settings.MAX_UPLOAD_BYTES // (1024 * 1024)
    return f"{shown} is larger than the {limit_mb} MB limit per file. Split it or compress images, then upload it again."


# Bounds on reading one document (PDFs are read in a child process; see parse_file_isolated).
# Inline parses run inside the upload request, so they get a short budget and a file that needs
# more goes to a worker instead of failing; the worker's budget stays under the task time limit.
PARSE_SECONDS = 300
PARSE_INLINE_SECONDS = 10
PARSE_MEMORY_BYTES = 1024 * 1024 * 1024


def document_schedule_parse(*, document: Document) -> None:
    """Parse small files now, so the user sees the result at once; hand larger or slow ones to a worker."""
    if document.size <= settings.PARSE_INLINE_MAX_BYTES:
        document_parse(document_id=document.pk, timeout_seconds=PARSE_INLINE_SECONDS, hand_off_slow=True)
        document.refresh_from_db()
        if document.status != Document.Status.PENDING:
            return
    from .tasks import parse_document_task

    transaction.on_commit(lambda: queues.send(parse_document_task, document.pk))


def document_parse(
    *,
    document_id: int,
    force: bool = False,
    timeout_seconds: float | None = None,
    hand_off_slow: bool = False,
) -> Document | None:
    """Parse one document and record the result. Returns None when someone else has it.

    The row is claimed with a conditional UPDATE so a task delivered twice parses once. With
    hand_off_slow, a parse that runs out of time puts the row back to pending (and returns None)
    rather than failing it, so a worker can try with the full budget.
    """
    claimable = [Document.Status.PENDING] + ([Document.Status.FAILED] if force else [])
    claimed = Document.objects.filter(pk=document_id, status__in=claimable).update(
        status=Document.Status.PARSING, parse_started_at=timezone.now(), parsing_by=worker_id(), error=""
    )
    if not claimed:
        return None
    document = Document.objects.select_related("project").get(pk=document_id)
    try:
        parsed = parse_file_isolated(
            document.file_path,
            document.original_name,
            timeout_seconds=PARSE_SECONDS if timeout_seconds is None else timeout_seconds,
            memory_bytes=PARSE_MEMORY_BYTES,
        )
    except ParseTimeout as exc:
        if hand_off_slow:
            Document.objects.filter(pk=document.pk, status=Document.Status.PARSING).update(
                status=Document.Status.PENDING
            )
            return None
        return _document_failed(document, str(exc))
    except ParseError as exc:
        return _document_failed(document, str(exc))
    except MemoryError:
        return _document_failed(document, "The file is too large to read on this server.")
    except Exception:
        log.exception("unexpected parser failure for document %s", document.pk)
        return _document_failed(
            document,
            "The file could not be read: it may be damaged. Try saving it again from the program "
            "that made it, or export it as PDF.",
        )
    atomic_write_bytes(document.parsed_path, json.dumps(parsed.to_dict()).encode())
    document.status = Document.Status.PARSED
    document.kind = parsed.kind
    document.title = parsed.title[:300]
    document.page_count = parsed.page_count
    document.section_count = len(parsed.sections)
    document.char_count = parsed.char_count
    document.parsed_at = timezone.now()
    document.save(
        update_fields=[
            "status", "kind", "title", "page_count", "section_count", "char_count", "parsed_at",
        ]
    )  # fmt: skip
    data_changed(project=document.project)
    return document


def _document_failed(document: Document, message: str) -> Document:
    document.status = Document.Status.FAILED
    document.error = message
    document.parsed_at = timezone.now()
    document.save(update_fields=["status", "error", "parsed_at"])
    data_changed(project=document.project)
    return document


def document_parsed(*, document: Document) -> ParsedDocument | None:
    try:
        return ParsedDocument.from_dict(json.loads(document.parsed_path.read_text()))
    except FileNotFoundError:
        return None


def document_delete(*, document: Document) -> None:
    project = document.project
    document.delete()
    data_changed(project=project)
    # After the row: a crash between the two leaves orphan files, never a row without its file.
    for path in (document.file_path, document.parsed_path):
        path.unlink(missing_ok=True)


def documents_reset_stale(*, documents: QuerySet[Document], stale_after: timedelta) -> int:
    """Hand parses whose process died (or that ran past `stale_after`) back to "pending"."""
    # A parse within its own time limit may just be slow (its worker, on another host, cannot be
    # checked): only one older than that limit is surely lost.
    cutoff = timezone.now() - max(stale_after, timedelta(seconds=PARSE_SECONDS + 60))
    reset = 0
    for doc in documents.filter(status=Document.Status.PARSING).only("parse_started_at", "parsing_by"):
        started = doc.parse_started_at
        if (started is None or started < cutoff) or worker_is_dead(doc.parsing_by):
            # Guarded by what we saw, so a parse that just finished is not handed back.
            reset += Document.objects.filter(
                pk=doc.pk, status=Document.Status.PARSING, parse_started_at=started
            ).update(status=Document.Status.PENDING)
    return reset


def documents_requeue_stale(*, stale_after: timedelta) -> list[int]:
    """Re-queue documents whose parse was lost (a killed worker, a message the broker dropped)."""
    from .tasks import parse_document_task

    documents_reset_stale(documents=Document.objects.all(), stale_after=stale_after)
    cutoff = timezone.now() - stale_after
    ids = list(
        Document.objects.filter(status=Document.Status.PENDING, created_at__lt=cutoff).values_list(
            "pk", flat=True
        )
    )
    if ids and _messages_waiting() >= len(ids):
        # As many messages wait as there are documents: theirs, most likely, behind a long job
        # (re-sending every sweep of every worker would flood the queue with copies).
        return []
    for pk in ids:
        queues.send(parse_document_task, pk)
    return ids


def _messages_waiting() -> int:
    """Task messages waiting in the broker (0 when it cannot be asked: then re-send)."""
    from ops.broker import broker_probe

    state = broker_probe()
    return sum(state.depths.values()) if state.reachable else 0


@dataclass
class IngestResult:
    added: int = 0
    duplicates: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)


def documents_ingest_paths(
    *, project: Project, paths: list[Path], user: AbstractBaseUser | None = None
) -> IngestResult:
    """Add files and folders (recursively) to a project and parse them: the `ingest` command."""
    result = IngestResult()
    for path in _expand_paths(paths):
        try:
            with path.open("rb") as fh:
                added = document_add(
                    project=project, stream=fh, name=path.name, size=path.stat().st_size, user=user
                )
        except (UploadRefused, OSError) as exc:
            result.failed.append({"path": str(path), "error": _error_text(exc)})
            continue
        if added.duplicate:
            result.duplicates += 1
            continue
        document = document_parse(document_id=added.document.pk) or added.document
        if document.status == Document.Status.PARSED:
            result.added += 1
        else:
            result.failed.append({"path": str(path), "error": document.error})
    return result


def _expand_paths(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            )
        else:
            files.append(path)
    return files


def _error_text(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "No such file."
    if isinstance(exc, PermissionError):
        return "Permission denied."
    return str(exc)


# --- Instruction pairs ---------------------------------------------------------------------


@dataclass
class PairsImported:
    added: int
    rejected: list[pairformats.RowError]
    train: int
    eval: int
    file_error: str | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "added": self.added,
            "rejected": [{"line": r.line, "error": r.error} for r in self.rejected],
            "train": self.train,
            "eval": self.eval,
        }


def pairs_import(*, project: Project, data: bytes, filename: str) -> PairsImported:
    """Validate a JSONL/CSV file line by line and add only the valid rows, all in one transaction."""
    existing = set(project.pairs.values_list("key", flat=True))
    report = pairformats.read_pairs(data, filename, existing_keys=existing)
    if report.file_error:
        return PairsImported(0, [], 0, 0, file_error=report.file_error)
    rows = [
        InstructionPair(
            project=project,
            instruction=p.instruction,
            input=p.input,
            response=p.response,
            key=p.key(),
            split=pairformats.split_for(p.key(), project.eval_fraction),
            source=InstructionPair.Source.UPLOADED,
        )
        for p in report.pairs
    ]
    with transaction.atomic():
        InstructionPair.objects.bulk_create(rows)
    if rows:
        data_changed(project=project)
    train = sum(r.split == InstructionPair.Split.TRAIN for r in rows)
    return PairsImported(len(rows), report.rejected, train, len(rows) - train)


def _validated_fields(instruction: str, input: str, response: str) -> tuple[str, str, str]:
    instruction, input, response = instruction.strip(), input.strip(), response.strip()
    errors = {}
    if not instruction:
        errors["instruction"] = "The instruction is empty."
    if not response:
        errors["response"] = "The response is empty."
    if errors:
        raise ValidationError(errors)
    return instruction, input, response


def pair_create(
    *,
    project: Project,
    instruction: str,
    input: str,
    response: str,
    source: str = InstructionPair.Source.MANUAL,
    notify: bool = True,
) -> InstructionPair:
    """Add one pair. notify=False leaves the data report alone: a job adding many (pair
    generation) asks for one report when it ends."""
    instruction, input, response = _validated_fields(instruction, input, response)
    key = pairformats.pair_key(instruction, input, response)
    if project.pairs.filter(key=key).exists():
        raise ValidationError("This pair is already in the project.")
    pair = InstructionPair.objects.create(
        project=project,
        instruction=instruction,
        input=input,
        response=response,
        key=key,
        split=pairformats.split_for(key, project.eval_fraction),
        source=source,
    )
    if notify:
        data_changed(project=project)
    return pair


def pair_update(*, pair: InstructionPair, instruction: str, input: str, response: str) -> InstructionPair:
    """Edit a pair's text. Its split stays as it was: an edit must not move an eval pair into training."""
    instruction, input, response = _validated_fields(instruction, input, response)
    key = pairformats.pair_key(instruction, input, response)
    if pair.project.pairs.filter(key=key).exclude(pk=pair.pk).exists():
        raise ValidationError("Another pair in the project has exactly this text.")
    pair.instruction, pair.input, pair.response, pair.key = instruction, input, response, key
    # Its findings point into the old text: gone, and the pair waits for a new scan (builds and
    # pairs_for_models scan it before reading it).
    pair.pii_scanned_at = None
    with transaction.atomic():
        pair.save(update_fields=["instruction", "input", "response", "key", "updated_at", "pii_scanned_at"])
        pair.pii_findings.all().delete()
    data_changed(project=pair.project)
    return pair


def pair_delete(*, pair: InstructionPair) -> None:
    pair.delete()
    data_changed(project=pair.project)


def pairs_review(*, project: Project, pair_ids: list[int], decision: str) -> int:
    """Accept or reject pairs (generated ones wait for this) in bulk; returns how many changed."""
    if decision not in (InstructionPair.Review.ACCEPTED, InstructionPair.Review.REJECTED):
        raise ValidationError("Accept or reject.")
    changed = project.pairs.filter(pk__in=pair_ids).exclude(review=decision).update(review=decision)
    if changed:
        data_changed(project=project)
    return changed


def pairs_export_jsonl(*, project: Project) -> str:
    return pairformats.pairs_to_jsonl(
        project.pairs.values("instruction", "input", "response", "split", "source")
    )


# --- Held-out document text ------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOutText:
    text: str
    paragraphs: int  # how many paragraphs it holds
    held_out: bool  # False: too little text to hold any out, so this is all of it


def paragraph_is_held_out(*, document: Document, section: int, paragraph: int, eval_fraction: float) -> bool:
    """Whether a paragraph is kept out of training for evaluation: a hash of the document's
    content and the paragraph's place, so it never changes and never leaks. Paragraphs rather than
    sections: a project of a few dozen sections would otherwise hold out a random handful."""
    key = hashlib.sha256(f"{document.sha256}:{section}:{paragraph}".encode()).hexdigest()
    return pairformats.split_for(key, eval_fraction) == "eval"


def _paragraphs(*, project: Project) -> Iterator[tuple[str, bool]]:
    """Every paragraph of the project's readable documents (a heading joins its first paragraph),
    with whether it is held out."""
    from .privacy import Redactor, document_for_models

    redactor = Redactor(project)
    for document in project.documents.filter(status=Document.Status.PARSED).order_by("pk"):
        parsed = document_for_models(document=document, redactor=redactor)
        if parsed is None:
            continue
        for s_index, section in enumerate(parsed.sections):
            blocks = [b.strip() for b in section.text.split("\n\n") if b.strip()]
            if section.heading:
                blocks = [section.heading + ("\n" + blocks[0] if blocks else "")] + blocks[1:]
            for p_index, block in enumerate(blocks):
                yield (
                    block,
                    paragraph_is_held_out(
                        document=document,
                        section=s_index,
                        paragraph=p_index,
                        eval_fraction=project.eval_fraction,
                    ),
                )


def documents_held_out_text(*, project: Project, min_chars: int = 2000) -> HeldOutText:
    """The project's held-out document text, measured the same way for every model version.

    A small project may hold out too little text to measure (under `min_chars`); then all of
    its text is used and `held_out` says so, rather than a perplexity over a dozen tokens.
    """
    paragraphs = list(_paragraphs(project=project))
    held = [text for text, held_out in paragraphs if held_out]
    if sum(len(t) for t in held) >= min_chars:
        return HeldOutText("\n\n".join(held), len(held), held_out=True)
    return HeldOutText("\n\n".join(t for t, _ in paragraphs), len(paragraphs), held_out=False)


def documents_training_text(*, project: Project) -> list[str]:
    """The paragraphs a build may learn or calibrate from: all but the held-out ones."""
    return [text for text, held_out in _paragraphs(project=project) if not held_out]
