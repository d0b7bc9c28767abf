"""The decision matrix (training/ml/advisor.py): every row and scenario maps to its recipe."""

from __future__ import annotations

import pytest

from training.ml.advisor import SCENARIOS, Situation, missing_for, recommend
from training.recipes import recipe_plan


@pytest.mark.parametrize(
    ("situation", "recipe", "scenario"),
    [
        # Documents only: answer from them, compress to run on a CPU.
        (Situation(documents=40), "rag,quantize:q4_k_m,imatrix", "fastest-path"),
        # Pairs enough to train, no documents: LoRA.
        (Situation(pairs=300), "lora,quantize:q4_k_m", None),
        # Documents and pairs, accuracy first: RAFT.
        (Situation(documents=40, pairs=300), "rag,raft,quantize:q4_k_m,imatrix", None),
        # Documents and pairs, speed first: RAG + LoRA.
        (Situation(documents=40, pairs=300, priority="speed"), "rag,lora,quantize:q4_k_m,imatrix", None),
        # Size first on an edge device: the maximum-compression chain.
        (Situation(documents=40, pairs=300, priority="size", target="edge"),
         "rag,lora,prune,heal,quantize:q4_k_m,imatrix", "maximum-compression"),
        # A teacher and too few pairs: knowledge transfer.
        (Situation(pairs=10, teachers=1), "distill,quantize:q4_k_m", "knowledge-transfer"),
        # Budget first: no training at all.
        (Situation(documents=5, pairs=300, priority="budget"), "rag,quantize:q4_k_m", "fastest-path"),
        # Already fine-tuned, GPU server: compress gently.
        (Situation(has_finetuned_model=True, target="gpu"), "quantize:q8_0", None),
        # Privacy forbids the external teacher: train on the pairs instead.
        (Situation(pairs=300, teachers=1, teacher_allowed=False, priority="privacy"), "lora,quantize:q4_k_m", None),
    ],
)  # fmt: skip
def test_each_matrix_row_maps_to_its_recipe(situation: Situation, recipe: str, scenario: str | None):
    rec = recommend(situation)
    assert rec.recipe_string == recipe
    assert rec.scenario == scenario
    assert rec.why and all(isinstance(w, str) and w for w in rec.why)
    recipe_plan(rec.recipe_string)  # every recommendation is a recipe the builder accepts


def test_scenarios_are_valid_recipes_and_offered_as_alternatives():
    for scenario in SCENARIOS.values():
        recipe_plan(scenario["recipe"])
    rec = recommend(Situation(documents=40))
    keys = [a["scenario"] for a in rec.alternatives]
    assert "fastest-path" not in keys or rec.recipe_string != SCENARIOS["fastest-path"]["recipe"]
    distill = next(a for a in rec.alternatives if a["scenario"] == "knowledge-transfer")
    assert distill["possible"] is False and distill["missing"] == ["a teacher"]


def test_missing_data_is_named_in_plain_words():
    assert missing_for(["rag", "raft"], Situation()) == ["documents", "instruction pairs"]
    assert missing_for(["distill"], Situation(teachers=1)) == []
    with pytest.raises(ValueError, match="target is one of"):
        Situation(target="phone")


@pytest.mark.django_db
def test_estimates_use_what_this_machine_measured(project, owner):  # type: ignore[no-untyped-def]
    from django.utils import timezone

    from projects.services import pair_create
    from training.models import Build, BuildStep
    from training.wizard import estimate

    for i in range(60):
        pair_create(
            project=project, instruction=f"How do I reset pump {i}?", input="", response=f"Hold RESET {i} s."
        )
    before = estimate(project, "lora,quantize:q4_k_m")
    lora = next(s for s in before["steps"] if s["step"] == "lora")
    assert lora["basis"] == "reference" and before["is_estimate"]
    build = Build.objects.create(project=project, recipe="lora")
    now = timezone.now()
    BuildStep.objects.create(
        build=build, index=0, name="lora", status=BuildStep.Status.SUCCEEDED, started_at=now, ended_at=now,
        metrics={"tokens_per_second": 139.0 * 4},
    )  # fmt: skip
    after = next(s for s in estimate(project, "lora,quantize:q4_k_m")["steps"] if s["step"] == "lora")
    assert after["basis"] == "measured"
    assert after["seconds"] == pytest.approx(lora["seconds"] / 4, rel=0.01)  # four times the measured speed


@pytest.mark.django_db(transaction=True)
def test_recommend_command_prints_the_contract(project, tmp_path):  # type: ignore[no-untyped-def]
    import json
    from io import StringIO

    from django.core.management import call_command

    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"priority": "budget", "target": "cpu"}))
    out = StringIO()
    call_command("recommend", project.slug, "--answers", str(answers), stdout=out)
    printed = json.loads(out.getvalue())
    assert {"recipe", "why", "estimates", "alternatives"} <= set(printed)
    assert printed["recipe"] == ["quantize:q4_k_m"] and printed["estimates"]["is_estimate"]
    answers.write_text(json.dumps({"priority": "cheapest"}))
    out = StringIO()
    with pytest.raises(SystemExit):
        call_command("recommend", project.slug, "--answers", str(answers), stdout=out)
    assert "priority is one of" in json.loads(out.getvalue())["error"]


