"""With the real bundled model: the "maximum compression" chain `rag,lora,prune,quantize:q4_k_m`
in one build (scenario 1 of the seed article), and structured pruning that really shrinks
SmolLM2-135M and still loads in llama.cpp."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command

from inference import services as inference
from projects.models import InstructionPair
from projects.services import documents_ingest_paths, pair_create
from training.models import ModelVersion

pytestmark = pytest.mark.django_db(transaction=True)

PUMPS = ["P-100", "P-200", "P-300", "P-400", "P-500", "P-600", "P-700", "P-800"]
MANUAL = "# Pump manual\n\n" + "\n\n".join(
    f"## The {pump} pump\n\nTo reset the {pump} pump, hold the red RESET button for {i + 3} seconds until the "
    f"status light blinks green. Error E-40{i}1 on the {pump} means the inlet pressure is too low: open the "
    f"inlet valve fully and wait {i + 1} minutes. The {pump} is serviced every {6 + i} months; its filter "
    f"is replaced at every service, and the seals every {2 + i % 3} years."
    for i, pump in enumerate(PUMPS)
)
PAIRS = [
    (f"How do I reset the {pump} pump?", f"Hold the red RESET button for {i + 3} seconds.")
    for i, pump in enumerate(PUMPS)
]


@pytest.fixture
def pump_project(project, owner, tmp_path, settings):  # type: ignore[no-untyped-def]
    settings.EVAL_MAX_TOKENS = 256
    settings.EVAL_MAX_PAIRS = 2
    settings.EVAL_ANSWER_TOKENS = 24
    (tmp_path / "pumps.md").write_text(MANUAL)
    documents_ingest_paths(project=project, paths=[tmp_path / "pumps.md"], user=owner)
    for i, (q, a) in enumerate(PAIRS):
        pair = pair_create(project=project, instruction=q, input="", response=a)
        pair.split = InstructionPair.Split.EVAL if i >= 6 else InstructionPair.Split.TRAIN
        pair.save()
    return project


def _build(project, *args: str) -> dict:  # type: ignore[no-untyped-def]
    out = StringIO()
    call_command("build", project.slug, "--wait", "--timeout", "1200", *args, stdout=out)
    printed = json.loads(out.getvalue())
    assert printed["status"] == "succeeded", printed.get("error")
    return printed


def test_maximum_compression_chain_on_the_bundled_model(pump_project):  # type: ignore[no-untyped-def]
    printed = _build(
        pump_project, "--recipe", "rag,lora,prune,quantize:q4_k_m",
        "--set", "lora.max_steps=3", "--set", "prune.method=wanda", "--set", "prune.sparsity=0.5",
        "--set", "prune.calibration_samples=8", "--set", "prune.calibration_length=128",
    )  # fmt: skip
    steps = list(printed["metrics"])
    assert (
        steps.index("lora") < steps.index("prune") < steps.index("quantize:q4_k_m") < steps.index("evaluate")
    )
    pruned = printed["metrics"]["prune"]
    assert abs(pruned["sparsity"] - 0.5) < 1e-3 and pruned["calibration_source"] == "documents"
    assert pruned["parameters_before"] > 130_000_000 and pruned["nonzero_ratio"] < 0.75
    evaluation = printed["metrics"]["evaluate"]
    # Compared with the fine-tuned model just before pruning, on the same held-out text.
    baseline = evaluation["baseline"]
    assert baseline["kind"] == "unpruned" and "fine-tuned" in baseline["model"]
    measured = evaluation["models"]["q4_k_m"]
    assert measured["eval_text_sha256"] == baseline["eval_text_sha256"]
    assert measured["perplexity"] > baseline["perplexity"]  # half the weights gone costs something
    assert measured["size_bytes"] < 0.45 * baseline["size_bytes"]  # that is the quantization, not the zeros
    version = ModelVersion.objects.get(pk=printed["model_version"])
    answer = inference.answer_start(
        version=version, question="How do I reset the P-200 pump?", history=[],
        chat=inference.ChatSettings(top_k=2, temperature=0.0, max_tokens=24),
    )  # fmt: skip
    assert answer.complete().text.strip() and answer.sources


def test_structured_pruning_shrinks_the_bundled_model(pump_project):  # type: ignore[no-untyped-def]
    printed = _build(
        pump_project, "--recipe", "prune", "--set", "prune.method=structured", "--set", "prune.target=0.75",
        "--set", "prune.calibration_samples=8", "--set", "prune.calibration_length=128",
    )  # fmt: skip
    pruned = printed["metrics"]["prune"]
    assert abs(pruned["parameter_ratio"] - 0.75) < 0.02 and pruned["shrinks_file"]
    evaluation = printed["metrics"]["evaluate"]
    (measured,) = evaluation["models"].values()
    baseline = evaluation["baseline"]
    # F16 both: the file shrinks with the parameters, and llama.cpp loads and runs it.
    assert measured["size_bytes"] < 0.8 * baseline["size_bytes"]
    assert measured["perplexity"] is not None and measured["tokens_per_second"] > 0
