"""Personal data in a project: scanning documents and pairs, the findings, the redaction policy,
and the redacted text every model-facing reader gets.

The stored upload and the pair rows are never changed. What indexes, training, evaluation and
teacher prompts read comes from `document_for_models` and `pairs_for_models`, which apply the
project's policy to the stored findings at read time; so a policy can change later and the next
build follows it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Count, Max, Q, QuerySet
from django.utils import timezone

from . import pii
from .models import Document, InstructionPair, PiiFinding, Project, Pseudonym
from .parsing import ParsedDocument

PAIR_FIELDS = ("instruction", "input", "response")

_detectors: dict[tuple[tuple[str, ...], str | None], pii.Detector] = {}
_detectors_lock = threading.Lock()


def ner_model() -> str | None:
    """The spaCy pipeline names are found with: PII_NER_MODEL (a package name or a folder), else
    an installed English pipeline, else None (names then come from the project's list only)."""
    return getattr(settings, "PII_NER_MODEL", "") or pii.ner_model_installed()


def known_names(project: Project) -> tuple[str, ...]:
    return tuple(
        sorted({" ".join(line.split()) for line in project.known_names.splitlines() if line.strip()})
    )


def detector_for(project: Project) -> pii.Detector:
    key = (known_names(project), ner_model())
    with _detectors_lock:
        if key not in _detectors:
            if len(_detectors) > 32:  # one per name list; a long-lived worker sees many
                _detectors.clear()
            _detectors[key] = pii.Detector(known_names=key[0], ner_model=key[1])
        return _detectors[key]


# --- Scanning --------------------------------------------------------------------------------


def _finding_rows(project: Project, spans: Iterable[pii.Span], **where: object) -> list[PiiFinding]:
    return [
        PiiFinding(
            project=project,
            start=span.start,
            end=span.end,
            type=span.type,
            detector=span.detector[:80],
            score=span.score,
            digest=pii.digest(project.pii_salt, span.type, span.text),
            **where,
        )
        for span in spans
    ]


def _keep_ignored(project: Project, rows: list[PiiFinding]) -> None:
    """A value marked "not personal data" stays so wherever it turns up again: in a rescan, an
    edited pair, a new document."""
    digests = {row.digest for row in rows}
    if not digests:
        return
    ignored = set(
        PiiFinding.objects.filter(project=project, ignored=True, digest__in=digests).values_list(
            "type", "digest"
        )
    )
    for row in rows:
        if (row.type, row.digest) in ignored:
            row.ignored = True


def document_scan(*, document: Document, detector: pii.Detector | None = None) -> int:
    """Scan a parsed document's title, headings and text; replaces its earlier findings."""
    from .services import document_parsed

    project = document.project
    detector = detector or detector_for(project)
    rows: list[PiiFinding] = []
    parsed = document_parsed(document=document) if document.status == Document.Status.PARSED else None
    if parsed is not None:
        rows += _finding_rows(project, detector.detect(parsed.title), document=document, field="title")
        # A document without a title is called by its file name ("jane_doe_payslip.pdf").
        rows += _finding_rows(
            project, detector.detect(document.original_name), document=document, field="name"
        )
        for index, section in enumerate(parsed.sections):
            for field in ("heading", "text"):
                text = getattr(section, field) or ""
                rows += _finding_rows(
                    project, detector.detect(text), document=document, section=index, field=field
                )
    _replace_findings(project, rows, document, Document.objects.filter(pk=document.pk))
    return len(rows)


def pair_scan(*, pair: InstructionPair, detector: pii.Detector | None = None) -> int:
    project = pair.project
    detector = detector or detector_for(project)
    rows: list[PiiFinding] = []
    for field in PAIR_FIELDS:
        rows += _finding_rows(project, detector.detect(getattr(pair, field)), pair=pair, field=field)
    # Marked scanned only if unchanged since it was read: an edit meanwhile leaves it for the next scan.
    _replace_findings(
        project, rows, pair, InstructionPair.objects.filter(pk=pair.pk, updated_at=pair.updated_at)
    )
    return len(rows)


def _replace_findings(
    project: Project,
    rows: list[PiiFinding],
    owner: Document | InstructionPair,
    mark_scanned: QuerySet[Document] | QuerySet[InstructionPair],
) -> None:
    """The owner's findings become `rows`, and it is marked scanned."""
    _keep_ignored(project, rows)
    with transaction.atomic():
        # Two scans of the same row at once (a build, the report task) must not both insert.
        type(owner).objects.select_for_update().filter(pk=owner.pk).first()
        field = "document" if isinstance(owner, Document) else "pair"
        PiiFinding.objects.filter(**{field: owner}).delete()
        PiiFinding.objects.bulk_create(rows, batch_size=500)
        mark_scanned.update(pii_scanned_at=timezone.now())


@dataclass(frozen=True)
class ScanResult:
    documents: int  # scanned now
    pairs: int
    findings: int


def project_scan(
    *, project: Project, rescan: bool = False, progress: Callable[[int, int], None] | None = None
) -> ScanResult:
    """Scan what has not been scanned (everything, with `rescan`). Builds call this before
    reading text, so no build reads text its policy has not seen."""
    documents = project.documents.filter(status=Document.Status.PARSED)
    pairs = project.pairs.all()
    if not rescan:
        documents = documents.filter(pii_scanned_at__isnull=True)
        pairs = pairs.filter(pii_scanned_at__isnull=True)
    document_ids = list(documents.order_by("pk").values_list("pk", flat=True))
    pair_ids = list(pairs.order_by("pk").values_list("pk", flat=True))
    total = len(document_ids) + len(pair_ids)
    if not total:
        return ScanResult(0, 0, 0)
    detector = detector_for(project)
    found = done = 0
    for document in Document.objects.select_related("project").filter(pk__in=document_ids).order_by("pk"):
        found += document_scan(document=document, detector=detector)
        done += 1
        if progress:
            progress(done, total)
    for start in range(0, len(pair_ids), 500):
        for pair in InstructionPair.objects.select_related("project").filter(
            pk__in=pair_ids[start : start + 500]
        ):
            found += pair_scan(pair=pair, detector=detector)
            done += 1
            if progress and done % 50 == 0:
                progress(done, total)
    if progress:
        progress(total, total)
    return ScanResult(len(document_ids), len(pair_ids), found)


# --- Findings and policy ---------------------------------------------------------------------


def _active(project: Project) -> QuerySet[PiiFinding]:
    """Findings that count: not marked as false alarms, in documents still readable."""
    return project.pii_findings.filter(ignored=False).filter(
        Q(pair__isnull=False) | Q(document__status=Document.Status.PARSED)
    )


def findings_summary(*, project: Project) -> dict:
    """`scanpii`'s answer: findings by type, and how many documents and pairs were scanned."""
    by_type = dict(
        _active(project).values_list("type").annotate(n=Count("pk")).order_by("type").values_list("type", "n")
    )
    return {
        "findings": {t: by_type[t] for t in pii.TYPES if by_type.get(t)},
        "documents": project.documents.filter(
            status=Document.Status.PARSED, pii_scanned_at__isnull=False
        ).count(),
        "pairs": project.pairs.filter(pii_scanned_at__isnull=False).count(),
        "documents_with_findings": _active(project)
        .filter(document__isnull=False)
        .values("document")
        .distinct()
        .count(),
        "pairs_with_findings": _active(project).filter(pair__isnull=False).values("pair").distinct().count(),
        "unredacted": unredacted_findings(project=project).count(),
    }


def unredacted_findings(*, project: Project) -> QuerySet[PiiFinding]:
    """Findings kept as is in text models read: not in generated pairs waiting for review or
    rejected (no build reads those)."""
    policy = pii.policy_with_defaults(project.redaction)
    kept = [t for t, p in policy.items() if p == pii.KEEP]
    return (
        _active(project)
        .filter(type__in=kept)
        .exclude(
            pair__isnull=False,
            pair__review__in=[InstructionPair.Review.PENDING, InstructionPair.Review.REJECTED],
        )
    )


class RedactionRequired(ValidationError):
    """The project requires redaction and a finding is still kept as is."""

    def __init__(self, count: int) -> None:
        self.count = count
        super().__init__(
            f"This project requires redaction, and {count} finding{'s are' if count != 1 else ' is'} "
            "still kept as is. Mask or pseudonymise their types, or mark false alarms, on the "
            "Privacy page; then build again."
        )


def redaction_check(*, project: Project, scan: bool = True) -> None:
    """Raise RedactionRequired when the project requires redaction and a finding is kept.
    `scan` first scans what is new (a build does; a web request checks what is known)."""
    if not project.require_redaction:
        return
    if scan:
        project_scan(project=project)
    count = unredacted_findings(project=project).count()
    if count:
        raise RedactionRequired(count)


def redaction_update(
    *, project: Project, policy: dict[str, str], require_redaction: bool, known_names_text: str
) -> bool:
    """Save the policy. A changed name list changes what is found: every document and pair waits
    for a new scan, which the data report's task runs (and any build, before it reads text).
    Returns whether the name list changed."""
    from .services import data_changed

    clean = {t: p for t, p in policy.items() if t in pii.TYPES and p in pii.POLICIES}
    names_changed = " ".join(known_names_text.split()) != " ".join(project.known_names.split())
    with transaction.atomic():
        project.redaction = clean
        project.require_redaction = require_redaction
        project.known_names = known_names_text.strip()
        project.save(update_fields=["redaction", "require_redaction", "known_names"])
        if names_changed:
            project.documents.update(pii_scanned_at=None)
            project.pairs.update(pii_scanned_at=None)
        # The report counts what is kept as is: out of date either way.
        data_changed(project=project)
    return names_changed


def finding_set_ignored(*, finding: PiiFinding, ignored: bool) -> None:
    """Mark a finding, and every finding of the same value, as a false alarm (or not)."""
    from .services import data_changed

    PiiFinding.objects.filter(project_id=finding.project_id, type=finding.type, digest=finding.digest).update(
        ignored=ignored
    )
    data_changed(project=finding.project)


def redaction_fingerprint(*, project: Project) -> str:
    """Changes whenever the redacted text could change without a document changing: the
    policy, the name list, a false-alarm mark."""
    ignored = sorted(project.pii_findings.filter(ignored=True).values_list("type", "digest").distinct())
    payload = json.dumps(
        [pii.policy_with_defaults(project.redaction), known_names(project), ignored], sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --- Redacted text ---------------------------------------------------------------------------


def _pseudonym_number(project: Project, type_: str, digest: str) -> int:
    for _ in range(10):
        existing = Pseudonym.objects.filter(project=project, type=type_, digest=digest).values_list(
            "number", flat=True
        )
        if existing:
            return existing[0]
        number = (
            Pseudonym.objects.filter(project=project, type=type_).aggregate(n=Max("number"))["n"] or 0
        ) + 1
        try:
            with transaction.atomic():
                Pseudonym.objects.create(project=project, type=type_, digest=digest, number=number)
            return number
        except IntegrityError:  # another process took that number (or that value) first
            continue
    raise RuntimeError("Could not allocate a pseudonym number.")


class Redactor:
    """Applies a project's policy. One per build or job: it reads the project's pseudonym numbers
    once. With allocate=False (a page showing what a value would become) it never writes: a value
    without a number yet shows as [TYPE_n]."""

    def __init__(self, project: Project, *, allocate: bool = True) -> None:
        self.project = project
        self.allocate = allocate
        self.policy = pii.policy_with_defaults(project.redaction)
        self._numbers: dict[tuple[str, str], int] = {}
        if any(p == pii.PSEUDONYM for p in self.policy.values()):
            self._numbers = {
                (t, d): n for t, d, n in project.pseudonyms.values_list("type", "digest", "number")
            }

    @property
    def active(self) -> bool:
        return any(p != pii.KEEP for p in self.policy.values())

    def _number(self, type_: str, digest: str) -> int | str:
        key = (type_, digest)
        if key not in self._numbers:
            if not self.allocate:
                return "n"
            self._numbers[key] = _pseudonym_number(self.project, type_, digest)
        return self._numbers[key]

    def apply(self, text: str, findings: Iterable[PiiFinding]) -> str:
        replacements = []
        for finding in findings:
            if finding.ignored or finding.end > len(text):
                continue
            policy = self.policy.get(finding.type, pii.KEEP)
            new = pii.replacement_for(finding.type, policy, lambda f=finding: self._number(f.type, f.digest))
            if new is not None:
                replacements.append((finding.start, finding.end, new))
        return pii.redact(text, replacements) if replacements else text

    def document(self, document: Document, parsed: ParsedDocument) -> ParsedDocument:
        if not self.active:
            return parsed
        by_place: dict[tuple[int | None, str], list[PiiFinding]] = defaultdict(list)
        for finding in document.pii_findings.filter(ignored=False):
            by_place[(finding.section, finding.field)].append(finding)
        if not by_place:
            return parsed
        headings: dict[str, str] = {}
        sections = []
        for index, section in enumerate(parsed.sections):
            heading = section.heading
            if heading and by_place.get((index, "heading")):
                heading = self.apply(heading, by_place[(index, "heading")])
                headings[section.heading] = heading
            text = self.apply(section.text, by_place.get((index, "text"), ()))
            sections.append(replace(section, heading=heading, text=text))
        # A heading is also a step of its subsections' heading paths.
        sections = [replace(s, path=[headings.get(step, step) for step in s.path]) for s in sections]
        title = self.apply(parsed.title, by_place.get((None, "title"), ()))
        if not title.strip():
            # Readers call an untitled document by its file name, which may name someone.
            title = self.apply(document.original_name, by_place.get((None, "name"), ()))
        return replace(parsed, title=title, sections=sections)

    def pair_fields(
        self, pair: InstructionPair, findings: Iterable[PiiFinding] | None = None
    ) -> tuple[str, str, str]:
        fields = [pair.instruction, pair.input, pair.response]
        if not self.active:
            return fields[0], fields[1], fields[2]
        found = list(pair.pii_findings.filter(ignored=False) if findings is None else findings)
        out = [
            self.apply(text, [f for f in found if f.field == name])
            for text, name in zip(fields, PAIR_FIELDS, strict=True)
        ]
        return out[0], out[1], out[2]


def document_for_models(*, document: Document, redactor: Redactor | None = None) -> ParsedDocument | None:
    """A parsed document as models may read it: with the project's redaction applied."""
    from .services import document_parsed

    parsed = document_parsed(document=document)
    if parsed is None:
        return None
    if document.pii_scanned_at is None:
        document_scan(document=document)
    return (redactor or Redactor(document.project)).document(document, parsed)


@dataclass(frozen=True)
class PairText:
    pk: int
    instruction: str
    input: str
    response: str
    split: str

    @property
    def question(self) -> str:
        return "\n\n".join(filter(None, [self.instruction, self.input]))


def pairs_for_models(
    *, project: Project, split: str | None = None, limit: int | None = None, redactor: Redactor | None = None
) -> list[PairText]:
    """Usable pairs (accepted, in `split` if given), in a fixed order, redacted."""
    rows = project.pairs.usable().order_by("pk")
    if split is not None:
        rows = rows.filter(split=split)
    if limit is not None:
        rows = rows[:limit]
    pairs = list(rows)
    for pair in pairs:
        if pair.pii_scanned_at is None:
            pair_scan(pair=pair)
    redactor = redactor or Redactor(project)
    findings: dict[int, list[PiiFinding]] = defaultdict(list)
    if redactor.active and pairs:
        for finding in PiiFinding.objects.filter(pair_id__in=[p.pk for p in pairs], ignored=False):
            findings[finding.pair_id].append(finding)
    out = []
    for pair in pairs:
        instruction, input_, response = redactor.pair_fields(pair, findings.get(pair.pk, []))
        out.append(PairText(pair.pk, instruction, input_, response, pair.split))
    return out