@pytest.mark.django_db
def test_the_wizard_asks_one_question_at_a_time_and_resumes(
    project, owner_client, django_capture_on_commit_callbacks
):  # type: ignore[no-untyped-def]
    from django.urls import reverse

    from training.models import WizardState

    url = reverse("training-wizard", args=[project.slug])
    page = owner_client.get(url).content.decode()
    assert "Question 1 of 6" in page and "Do you already have a model" in page
    owner_client.post(url, {"key": "has_finetuned_model", "answer": "False"})
    owner_client.post(url, {"key": "target", "answer": "edge"})
    # Left and come back: the next unanswered question, the earlier answers kept.
    assert "Question 3 of 6" in owner_client.get(url).content.decode()
    owner_client.post(url, {"key": "memory_limit_mb", "answer": "256"})
    owner_client.post(url, {"key": "target", "answer": "phone"})  # not a choice: ignored
    assert WizardState.objects.get(project=project).answers["target"] == "edge"
    for key, answer in (("teacher_allowed", "True"), ("priority", "budget"), ("hours", "0.25")):
        owner_client.post(url, {"key": key, "answer": answer})
    result = owner_client.get(url).content.decode()
    assert (
        "Our recommendation" in result and "Fastest path to production" in result and "Build model" in result
    )
    with django_capture_on_commit_callbacks(execute=False):
        owner_client.post(
            reverse("training-build-new", args=[project.slug]),
            {"recipe": "quantize:q4_k_m", "from_wizard": "1"},
        )
    build = project.builds.get()
    assert build.estimates["is_estimate"] and build.estimates["size_bytes"] > 0
    detail = owner_client.get(build.get_absolute_url()).content.decode()
    assert "Estimated" not in detail  # shown once a version exists, next to what it measured


@pytest.mark.django_db
def test_recipes_are_checked_against_the_project_in_plain_words(project, owner):  # type: ignore[no-untyped-def]
    from django.core.exceptions import ValidationError

    from training.services import build_start

    for recipe, message in [
        ("rag", "upload documents first"),
        ("lora", "import some on the Instruction pairs tab"),
        ("rag,raft", "it needs both"),
        ("distill", "add one on the Teachers tab"),
        ("prune", "pruning measures what your documents need"),
    ]:
        with pytest.raises(ValidationError, match=message):
            build_start(project=project, user=owner, recipe=recipe)
    assert not project.builds.exists()
    build_start(project=project, user=owner, recipe="quantize:q8_0")  # needs nothing from the project


def test_recipes_round_trip_through_yaml_and_are_validated():
    from training.recipe_files import recipe_from_yaml, recipe_to_yaml
    from training.recipes import RecipeError

    text = recipe_to_yaml(
        "Max", "rag,lora,prune,quantize:q4_k_m", ["lora.epochs=1", "prune.method=structured"]
    )
    assert "quantize:\n    type: q4_k_m" in text and "epochs: '1'" in text
    assert recipe_from_yaml(text) == (
        "Max",
        "rag,lora,prune,quantize:q4_k_m",
        ["lora.epochs=1", "prune.method=structured"],
    )
    for bad, message in [
        ("steps: [quantize: {type: q4_k_m}, lora]", "Quantize comes after every training"),
        ("steps: [rag, fly]", "Unknown recipe item"),
        ("steps: [quantize: {}]", "names its type"),
        ("name: x", "a list of steps"),
        ("steps: [: :", "not valid YAML"),
    ]:
        with pytest.raises(RecipeError, match=message):
            recipe_from_yaml(bad)


@pytest.mark.django_db
def test_a_saved_recipe_builds_and_exports(project, owner_client, django_capture_on_commit_callbacks):  # type: ignore[no-untyped-def]
    from django.urls import reverse

    from training.models import SavedRecipe

    yaml_text = "name: Quick\nsteps:\n  - quantize: {type: q8_0}\n"
    owner_client.post(reverse("training-recipe-save", args=[project.slug]), {"yaml": yaml_text})
    saved = SavedRecipe.objects.get(project=project)
    assert saved.recipe == "quantize:q8_0"
    page = owner_client.get(reverse("training-builds", args=[project.slug])).content.decode()
    assert "Quick" in page and "Maximum compression" in page
    assert (
        "q8_0"
        in owner_client.get(reverse("training-recipe-export", args=[project.slug, saved.pk])).content.decode()
    )
    with django_capture_on_commit_callbacks(execute=False):
        owner_client.post(reverse("training-recipe-build", args=[project.slug, saved.pk]))
    assert project.builds.get().recipe == "quantize:q8_0"
    bad = owner_client.post(
        reverse("training-recipe-save", args=[project.slug]), {"yaml": "steps: [fly]"}, follow=True
    )
    assert "Unknown recipe item" in bad.content.decode()
