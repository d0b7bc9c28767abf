"""Pruning builds on a tiny random Llama: the prune step through the CLI (its JSON contract),
structured pruning with healing, the comparison with the model before pruning, and the pages
that say what pruning did and did not do."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.urls import reverse
from safetensors.torch import load_file

from projects.models import InstructionPair
from projects.services import document_add, pair_create
from tests.tinymodels import make_tiny_llama
from training.models import Build, ModelVersion
from training.recipes import RecipeError, recipe_label, recipe_plan
from training.registry import base_model_register
from training.services import build_start

pytestmark = pytest.mark.django_db

MANUAL = "\n\n".join(
    f"## Part {i}\n\nTo reset the P-{i}00 pump, hold RESET for {i + 2} seconds. Error E-40{i}1 means low "
    "inlet pressure: open the inlet valve fully. Backups are kept for thirty days."
    for i in range(30)
)
PAIRS = [
    ("How do I reset the P-100 pump?", "Hold RESET for 3 seconds."),
    ("What does E-4011 mean?", "Low inlet pressure."),
    ("How do I reset the P-200 pump?", "Hold RESET for 4 seconds."),
    ("What does E-4021 mean?", "Low inlet pressure."),
    ("How long are backups kept?", "Thirty days."),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):  # type: ignore[no-untyped-def]
    return make_tiny_llama(
        tmp_path_factory.mktemp("tiny") / "tiny-llama",
        hidden=96,
        heads=6,
        kv_heads=2,
        intermediate=256,
        layers=4,
    )


@pytest.fixture
def data(project, settings):  # type: ignore[no-untyped-def]
    settings.EVAL_MAX_TOKENS = 128
    settings.EVAL_MAX_PAIRS = 2
    settings.EVAL_ANSWER_TOKENS = 8
    document_add(
        project=project, stream=SimpleUploadedFile("pump.md", MANUAL.encode()), name="pump.md", size=None
    )
    for i, (q, a) in enumerate(PAIRS):
        pair = pair_create(project=project, instruction=q, input="", response=a)
        pair.split = InstructionPair.Split.EVAL if i >= 3 else InstructionPair.Split.TRAIN
        pair.save()
    return project


def test_recipes_with_prune_and_heal():
    plan = recipe_plan("rag,lora,prune,quantize:q4_k_m")
    assert [s["name"] for s in plan.steps] == [
        "parse", "rag", "base", "lora", "prune", "convert", "quantize", "evaluate"
    ]  # fmt: skip
    assert plan.recipe == "rag,lora,prune,quantize:q4_k_m" and plan.prune and not plan.heal
    assert [s["name"] for s in recipe_plan("heal,prune").steps] == [
        "parse",
        "base",
        "prune",
        "heal",
        "convert",
        "evaluate",
    ]
    with pytest.raises(RecipeError, match="add the prune item"):
        recipe_plan("lora,heal")
    assert recipe_label("prune,heal") == "Pruned and healed"


def _cli_build(slug: str, *args: str) -> dict:
    out = StringIO()
    call_command("build", slug, "--base", "tiny-llama", "--wait", "--timeout", "600", *args, stdout=out)
    return json.loads(out.getvalue())


@pytest.mark.django_db(transaction=True)  # the command waits for the build a commit hands to the worker
def test_wanda_build_from_the_command_line(data, tiny_dir, client, owner):  # type: ignore[no-untyped-def]
    base_model_register(source=str(tiny_dir), name="Tiny Llama")
    printed = _cli_build(
        data.slug, "--recipe", "prune", "--set", "prune.method=wanda", "--set", "prune.sparsity=0.5",
        "--set", "prune.calibration_samples=8", "--set", "prune.calibration_length=32",
    )  # fmt: skip
    assert printed["status"] == "succeeded", printed.get("error")
    pruned = printed["metrics"]["prune"]
    assert pruned["method"] == "wanda" and abs(pruned["sparsity"] - 0.5) < 1e-3
    assert pruned["parameters_after"] == pruned["parameters_before"]  # unstructured: nothing removed
    assert pruned["nonzero_after"] < pruned["nonzero_before"] and pruned["shrinks_file"] is False
    assert pruned["calibration_windows"] == 8 and pruned["calibration_source"] == "documents"
    # The evaluation compares the pruned model with the one before pruning, measured the same way.
    evaluation = printed["metrics"]["evaluate"]
    baseline = evaluation["baseline"]
    assert baseline["kind"] == "unpruned" and baseline["perplexity"] is not None
    version = printed["model_versions"][0]
    measured = version["metrics"]["evaluate"]
    assert measured["perplexity"] is not None and measured["perplexity"] != baseline["perplexity"]
    # Zeros take the same room in a dense file.
    assert measured["size_bytes"] == baseline["size_bytes"]
    model = ModelVersion.objects.get(pk=version["model_version"])
    weights = load_file(str(next(model.hf_path.glob("*.safetensors"))))
    down = weights["model.layers.0.mlp.down_proj.weight"]
    assert int((down == 0).sum(dim=1).min()) == down.shape[1] // 2
    client.force_login(owner)
    text = client.get(reverse("inference-model-detail", args=[data.slug, model.number])).content.decode()
    assert "not</strong> smaller and not faster" in text and "Before pruning" in text
    assert "50% zeroed (wanda)" in client.get(reverse("inference-models", args=[data.slug])).content.decode()


def test_structured_prune_with_healing_shrinks_the_file(
    data, tiny_dir, owner, django_capture_on_commit_callbacks
):  # type: ignore[no-untyped-def]
    base = base_model_register(source=str(tiny_dir), name="Tiny Llama")
    params = {
        "prune": {
            "method": "structured",
            "target": "0.6",
            "calibration_samples": "8",
            "calibration_length": "32",
        },
        "heal": {"overrides": {"max_steps": "3", "batch_tokens": "256"}},
    }
    with django_capture_on_commit_callbacks(execute=True):
        build = build_start(project=data, user=owner, recipe="prune,heal", base=base, params=params)
    build.refresh_from_db()
    assert build.status == Build.Status.SUCCEEDED, build.error
    pruned = build.steps.get(name="prune").metrics
    assert pruned["shrinks_file"] and pruned["parameter_ratio"] < 0.7
    heal = build.steps.get(name="heal").metrics
    assert heal["steps"] == 3 and heal["pairs"] == 3 and heal["text_windows"] > 0
    assert "sparsity_restored" not in heal  # nothing was zeroed, so nothing to keep at zero
    evaluation = build.steps.get(name="evaluate").metrics
    (measured,) = evaluation["models"].values()
    assert measured["size_bytes"] < 0.8 * evaluation["baseline"]["size_bytes"]
    version = build.model_versions.get()
    assert version.hf_path is not None and version.hf_path.name == "merged"


def test_healing_keeps_unstructured_zeros(data, tiny_dir, owner, django_capture_on_commit_callbacks):  # type: ignore[no-untyped-def]
    base = base_model_register(source=str(tiny_dir), name="Tiny Llama")
    params = {
        "prune": {"method": "magnitude_2_4"},
        "heal": {"overrides": {"max_steps": "2", "batch_tokens": "256"}},
    }
    with django_capture_on_commit_callbacks(execute=True):
        build = build_start(project=data, user=owner, recipe="prune,heal", base=base, params=params)
    build.refresh_from_db()
    assert build.status == Build.Status.SUCCEEDED, build.error
    assert build.steps.get(name="heal").metrics["sparsity_restored"] == 0.5
    weights = load_file(str(next(build.model_versions.get().hf_path.glob("*.safetensors"))))
    up = weights["model.layers.1.mlp.up_proj.weight"]
    assert (up.reshape(up.shape[0], -1, 4) == 0).sum(dim=-1).eq(2).all()


def test_bad_pruning_settings_fail_the_build_with_a_message(
    data, tiny_dir, owner, django_capture_on_commit_callbacks
):  # type: ignore[no-untyped-def]
    base = base_model_register(source=str(tiny_dir), name="Tiny Llama")
    with django_capture_on_commit_callbacks(execute=True):
        build = build_start(
            project=data, user=owner, recipe="prune", base=base, params={"prune": {"method": "sparsegpt"}}
        )
    build.refresh_from_db()
    assert build.status == Build.Status.FAILED and "Unknown pruning method" in build.error


def test_the_build_form_asks_for_pruning(data, tiny_dir, owner_client):  # type: ignore[no-untyped-def]
    base_model_register(source=str(tiny_dir), name="Tiny Llama")
    page = owner_client.get(reverse("training-builds", args=[data.slug])).content.decode()
    assert "Make it smaller" in page and "do <strong>not</strong> make the downloadable file smaller" in page
    form = {
        "base": "tiny-llama", "rag": "1", "tune": "lora", "prune": "structured", "prune.target": "0.7",
        "prune.sparsity": "0.6", "heal": "1", "quantize": ["q8_0"],
    }  # fmt: skip
    owner_client.post(reverse("training-build-new", args=[data.slug]), form)
    build = data.builds.get()
    assert build.recipe == "rag,lora,prune,heal,quantize:q8_0"
    # The structured target reaches the step; the Wanda-only field does not.
    assert build.steps.get(name="prune").params == {"target": "0.7", "method": "structured"}
    owner_client.post(
        reverse("training-build-new", args=[data.slug]), {"base": "tiny-llama", "prune": "wanda_2_4"}
    )
    assert data.builds.order_by("-pk").first().recipe == "prune"
