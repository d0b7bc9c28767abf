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

from . import registry, services
from .charts import loss_chart
from .models import BaseModel, Build, BuildStep, ModelVersion
from .recipes import DEFAULT_RECIPE, QUANTIZE_TYPES, recipe_label
from .steps import STEP_LABELS


@login_required
@require_GET
def builds(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    context = project_context(request, project, "builds") | {
        "quantize_types": QUANTIZE_TYPES.items(),
        "base_models": registry.base_models_list(),
        "teachers": list(project.teachers.all()),
        "saved_recipes": list(project.recipes.all()),
        "scenarios": _scenario_yaml(),
        "builds": project.builds.select_related("created_by", "base")[:100],
    }
    return render(request, "training/builds.html", context)


def _scenario_yaml() -> list[dict]:
    """The seed article's three scenarios as built-in recipes, shown as YAML to start from."""
    from .ml.advisor import SCENARIOS
    from .recipe_files import recipe_to_yaml

    return [s | {"yaml": recipe_to_yaml(s["label"], s["recipe"], [])} for s in SCENARIOS.values()]


@login_required
@require_POST
def build_new(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    """Start a build: a named recipe (`recipe`), or one put together from the form's choices."""
    project = project_or_404(request, slug)
    recipe = request.POST.get("recipe", "")
    if not recipe:
        types = request.POST.getlist("quantize")
        tune = request.POST.get("tune", "")
        prune = request.POST.get("prune", "")
        items = (
            (["rag"] if request.POST.get("rag") else [])
            + ([tune] if tune in ("lora", "raft", "distill") else [])
            + (["prune"] + (["heal"] if request.POST.get("heal") else []) if prune else [])
            + [f"quantize:{t}" for t in types]
            + (["imatrix"] if types and request.POST.get("imatrix") else [])
        )
        recipe = ",".join(items) or DEFAULT_RECIPE
    # The settings fields are "lora.KEY" / "prune.KEY"; empty ones keep the defaults. A pruning
    # field only counts for the method it belongs to.
    prune = request.POST.get("prune", "")
    relevant = (
        {"prune.target"} if prune == "structured" else {"prune.sparsity"} if prune == "wanda" else set()
    )
    if request.POST.get("tune") == "distill":
        relevant |= {"distill.teacher", "distill.mode"}
    settings = [
        f"{k}={v}" for k, v in request.POST.items() if v.strip() and (k.startswith("lora.") or k in relevant)
    ] + ([f"prune.method={prune}"] if prune else [])
    base = None
    if request.POST.get("base"):
        base = BaseModel.objects.filter(slug=request.POST["base"]).first()
        if base is None:
            messages.error(request, "That base model is no longer registered; pick another.")
            return redirect("training-builds", slug=project.slug)
    estimates: dict = {}
    if request.POST.get("from_wizard"):
        # Computed here before the build starts, not taken from the form: the build page later
        # sets them against what was measured.
        from .recipes import RecipeError
        from .wizard import estimate

        try:
            estimates = estimate(project, recipe)
        except RecipeError:
            estimates = {}
    try:
        build = services.build_start(
            project=project,
            user=request.user,
            recipe=recipe,
            base=base,
            params=services.step_settings(settings),
        )
    except ValidationError as exc:
        messages.error(request, _refusal(exc, project))
        return redirect("training-builds", slug=project.slug)
    if estimates:
        Build.objects.filter(pk=build.pk).update(estimates=estimates)
    return redirect(build)


@login_required
@require_GET
def build_detail(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    """The build page. While it runs, htmx polls this same view for its `build-status` partial."""
    project = project_or_404(request, slug)
    build = get_object_or_404(Build, pk=pk, project=project)
    context = project_context(request, project, "builds") | {
        "build": build,
        "recipe_label": recipe_label(build.recipe),
        "versions": list(ModelVersion.objects.filter(build=build).order_by("number")),
        "steps": [
            (step, _step_label(step), loss_chart(step.metrics["history"], step.metrics.get("total_steps")))
            if step.metrics.get("history")
            else (step, _step_label(step), None)
            for step in build.steps.all()
        ],
        "logs": list(build.logs.order_by("-id")[:200])[::-1],
    }
    if request.htmx:
        status = HTMX_STOP_POLLING if build.is_terminal else 200
        return render(request, "training/build_detail.html#build-status", context, status=status)
    return render(request, "training/build_detail.html", context)


def _step_label(step: BuildStep) -> str:
    label = STEP_LABELS.get(step.name, step.name)
    if step.name == "quantize":
        return f"{label} to {step.params.get('type', '').upper()}"
    if step.name == "convert":
        return f"{label} ({step.params.get('type', 'f16').upper()})"
    return label


@login_required
@require_POST
def build_cancel(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    project = project_or_404(request, slug)
    build = get_object_or_404(Build, pk=pk, project=project)
    services.build_cancel(build=build)
    return redirect(build)


@login_required
@require_POST
def build_resume(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    project = project_or_404(request, slug)
    build = get_object_or_404(Build, pk=pk, project=project)
    services.build_resume(build=build)
    return redirect(build)


# --- Base models ---------------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def base_models(request: AuthenticatedRequest) -> HttpResponse:
    """The models builds start from. Staff register more: a folder or GGUF file on the server,
    or a hub id when the server is online."""
    error = ""
    if request.method == "POST":
        if not request.user.is_staff:
            raise PermissionDenied
        try:
            base = registry.base_model_register(
                source=request.POST.get("source", ""),
                name=request.POST.get("name", "").strip(),
                user=request.user,
            )
        except ValidationError as exc:
            error = " ".join(exc.messages)
        else:
            messages.success(request, f"{base.name} is registered; builds can start from it.")
            return redirect(base)
    context = {
        "base_models": registry.base_models_list(),
        "error": error,
        "source": request.POST.get("source", ""),
    }
    return render(request, "training/base_models.html", context)


@login_required
@require_GET
def base_model_detail(request: AuthenticatedRequest, base: str) -> HttpResponse:
    registry.base_model_default()
    model = get_object_or_404(BaseModel, slug=base)
    return render(request, "training/base_model_detail.html", {"base": model, "info": model.info})


@login_required
@require_POST
def base_model_remove(request: AuthenticatedRequest, base: str) -> HttpResponse:
    if not request.user.is_staff:
        raise PermissionDenied
    model = get_object_or_404(BaseModel, slug=base)
    try:
        registry.base_model_remove(model)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect(model)
    messages.success(request, f"{model.name} is no longer registered.")
    return redirect("training-base-models")


# --- Saved recipes ---------------------------------------------------------------------------


@login_required
@require_POST
def recipe_save(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    """Save a recipe from YAML (pasted in the advanced view, or an uploaded file)."""
    from .models import SavedRecipe
    from .recipe_files import recipe_from_yaml
    from .recipes import RecipeError

    project = project_or_404(request, slug)
    upload = request.FILES.get("file")
    text = upload.read().decode("utf-8", "replace") if upload else request.POST.get("yaml", "")
    try:
        name, recipe, settings = recipe_from_yaml(text)
        services.step_settings(settings)  # the same check `--set` gets
    except (RecipeError, ValueError) as exc:
        messages.error(request, str(exc))
        return redirect("training-builds", slug=project.slug)
    SavedRecipe.objects.update_or_create(
        project=project, name=name, defaults={"recipe": recipe, "settings": settings}
    )
    messages.success(request, f"Recipe “{name}” saved.")
    return redirect("training-builds", slug=project.slug)


@login_required
@require_GET
def recipe_export(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    from .models import SavedRecipe
    from .recipe_files import recipe_to_yaml

    project = project_or_404(request, slug)
    saved = get_object_or_404(SavedRecipe, pk=pk, project=project)
    response = HttpResponse(
        recipe_to_yaml(saved.name, saved.recipe, saved.settings),
        content_type="application/yaml; charset=utf-8",
    )
    response["Content-Disposition"] = f'attachment; filename="{project.slug}-recipe-{saved.pk}.yaml"'
    return response


@login_required
@require_POST
def recipe_build(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    from .models import SavedRecipe

    project = project_or_404(request, slug)
    saved = get_object_or_404(SavedRecipe, pk=pk, project=project)
    try:
        build = services.build_start(
            project=project,
            user=request.user,
            recipe=saved.recipe,
            params=services.step_settings(saved.settings),
        )
    except ValidationError as exc:
        messages.error(request, _refusal(exc, project))
        return redirect("training-builds", slug=project.slug)
    return redirect(build)


@login_required
@require_POST
def recipe_delete(request: AuthenticatedRequest, slug: str, pk: int) -> HttpResponse:
    from .models import SavedRecipe

    project = project_or_404(request, slug)
    get_object_or_404(SavedRecipe, pk=pk, project=project).delete()
    return redirect("training-builds", slug=project.slug)


def _refusal(exc: ValidationError, project) -> str:  # type: ignore[no-untyped-def]
    """Why a build did not start; a redaction refusal links to the findings."""
    from django.urls import reverse
    from django.utils.html import format_html

    from projects.privacy import RedactionRequired

    text = " ".join(exc.messages)
    if isinstance(exc, RedactionRequired):
        return format_html(
            '{} <a href="{}">See the findings</a>.', text, reverse("projects-privacy", args=[project.slug])
        )
    return text
