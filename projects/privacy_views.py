"""The Privacy page: what personal data and secrets the project's text holds, and what the
models get to see of them."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Count, Q
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from ops import queues
from slmstudio.http import AuthenticatedRequest

from . import pii, privacy, services
from .http import project_context, project_or_404
from .models import Document, Membership, PiiFinding, Project
from .services import document_parsed

CONTEXT_CHARS = 60


@login_required
@require_GET
def privacy_page(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    return render(request, "projects/privacy.html", _context(request, project))


@login_required
@require_GET
def privacy_status(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    """The scan status line, polled while a scan is under way."""
    project = project_or_404(request, slug)
    return render(request, "projects/privacy.html#scan-status", _context(request, project, findings=False))


@login_required
@require_POST
def privacy_policy(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    # The policy decides what leaves the team's data for models and teachers: owners set it.
    if services.membership_role(project=project, user=request.user) != Membership.Role.OWNER:
        raise PermissionDenied("Only the project's owners change its privacy policy.")
    policy = {t: request.POST.get(f"policy_{t}", "") for t in pii.TYPES}
    rescanned = privacy.redaction_update(
        project=project,
        policy=policy,
        require_redaction=request.POST.get("require_redaction") == "on",
        known_names_text=request.POST.get("known_names", "")[:20_000],
    )
    messages.success(
        request,
        "Saved. The next build uses this policy"
        + (
            ". Your documents and pairs are being scanned again for the names on your list."
            if rescanned
            else "."
        ),
    )
    return redirect("projects-privacy", slug=project.slug)


@login_required
@require_POST
def privacy_scan(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    from .tasks import scan_project_task

    project = project_or_404(request, slug)
    transaction.on_commit(lambda: queues.send(scan_project_task, project.pk))
    messages.info(request, "Scanning: findings appear here as documents and pairs are read.")
    return redirect("projects-privacy", slug=project.slug)


@login_required
@require_POST
def finding_ignore(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    project = project_or_404(request, slug)
    finding = get_object_or_404(PiiFinding, pk=pk, project=project)
    privacy.finding_set_ignored(finding=finding, ignored=request.POST.get("ignored") == "1")
    finding.refresh_from_db()
    if request.htmx:
        row = _rows(project, [finding], privacy.Redactor(project, allocate=False))[0]
        return render(request, "projects/privacy.html#finding-row", {"project": project, "row": row})
    return redirect("projects-privacy", slug=project.slug)


def _context(request: AuthenticatedRequest, project: Project, *, findings: bool = True) -> dict:
    summary = privacy.findings_summary(project=project)
    policy = pii.policy_with_defaults(project.redaction)
    pending = {
        "documents": project.documents.filter(
            status=Document.Status.PARSED, pii_scanned_at__isnull=True
        ).count(),
        "pairs": project.pairs.filter(pii_scanned_at__isnull=True).count(),
    }
    context = project_context(request, project, "privacy") | {
        "summary": summary,
        "pending": pending,
        "scan_pending": pending["documents"] + pending["pairs"] > 0,
    }
    if not findings:
        return context
    detector_names = _names_note(project)
    counts = summary["findings"]
    types = [
        {
            "code": code,
            "label": label,
            "count": counts.get(code, 0),
            "policy": policy[code],
            "example": {
                pii.KEEP: "unchanged",
                pii.MASK: pii.placeholder(code),
                pii.PSEUDONYM: pii.placeholder(code, 1),
            },
        }
        for code, label in pii.TYPES.items()
    ]
    selected_type = request.GET.get("type", "")
    rows = project.pii_findings.select_related("document", "pair").filter(
        Q(pair__isnull=False) | Q(document__status=Document.Status.PARSED)
    )
    if selected_type in pii.TYPES:
        rows = rows.filter(type=selected_type)
    document_id = request.GET.get("document", "")
    if document_id.isdigit():
        rows = rows.filter(document_id=int(document_id))
    pair_id = request.GET.get("pair", "")
    if pair_id.isdigit():
        rows = rows.filter(pair_id=int(pair_id))
    page = Paginator(rows, 50).get_page(request.GET.get("page"))
    by_document = (
        project.documents.filter(status=Document.Status.PARSED)
        .annotate(n=Count("pii_findings", filter=Q(pii_findings__ignored=False)))
        .filter(n__gt=0)
        .order_by("-n", "original_name")[:50]
    )
    by_pair = (
        project.pairs.annotate(n=Count("pii_findings", filter=Q(pii_findings__ignored=False)))
        .filter(n__gt=0)
        .order_by("-n", "pk")[:50]
    )
    return context | {
        "types": types,
        "policies": pii.POLICIES,
        "names_note": detector_names,
        "page": page,
        "rows": _rows(project, list(page.object_list), privacy.Redactor(project, allocate=False)),
        "selected_type": selected_type,
        "filtered": bool(selected_type or document_id or pair_id),
        "filter_query": "&".join(
            f"{k}={v}"
            for k, v in (("type", selected_type), ("document", document_id), ("pair", pair_id))
            if v
        ),
        "is_owner": context["role"] == Membership.Role.OWNER,
        "by_document": by_document,
        "by_pair": by_pair,
        "unredacted": summary["unredacted"],
    }


def _names_note(project: Project) -> dict:
    model = privacy.ner_model()
    return {
        "model": model,
        "names": len(privacy.known_names(project)),
    }


def _rows(project: Project, findings: list[PiiFinding], redactor: privacy.Redactor) -> list[dict]:
    """Each finding with its text around it, read from the original, and what models get instead."""
    parsed_cache: dict[int, object] = {}
    rows = []
    for finding in findings:
        text = _source_text(finding, parsed_cache)
        if text is None or finding.end > len(text):
            continue
        start, end = finding.start, finding.end
        before = text[max(0, start - CONTEXT_CHARS) : start]
        after = text[end : end + CONTEXT_CHARS]
        policy = redactor.policy.get(finding.type, pii.KEEP)
        replacement = redactor.apply(text[start:end], [_at_zero(finding)]) if not finding.ignored else None
        rows.append(
            {
                "finding": finding,
                "label": pii.TYPES.get(finding.type, finding.type),
                "before": ("…" if start > CONTEXT_CHARS else "") + before,
                "value": text[start:end],
                "after": after + ("…" if end + CONTEXT_CHARS < len(text) else ""),
                "becomes": replacement if replacement != text[start:end] else None,
                "policy": policy,
                "where": _where(finding, parsed_cache),
            }
        )
    return rows


def _at_zero(finding: PiiFinding) -> PiiFinding:
    return PiiFinding(
        project_id=finding.project_id,
        type=finding.type,
        digest=finding.digest,
        start=0,
        end=finding.end - finding.start,
        field=finding.field,
    )


def _source_text(finding: PiiFinding, cache: dict[int, object]) -> str | None:
    if finding.pair_id:
        return getattr(finding.pair, finding.field, None)
    document = finding.document
    if document.pk not in cache:
        cache[document.pk] = document_parsed(document=document)
    parsed = cache[document.pk]
    if parsed is None:
        return None
    if finding.field == "title":
        return parsed.title  # type: ignore[attr-defined]
    if finding.field == "name":
        return document.original_name
    sections = parsed.sections  # type: ignore[attr-defined]
    if finding.section is None or finding.section >= len(sections):
        return None
    return getattr(sections[finding.section], finding.field) or ""


def _where(finding: PiiFinding, cache: dict[int, object]) -> str:
    if finding.pair_id:
        return f"pair {finding.pair_id}, {finding.field}"
    if finding.field in ("title", "name"):
        return {"title": "title", "name": "file name"}[finding.field]
    parsed = cache.get(finding.document_id)
    section = parsed.sections[finding.section] if parsed is not None else None  # type: ignore[attr-defined]
    if section is not None and section.page:
        return f"page {section.page}"
    if section is not None and section.path:
        return " › ".join(section.path)[:80]
    return f"section {finding.section + 1}" if finding.section is not None else ""
