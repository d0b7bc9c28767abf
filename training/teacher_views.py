"""The Teachers tab: register teachers, test their connection, and have one write question/answer
pairs from the project's documents (a background job whose progress the page polls)."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HTMX_STOP_POLLING

from projects.http import project_context, project_or_404
from slmstudio.http import AuthenticatedRequest

from . import teachers as services
from .models import GenerationRun, Teacher


def _float(value: str, default: float | None) -> float | None:
    try:
        return float(value) if value.strip() else default
    except ValueError:
        raise ValidationError(f"“{value}” is not a number.") from None


@login_required
@require_http_methods(["GET", "POST"])
def teachers(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    error = ""
    if request.method == "POST":
        post = request.POST
        kind = post.get("kind", "endpoint")
        if kind == "path" and not request.user.is_staff:
            # A path reads files on the server: the same rule as registering a base model.
            raise PermissionDenied
        try:
            teacher = services.teacher_add(
                project=project,
                name=post.get("name", ""),
                user=request.user,
                endpoint=post.get("endpoint", "") if kind == "endpoint" else "",
                model=post.get("model", "") if kind == "endpoint" else "",
                api_key=post.get("api_key", "") if kind == "endpoint" else "",
                path=post.get("path", "") if kind == "path" else "",
                requests_per_minute=_float(post.get("requests_per_minute", ""), None),
                timeout_seconds=_float(post.get("timeout_seconds", ""), 60.0) or 60.0,
                max_concurrency=int(_float(post.get("max_concurrency", ""), 2) or 2),
            )
        except ValidationError as exc:
            error = " ".join(exc.messages)
        else:
            messages.success(request, f"{teacher.name} is added. Test its connection before you use it.")
            return redirect("training-teachers", slug=project.slug)
    context = project_context(request, project, "teachers") | {
        "teachers": list(project.teachers.all()),
        "runs": list(project.generation_runs.select_related("teacher")[:20]),
        "error": error,
        "form": request.POST if error else {},
        "documents": project.documents.filter(status="parsed").count(),
    }
    return render(request, "training/teachers.html", context, status=400 if error else 200)


@login_required
@require_POST
def teacher_check(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    project = project_or_404(request, slug)
    teacher = get_object_or_404(Teacher, pk=pk, project=project)
    services.teacher_check(teacher=teacher)
    if request.htmx:
        return render(request, "training/teachers.html#teacher-row", {"project": project, "teacher": teacher})
    return redirect("training-teachers", slug=project.slug)


@login_required
@require_POST
def teacher_remove(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    project = project_or_404(request, slug)
    teacher = get_object_or_404(Teacher, pk=pk, project=project)
    name = teacher.name
    teacher.delete()  # the pairs it wrote stay; they keep its name in their origin
    messages.success(request, f"{name} is removed.")
    return redirect("training-teachers", slug=project.slug)


@login_required
@require_POST
def generation_new(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    teacher = get_object_or_404(Teacher, pk=request.POST.get("teacher") or 0, project=project)
    try:
        per_document = int(request.POST.get("per_document", "5") or 5)
        services.generation_start(
            project=project, teacher=teacher, per_document=per_document, user=request.user
        )
    except (ValidationError, ValueError) as exc:
        messages.error(request, " ".join(getattr(exc, "messages", [str(exc)])))
    return redirect("training-teachers", slug=project.slug)


@login_required
@require_GET
def generation_status(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    """The run's row, polled by htmx while it runs."""
    project = project_or_404(request, slug)
    run = get_object_or_404(GenerationRun, pk=pk, project=project)
    response = render(request, "training/teachers.html#run-row", {"project": project, "run": run})
    if run.is_terminal:
        response.status_code = HTMX_STOP_POLLING
    return response


@login_required
@require_POST
def generation_cancel(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    project = project_or_404(request, slug)
    run = get_object_or_404(GenerationRun, pk=pk, project=project)
    services.generation_cancel(run=run)
    return redirect("training-teachers", slug=project.slug)
