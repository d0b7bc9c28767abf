"""With the real bundled model: `build --recipe quantize:q8_0,quantize:q4_k_m --wait` from the
bundled base, one measured version per type, then `evaluate` and `exportgguf` on one of them."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command

from inference.evaluation import CONTRACT_KEYS
from projects.models import InstructionPair
from projects.services import documents_ingest_paths, pair_create
from training.models import ModelVersion

# Without a wrapping test transaction the build's task (eager in tests) runs as the build row
# commits, so `--wait` finds it finished.
pytestmark = pytest.mark.django_db(transaction=True)

MANUAL = "\n\n".join(
    f"## Section {i}\n\nThe P-200 pump must be serviced every {i + 2} months. Check the inlet valve, "
    f"replace the seal kit SK-{i}0 and log error codes such as E-40{i}1 in the maintenance book. "
    "If the pressure drops below two bar, stop the pump and call the service desk."
    for i in range(40)
)


def _command(*args: str) -> dict:
    out = StringIO()
    call_command(*args, stdout=out)
    return json.loads(out.getvalue())


def test_quantize_build_from_the_bundled_base(project, owner, tmp_path, settings):
    settings.EVAL_MAX_TOKENS = 1024
    settings.EVAL_MAX_PAIRS = 2
    settings.EVAL_ANSWER_TOKENS = 32
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "manual.md").write_text("# P-200 service manual\n\n" + MANUAL)
    documents_ingest_paths(project=project, paths=[docs], user=owner)
    for q, a in (
        ("How often is the pump serviced?", "Every few months."),
        ("What to do below two bar?", "Stop the pump."),
    ):
        pair = pair_create(project=project, instruction=q, input="", response=a)
        pair.split = InstructionPair.Split.EVAL
        pair.save()

    printed = _command(
        "build", project.slug, "--recipe", "quantize:q8_0,quantize:q4_k_m", "--wait", "--timeout", "900"
    )
    assert printed["status"] == "succeeded", printed.get("error")
    assert {"build", "status", "model_version", "metrics", "model_versions"} <= set(printed)
    assert [v["type"] for v in printed["model_versions"]] == ["q8_0", "q4_k_m"]
    assert printed["model_version"] == printed["model_versions"][0]["model_version"]
    q8, q4 = (v["metrics"]["evaluate"] for v in printed["model_versions"])
    assert set(printed["metrics"]["evaluate"]["models"]) == {"q8_0", "q4_k_m"}
    # The real model: F16 is 271 MB; Q8_0 about half of it; Q4_K_M smaller again, and its
    # K-quants fall back on SmolLM2's 576-wide rows (reported, not hidden).
    parent_size = printed["metrics"]["convert"]["size_bytes"]
    assert 0.45 < q8["size_bytes"] / parent_size < 0.6 and q4["size_bytes"] < q8["size_bytes"]
    assert printed["metrics"]["quantize:q4_k_m"]["fallback_tensors"] > 0
    assert 8.0 < q8["bits_per_weight"] < 9.0 and q4["bits_per_weight"] < 7.0
    for m in (q8, q4):
        assert 1 < m["perplexity"] < 100 and m["kl_divergence"] is not None and m["answer_f1"] is not None
        assert m["tokens_per_second"] > 1 and m["peak_memory_bytes"] > m["size_bytes"]
    assert q8["kl_divergence"] < q4["kl_divergence"]

    version = ModelVersion.objects.get(pk=printed["model_versions"][1]["model_version"])
    evaluated = _command("evaluate", str(version.pk))
    assert list(evaluated)[: len(CONTRACT_KEYS)] == list(CONTRACT_KEYS)
    assert evaluated["perplexity"] == pytest.approx(q4["perplexity"], rel=1e-6)  # same text, same protocol

    exported = _command("exportgguf", str(version.pk), "--out", str(tmp_path / "out.gguf"), "--type", "q4_0")
    assert exported["made"] == "quantized" and (tmp_path / "out.gguf").read_bytes()[:4] == b"GGUF"
    assert exported["bits_per_weight"] < q8["bits_per_weight"]
