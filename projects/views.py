from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.db.models import Count, Q
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HTMX_STOP_POLLING

from slmstudio.http import AuthenticatedRequest

from . import services
from .forms import InviteForm, PairForm, PairImportForm, ProjectDeleteForm, ProjectForm
from .http import project_context, project_or_404
from .models import Document, InstructionPair, Membership, Project


@login_required
@require_GET
def home(request: AuthenticatedRequest) -> HttpResponse:
    projects = services.project_list_for_user(user=request.user).annotate(
        n_documents=Count("documents", filter=Q(documents__status=Document.Status.PARSED), distinct=True),
        n_pairs=Count("pairs", distinct=True),
    )
    return render(request, "projects/home.html", {"projects": projects})


@login_required
@require_http_methods(["GET", "POST"])
def project_new(request: AuthenticatedRequest) -> HttpResponse:
    form = ProjectForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        project = services.project_create(owner=request.user, **form.cleaned_data)
        return redirect(project)
    return render(request, "projects/project_new.html", {"form": form})


@login_required
@require_GET
def project_detail(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    documents = project.documents.aggregate(
        parsed=Count("pk", filter=Q(status=Document.Status.PARSED)),
        failed=Count("pk", filter=Q(status=Document.Status.FAILED)),
        waiting=Count("pk", filter=Q(status__in=[Document.Status.PENDING, Document.Status.PARSING])),
    )
    pairs = project.pairs.aggregate(
        train=Count("pk", filter=Q(split=InstructionPair.Split.TRAIN)),
        eval=Count("pk", filter=Q(split=InstructionPair.Split.EVAL)),
    )
    context = project_context(request, project, "overview") | {
        "documents": documents,
        "pairs": pairs,
        "has_data": documents["parsed"] + pairs["train"] + pairs["eval"] > 0,
        "has_documents": documents["parsed"] > 0,
        "latest_build": project.builds.first(),
        "latest_version": project.model_versions.first(),
    }
    return render(request, "projects/project_detail.html", context)


def _members_page(
    request: AuthenticatedRequest,
    project: Project,
    *,
    form: InviteForm | None = None,
    delete_form: ProjectDeleteForm | None = None,
    status: int = 200,
) -> HttpResponse:
    context = project_context(request, project, "members") | {
        "form": form or InviteForm(),
        "delete_form": delete_form or ProjectDeleteForm(project=project),
        "memberships": project.memberships.select_related("user").order_by("role", "user__username"),
    }
    return render(request, "projects/members.html", context, status=status)


@login_required
@require_http_methods(["GET", "POST"])
def members(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    form = InviteForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            membership = services.membership_invite(project=project, actor=request.user, **form.cleaned_data)
        except ValidationError as exc:
            form.add_error("username", exc)
        else:
            messages.success(request, f"{membership.user.get_username()} can now open this project.")
            return redirect("projects-members", slug=project.slug)
    return _members_page(request, project, form=form)


@login_required
@require_POST
def project_delete(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    # Before the form, so a member gets the same 403 whatever they typed.
    if services.membership_role(project=project, user=request.user) != Membership.Role.OWNER:
        raise PermissionDenied("Only a project owner can delete the project.")
    form = ProjectDeleteForm(request.POST, project=project)
    if form.is_valid():
        try:
            services.project_delete(project=project, actor=request.user)
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            messages.success(request, f"“{form.project.name}” was deleted, with all its data and files.")
            return redirect("projects-home")
    return _members_page(request, project, delete_form=form, status=400)


@login_required
@require_POST
def member_remove(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    project = project_or_404(request, slug)
    membership = get_object_or_404(Membership, pk=pk, project=project)
    try:
        services.membership_remove(project=project, actor=request.user, membership=membership)
    except (ValidationError, PermissionDenied) as exc:
        messages.error(request, " ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc))
    else:
        messages.success(request, f"{membership.user.get_username()} was removed.")
    if membership.user == request.user:
        return redirect("projects-home")
    return redirect("projects-members", slug=project.slug)


# --- Documents -----------------------------------------------------------------------------


@login_required
@require_GET
def documents(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    context = project_context(request, project, "documents") | {
        "documents": project.documents.all(),
        "max_upload_mb": settings.MAX_UPLOAD_BYTES // (1024 * 1024),
    }
    return render(request, "projects/documents.html", context)


@login_required
@require_POST
def documents_upload(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    """Store and parse uploaded files. Scripted uploads (one file per request) get the table rows
    back to insert; a plain form post is redirected to the list with messages."""
    project = project_or_404(request, slug)
    uploads = request.FILES.getlist("files")  # parses the body, running MaxSizeUploadHandler
    results: list[tuple[Document | None, str, str]] = []  # (document, name, problem)
    for name in getattr(request, "oversized_uploads", []):
        results.append((None, name, services.too_big_message(name)))
    for upload in uploads:
        try:
            added = services.document_add(
                project=project, stream=upload, name=upload.name, size=upload.size, user=request.user
            )
        except services.UploadRefused as exc:
            results.append((None, upload.name, str(exc)))
            continue
        if added.duplicate:
            results.append((added.document, upload.name, "already in this project (same content)"))
        else:
            services.document_schedule_parse(document=added.document)
            results.append((added.document, upload.name, ""))
    if not results:
        results.append((None, "", "No file was received. Choose one or more files to upload."))
    if request.headers.get("X-Upload") == "rows":
        status = 400 if all(doc is None for doc, _, _ in results) else 200
        return render(
            request, "projects/_upload_result.html", {"project": project, "results": results}, status=status
        )
    for doc, name, problem in results:
        if problem and doc is None:
            messages.error(request, problem)
        elif problem:
            messages.info(request, f"{name}: {problem}")
        else:
            messages.success(request, f"{name} uploaded.")
    return redirect("projects-documents", slug=project.slug)


@login_required
@require_GET
def document_row(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    """The row partial, polled while a document waits to be read; polling stops once it settles."""
    project = project_or_404(request, slug)
    document = get_object_or_404(Document, pk=pk, project=project)
    status = HTMX_STOP_POLLING if document.is_settled else 200
    return render(
        request, "projects/_document_row.html", {"project": project, "doc": document}, status=status
    )


@login_required
@require_GET
def document_detail(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    project = project_or_404(request, slug)
    document = get_object_or_404(Document, pk=pk, project=project)
    context = project_context(request, project, "documents") | {
        "doc": document,
        "parsed": services.document_parsed(document=document),
        "findings": document.pii_findings.filter(ignored=False).count() if document.pii_scanned_at else None,
    }
    return render(request, "projects/document_detail.html", context)


@login_required
@require_POST
def document_delete(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    project = project_or_404(request, slug)
    document = get_object_or_404(Document, pk=pk, project=project)
    services.document_delete(document=document)
    if request.htmx:
        return HttpResponse("")
    messages.success(request, f"{document.original_name} was deleted.")
    return redirect("projects-documents", slug=project.slug)


# --- Instruction pairs ---------------------------------------------------------------------


def _pairs_page(
    request: AuthenticatedRequest,
    project: Project,
    *,
    import_form: PairImportForm | None = None,
    pair_form: PairForm | None = None,
    report: services.PairsImported | None = None,
    status: int = 200,
) -> HttpResponse:
    split = request.GET.get("split", "")
    review = request.GET.get("review", "")
    pairs = project.pairs.select_related("document")
    if split in InstructionPair.Split.values:
        pairs = pairs.filter(split=split)
    if review in InstructionPair.Review.values:
        pairs = pairs.filter(review=review)
    page = Paginator(pairs, 50).get_page(request.GET.get("page"))
    context = project_context(request, project, "pairs") | {
        "page": page,
        "split": split,
        "review": review,
        "counts": project.pairs.aggregate(
            total=Count("pk"),
            train=Count("pk", filter=Q(split=InstructionPair.Split.TRAIN)),
            eval=Count("pk", filter=Q(split=InstructionPair.Split.EVAL)),
            pending=Count("pk", filter=Q(review=InstructionPair.Review.PENDING)),
            rejected=Count("pk", filter=Q(review=InstructionPair.Review.REJECTED)),
        ),
        "import_form": import_form or PairImportForm(),
        "pair_form": pair_form or PairForm(),
        "report": report,
    }
    return render(request, "projects/pairs.html", context, status=status)


@login_required
@require_http_methods(["GET", "POST"])
def pairs(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    """The pairs list; POST adds one pair from the form."""
    project = project_or_404(request, slug)
    if request.method == "GET":
        return _pairs_page(request, project)
    form = PairForm(request.POST)
    if form.is_valid():
        try:
            services.pair_create(project=project, **form.cleaned_data)
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            messages.success(request, "Pair added.")
            return redirect("projects-pairs", slug=project.slug)
    return _pairs_page(request, project, pair_form=form, status=400)


@login_required
@require_POST
def pairs_import(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    form = PairImportForm(request.POST, request.FILES)
    if getattr(request, "oversized_uploads", None):
        form.add_error("file", services.too_big_message(request.oversized_uploads[0]))
    if not form.is_valid():
        return _pairs_page(request, project, import_form=form, status=400)
    upload = form.cleaned_data["file"]
    report = services.pairs_import(project=project, data=upload.read(), filename=upload.name)
    return _pairs_page(request, project, report=report)


@login_required
@require_POST
def pairs_review(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    """Accept or reject the ticked pairs, or every pair still waiting for review."""
    project = project_or_404(request, slug)
    decision = request.POST.get("decision", "")
    if request.POST.get("scope") == "all-pending":
        ids = list(project.pairs.filter(review=InstructionPair.Review.PENDING).values_list("pk", flat=True))
    else:
        ids = [int(v) for v in request.POST.getlist("pair") if v.isdigit()]
    try:
        changed = services.pairs_review(project=project, pair_ids=ids, decision=decision)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        verb = "accepted" if decision == InstructionPair.Review.ACCEPTED else "rejected"
        messages.success(request, f"{changed} pair{'s' if changed != 1 else ''} {verb}.")
    return redirect(f"{reverse('projects-pairs', args=[project.slug])}?review={request.POST.get('back', '')}")


@login_required
@require_GET
def pairs_export(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    response = HttpResponse(
        services.pairs_export_jsonl(project=project), content_type="application/jsonl; charset=utf-8"
    )
    response["Content-Disposition"] = f'attachment; filename="{project.slug}-pairs.jsonl"'
    return response


@login_required
@require_http_methods(["GET", "POST"])
def pair_edit(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    project = project_or_404(request, slug)
    pair = get_object_or_404(InstructionPair, pk=pk, project=project)
    form = PairForm(request.POST or None, instance=pair)
    if request.method == "POST" and form.is_valid():
        try:
            services.pair_update(pair=pair, **form.cleaned_data)
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            messages.success(request, "Pair saved.")
            return redirect("projects-pairs", slug=project.slug)
    context = project_context(request, project, "pairs") | {"form": form, "pair": pair}
    return render(request, "projects/pair_edit.html", context)


@login_required
@require_POST
def pair_delete(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    project = project_or_404(request, slug)
    pair = get_object_or_404(InstructionPair, pk=pk, project=project)
    services.pair_delete(pair=pair)
    if request.htmx:
        return HttpResponse("")
    messages.success(request, "Pair deleted.")
    return redirect("projects-pairs", slug=project.slug)
