from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HTMX_STOP_POLLING

from projects.http import project_context, project_or_404
from slmstudio.http import AuthenticatedRequest

from . import services
from .models import Build, ModelVersion
from .recipes import DEFAULT_RECIPE, RECIPES
from .steps import STEP_LABELS


@login_required
@require_GET
def builds(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    context = project_context(request, project, "builds") | {
        "recipes": RECIPES.values(),
        "builds": project.builds.select_related("created_by")[:100],
    }
    return render(request, "training/builds.html", context)


@login_required
@require_POST
def build_new(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    recipe = request.POST.get("recipe") or DEFAULT_RECIPE
    try:
        build = services.build_start(project=project, user=request.user, recipe=recipe)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect("training-builds", slug=project.slug)
    return redirect(build)


@login_required
@require_GET
def build_detail(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    """The build page. While it runs, htmx polls this same view for its `build-status` partial."""
    project = project_or_404(request, slug)
    build = get_object_or_404(Build, pk=pk, project=project)
    context = project_context(request, project, "builds") | {
        "build": build,
        "recipe": RECIPES.get(build.recipe),
        "version": ModelVersion.objects.filter(build=build).first(),
        "steps": [(step, STEP_LABELS.get(step.name, step.name)) for step in build.steps.all()],
        "logs": list(build.logs.order_by("-id")[:200])[::-1],
    }
    if request.htmx:
        status = HTMX_STOP_POLLING if build.is_terminal else 200
        return render(request, "training/build_detail.html#build-status", context, status=status)
    return render(request, "training/build_detail.html", context)


@login_required
@require_POST
def build_cancel(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    project = project_or_404(request, slug)
    build = get_object_or_404(Build, pk=pk, project=project)
    services.build_cancel(build=build)
    return redirect(build)
