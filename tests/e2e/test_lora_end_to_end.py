"""With the real bundled model: `build --recipe rag,lora,quantize:q4_k_m --wait --set lora.max_steps=…`
trains a few steps, merges, converts, quantizes and measures the result against the base."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command

from inference import services as inference
from projects.models import InstructionPair
from projects.services import documents_ingest_paths, pair_create
from training.models import ModelVersion

# The build's task runs as its row commits (eager Celery), so `--wait` finds it finished.
pytestmark = pytest.mark.django_db(transaction=True)

MANUAL = """# P-200 pump manual

## Resetting the pump

To reset the P-200 pump, hold the red RESET button for five seconds until the status LED blinks green.

## Error codes

Error E-4021 means the inlet pressure is too low: open the inlet valve fully.
"""
PAIRS = [
    ("How do I reset the P-200 pump?", "Hold the red RESET button for five seconds."),
    ("What does error E-4021 mean?", "The inlet pressure is too low; open the inlet valve fully."),
    ("When is the reset done?", "When the status LED blinks green."),
    ("Which button resets the pump?", "The red RESET button."),
    ("What should I do about low inlet pressure?", "Open the inlet valve fully."),
]


def test_rag_lora_quantize_on_the_bundled_model(project, owner, tmp_path, settings):
    settings.EVAL_MAX_TOKENS = 256
    settings.EVAL_MAX_PAIRS = 2
    settings.EVAL_ANSWER_TOKENS = 24
    (tmp_path / "pump.md").write_text(MANUAL)
    documents_ingest_paths(project=project, paths=[tmp_path / "pump.md"], user=owner)
    for i, (q, a) in enumerate(PAIRS):
        pair = pair_create(project=project, instruction=q, input="", response=a)
        pair.split = InstructionPair.Split.EVAL if i >= 3 else InstructionPair.Split.TRAIN
        pair.save()

    out = StringIO()
    call_command(
        "build", project.slug, "--recipe", "rag,lora,quantize:q4_k_m", "--wait", "--timeout", "900",
        "--set", "lora.max_steps=6", "--set", "lora.checkpoint_every=3", stdout=out,
    )  # fmt: skip
    printed = json.loads(out.getvalue())
    assert printed["status"] == "succeeded", printed.get("error")
    lora = printed["metrics"]["lora"]
    assert (
        1 <= lora["steps"] <= 6 and lora["train_examples"] == 3 and lora["eval_examples"] == 2
    )  # a cap, not a target
    assert lora["eval_loss"] is not None and lora["base_eval_loss"] is not None
    assert lora["tokens_per_second"] > 0
    # The evaluate step measured the fine-tuned model and, for comparison, the base it came from.
    evaluation = printed["metrics"]["evaluate"]
    assert set(evaluation["models"]) == {"q4_k_m"} and evaluation["baseline"]["answer_f1"] is not None
    version = ModelVersion.objects.get(pk=printed["model_version"])
    assert version.hf_path is not None and version.hf_path.name == "merged"
    assert version.metrics["baseline"]["model"].startswith("SmolLM2-135M-Instruct")

    # The chat answers with the fine-tuned, quantized model and its index.
    answer = inference.answer_start(
        version=version, question="How do I reset the P-200 pump?", history=[],
        chat=inference.ChatSettings(top_k=2, temperature=0.0, max_tokens=32),
    )  # fmt: skip
    result = answer.complete()
    assert result.text.strip() and answer.sources and answer.sources[0]["title"] == "P-200 pump manual"
