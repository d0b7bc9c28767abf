"""The approach wizard: one question per screen, answers kept per project (leave and resume),
then one recommended recipe with its reasons, estimates and alternatives, and "Build model"."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from projects.http import project_context, project_or_404
from slmstudio.http import AuthenticatedRequest

from . import wizard
from .ml.advisor import APPROACHES, SCENARIOS
from .models import WizardState
from .recipes import recipe_label


@login_required
@require_http_methods(["GET", "POST"])
def wizard_page(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    state, _ = WizardState.objects.get_or_create(project=project)
    keys = [q["key"] for q in wizard.QUESTIONS]
    if request.method == "POST":
        key = request.POST.get("key", "")
        if key in keys:
            try:
                state.answers = state.answers | {
                    key: wizard.parse_answer(key, request.POST.get("answer", ""))
                }
            except ValueError:
                pass
            else:
                state.save(update_fields=["answers", "updated_at"])
        return redirect("training-wizard", slug=project.slug)
    asked = request.GET.get("q")
    pending = [k for k in keys if k not in state.answers]
    key = asked if asked in keys else (pending[0] if pending else None)
    context = project_context(request, project, "overview") | {
        "counts": wizard.project_situation(project, {}),
        "machine": wizard.machine(),
    }
    if key is not None:
        question = next(q for q in wizard.QUESTIONS if q["key"] == key)
        current = state.answers.get(key, wizard.question_defaults(project)[key])
        context |= {
            "question": question,
            "current": str(current),
            "number": keys.index(key) + 1,
            "total": len(keys),
            "previous": keys[keys.index(key) - 1] if keys.index(key) else None,
        }
        return render(request, "training/wizard.html", context)
    result = wizard.recommend_for(project, state.answers)
    recipe = ",".join(result["recipe"])
    context |= {
        "result": result,
        "recipe": recipe,
        "label": recipe_label(recipe),
        "scenario": SCENARIOS.get(result["scenario"] or ""),
        "approaches": [APPROACHES[a] | {"key": a} for a in APPROACHES],
        "answers": [
            (
                q["question"],
                {str(value): label for value, label in q["choices"]}.get(
                    str(state.answers.get(q["key"])), "–"
                ),
                q["key"],
            )
            for q in wizard.QUESTIONS
        ],
        "alternatives": [
            a | {"recipe_string": ",".join(a["recipe"]), "label_text": recipe_label(",".join(a["recipe"]))}
            for a in result["alternatives"]
        ],
    }
    return render(request, "training/wizard_result.html", context)


@login_required
@require_POST
def wizard_reset(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    project = project_or_404(request, slug)
    WizardState.objects.filter(project=project).update(answers={})
    return redirect("training-wizard", slug=project.slug)
