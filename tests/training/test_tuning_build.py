"""Fine-tuning builds on a tiny random Llama: lora and raft steps, live loss history, settings
from the CLI, cancel, and picking training up again from the last checkpoint."""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.urls import reverse

from projects.models import InstructionPair
from projects.services import document_add, pair_create
from tests.tinymodels import make_tiny_llama
from training import tuning
from training.models import Build
from training.registry import base_model_register
from training.services import build_start
from training.steps import BuildCancelled, StepContext

pytestmark = pytest.mark.django_db

MANUAL = "\n\n".join(
    f"## Part {i}\n\nTo reset the P-{i}00 pump, hold RESET for {i + 2} seconds. Error E-40{i}1 means low "
    "inlet pressure: open the inlet valve fully."
    for i in range(12)
)
PAIRS = [
    ("How do I reset the P-100 pump?", "Hold RESET for 3 seconds."),
    ("What does E-4011 mean?", "Low inlet pressure."),
    ("How do I reset the P-200 pump?", "Hold RESET for 4 seconds."),
    ("What does E-4021 mean?", "Low inlet pressure."),
    ("How do I reset the P-300 pump?", "Hold RESET for 5 seconds."),
    ("What should I open?", "The inlet valve."),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):  # type: ignore[no-untyped-def]
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


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
        pair.split = InstructionPair.Split.EVAL if i >= 4 else InstructionPair.Split.TRAIN
        pair.save()
    return project


QUICK = {"lora": {"overrides": {"max_steps": "4", "checkpoint_every": "2", "batch_tokens": "256"}},
         "raft": {"overrides": {"max_steps": "4", "checkpoint_every": "2", "batch_tokens": "256"}}}  # fmt: skip


def _build(project, owner, base, recipe, capture, params=QUICK):  # type: ignore[no-untyped-def]
    with capture(execute=True):
        build = build_start(project=project, user=owner, recipe=recipe, base=base, params=params)
    build.refresh_from_db()
    return build


def test_rag_lora_build_trains_converts_and_serves_the_merged_model(
    data, owner, tiny_dir, owner_client, django_capture_on_commit_callbacks
):  # type: ignore[no-untyped-def]
    base = base_model_register(source=str(tiny_dir), name="Tiny Llama")
    build = _build(data, owner, base, "rag,lora", django_capture_on_commit_callbacks)
    assert build.status == Build.Status.SUCCEEDED, build.error
    step = build.steps.get(name="lora")
    m = step.metrics
    assert m["steps"] == 4 and m["train_examples"] == 4 and m["eval_examples"] == 2
    assert m["base_eval_loss"] is not None and m["eval_loss"] is not None
    assert [p["step"] for p in m["history"] if p["train_loss"] is not None][-1] == 4
    assert step.outputs["hf_dir"].endswith("merged") and step.outputs["adapter_dir"].endswith("adapter")
    version = build.model_versions.get()
    assert version.hf_path is not None and version.hf_path.name == "merged"
    assert version.gguf_file.is_file() and version.index_path is not None
    assert version.metrics["lora"]["eval_loss"] == m["eval_loss"] and "history" not in version.metrics["lora"]
    # The build page draws the loss curve.
    page = owner_client.get(reverse("training-build-detail", args=[data.slug, build.pk])).content.decode()
    assert "train-line" in page and "Fine-tune on your pairs (LoRA)" in page
    detail = owner_client.get(reverse("inference-model-detail", args=[data.slug, version.number]))
    assert (
        detail.status_code == 200 and "Fine-tuned on your instruction pairs (LoRA)" in detail.content.decode()
    )


def test_raft_build_trains_on_retrieval_examples(data, owner, tiny_dir, django_capture_on_commit_callbacks):  # type: ignore[no-untyped-def]
    base = base_model_register(source=str(tiny_dir), name="Tiny Llama")
    build = _build(data, owner, base, "raft", django_capture_on_commit_callbacks)
    assert build.status == Build.Status.SUCCEEDED, build.error
    assert build.recipe == "rag,raft"
    stats = build.steps.get(name="raft").metrics["raft"]
    assert (
        stats["examples"] == 4
        and stats["with_oracle"] + stats["without_oracle"] + stats["oracle_not_found"] == 4
    )
    assert build.model_versions.get().index_path is not None


def test_settings_from_the_command_line_reach_the_step(data, tiny_dir, capsys):  # type: ignore[no-untyped-def]
    base_model_register(source=str(tiny_dir), name="Tiny Llama")
    with pytest.raises(SystemExit):
        call_command("build", data.slug, "--recipe", "lora", "--base", "tiny-llama", "--set", "lora.epochs")
    assert "STEP.KEY=VALUE" in json.loads(capsys.readouterr().out)["error"]


def test_an_unknown_setting_fails_the_build_with_a_message(
    data, owner, tiny_dir, django_capture_on_commit_callbacks
):  # type: ignore[no-untyped-def]
    base = base_model_register(source=str(tiny_dir), name="Tiny Llama")
    params = {"lora": {"overrides": {"max_stepz": "4"}}}
    build = _build(data, owner, base, "lora", django_capture_on_commit_callbacks, params=params)
    assert build.status == Build.Status.FAILED and "max_stepz" in build.error


def test_training_picks_up_from_its_last_checkpoint(data, owner, tiny_dir, monkeypatch):  # type: ignore[no-untyped-def]
    """Cancel at step 2 keeps the checkpoint; the step run again (a resumed build) continues from it."""
    base = base_model_register(source=str(tiny_dir), name="Tiny Llama")
    build = build_start(project=data, user=owner, recipe="lora", base=base, params=QUICK)
    for step in build.steps.exclude(name__in=("lora", "convert", "evaluate")).order_by("index"):
        from training.steps import STEP_RUNNERS

        step.metrics = STEP_RUNNERS[step.name](StepContext(build=build, step=step))
        step.status = "succeeded"
        step.save()
    lora_step = build.steps.get(name="lora")
    reported = {"step": 0}
    progress = StepContext.progress

    def remember(self, current, total, message="", *, force=False):  # type: ignore[no-untyped-def]
        if message.startswith("Step "):
            reported["step"] = current
        progress(self, current, total, message, force=force)

    def stop_after_two_steps(self, *, force=False):  # type: ignore[no-untyped-def]
        return reported["step"] >= 2  # the user presses Cancel once step 2 is shown

    monkeypatch.setattr(StepContext, "progress", remember)
    monkeypatch.setattr(StepContext, "cancel_requested", stop_after_two_steps)
    with pytest.raises(BuildCancelled):
        tuning.lora_step(StepContext(build=build, step=lora_step))
    lora_step.refresh_from_db()
    assert [p["step"] for p in lora_step.metrics["history"]][-1] == 2  # the curve so far was kept
    monkeypatch.setattr(StepContext, "cancel_requested", lambda self, *, force=False: False)
    metrics = tuning.lora_step(StepContext(build=build, step=lora_step))
    assert metrics["steps"] == 4
    assert build.logs.filter(message__contains="Resumed training from the checkpoint at step 2").exists()
    steps = [p["step"] for p in metrics["history"] if p["train_loss"] is not None]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # one continuous curve
