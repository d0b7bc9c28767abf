"""A whole quantize build on a tiny random Llama: register → convert → quantize → evaluate → versions."""

from __future__ import annotations

import math

import pytest
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command

from inference.evaluation import CONTRACT_KEYS
from projects.models import InstructionPair
from projects.services import document_add, pair_create
from tests.tinymodels import make_tiny_llama
from training.models import Build
from training.registry import base_model_register
from training.services import build_start

pytestmark = pytest.mark.django_db

TEXT = (
    "# Pump manual\n\n## Reset\n\nTo reset the P-200 pump, hold the red RESET button for five seconds. "
    "Error E-4021 means the inlet pressure is too low: open the inlet valve fully.\n\n"
    "## Vacation\n\nEmployees get 25 days of paid vacation per year; requests go to your manager.\n"
) * 3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):  # type: ignore[no-untyped-def]
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def quick_eval(settings):  # type: ignore[no-untyped-def]
    settings.EVAL_MAX_TOKENS = 256
    settings.EVAL_MAX_PAIRS = 2
    settings.EVAL_ANSWER_TOKENS = 8


@pytest.fixture
def data(project):  # type: ignore[no-untyped-def]
    document_add(
        project=project, stream=SimpleUploadedFile("pump.md", TEXT.encode()), name="pump.md", size=None
    )
    for q, a in (
        ("How do I reset the pump?", "Hold RESET for five seconds."),
        ("What is E-4021?", "Low inlet pressure."),
    ):
        pair = pair_create(project=project, instruction=q, input="", response=a)
        pair.split = InstructionPair.Split.EVAL
        pair.save()
    return project


def test_quantize_build_makes_one_measured_version_per_type(
    data, owner, tiny_dir, quick_eval, django_capture_on_commit_callbacks
):  # type: ignore[no-untyped-def]
    base = base_model_register(source=str(tiny_dir), name="Tiny Llama")
    assert base.kind == "hf" and base.info["architecture"] == "LlamaForCausalLM"
    with django_capture_on_commit_callbacks(execute=True):
        build = build_start(project=data, user=owner, recipe="rag,quantize:q8_0,quantize:q4_0", base=base)
    build.refresh_from_db()
    assert build.status == Build.Status.SUCCEEDED, build.error
    versions = list(build.model_versions.order_by("number"))
    assert [(v.number, v.quant_type) for v in versions] == [(1, "q8_0"), (2, "q4_0")]
    q8, q4 = (v.evaluation for v in versions)
    for v, m in zip(versions, (q8, q4), strict=True):
        assert set(CONTRACT_KEYS) <= set(m)
        assert v.gguf_file.is_file() and v.parent_gguf and v.parent_gguf.is_file() and v.index_path
        assert math.isfinite(m["perplexity"]) and m["perplexity"] > 1
        assert m["bits_per_byte"] > 0 and m["kl_divergence"] >= 0 and 0 <= m["top1_agreement"] <= 1
        assert m["answer_f1"] is not None and m["eval_pairs"] == 2
        assert m["tokens_per_second"] > 0 and m["peak_memory_bytes"] > m["size_bytes"] > 0
        assert v.metrics["quantize"]["type"] == v.quant_type and v.metrics["rag"]["chunks"] > 0
    # Fewer bits: a smaller file further from the parent.
    assert q4["size_bytes"] < q8["size_bytes"]
    assert q4["kl_divergence"] > q8["kl_divergence"]
    assert q4["bits_per_weight"] < q8["bits_per_weight"]


def test_evaluate_command_measures_a_version_again(
    data, owner, tiny_dir, quick_eval, capsys, django_capture_on_commit_callbacks
):  # type: ignore[no-untyped-def]
    import json

    base = base_model_register(source=str(tiny_dir), name="Tiny Llama")
    with django_capture_on_commit_callbacks(execute=True):
        build = build_start(project=data, user=owner, recipe="quantize:q8_0", base=base)
    version = build.model_versions.get()
    call_command("evaluate", str(version.pk))
    printed = json.loads(capsys.readouterr().out)
    assert list(printed)[: len(CONTRACT_KEYS)] == list(CONTRACT_KEYS)
    assert printed["kl_divergence"] is not None and printed["answer_f1"] is not None
    version.refresh_from_db()
    assert version.evaluation["perplexity"] == printed["perplexity"]


def test_exportgguf_writes_other_types(
    data, owner, tiny_dir, quick_eval, tmp_path, capsys, django_capture_on_commit_callbacks
):  # type: ignore[no-untyped-def]
    import json

    base = base_model_register(source=str(tiny_dir), name="Tiny Llama")
    with django_capture_on_commit_callbacks(execute=True):
        build = build_start(project=data, user=owner, recipe="quantize:q4_0", base=base)
    version = build.model_versions.get()
    results = {}
    for kind in (None, "f16", "q8_0"):
        out = tmp_path / f"{kind}.gguf"
        call_command("exportgguf", str(version.pk), "--out", str(out), *(["--type", kind] if kind else []))
        results[kind] = json.loads(capsys.readouterr().out)
        assert out.read_bytes()[:4] == b"GGUF"
    assert results[None]["made"] == "copied" and results["f16"]["made"] == "converted"
    assert results["q8_0"]["made"] == "quantized"
    assert (
        results["f16"]["bits_per_weight"]
        > results["q8_0"]["bits_per_weight"]
        > results[None]["bits_per_weight"]
    )


def test_registry_refuses_pickles_and_other_architectures(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValidationError, match="(?i)pickle"):
        base_model_register(source=str(pickled))
    with pytest.raises(ValidationError, match="neither a file or folder"):
        base_model_register(source="/no/such/folder")


def test_imatrix_from_the_training_sections_guides_quantization(
    data, owner, tiny_dir, quick_eval, settings, django_capture_on_commit_callbacks
):  # type: ignore[no-untyped-def]
    settings.IMATRIX_MAX_TOKENS = 128
    # Enough sections that some are held out for evaluation and the rest can calibrate.
    long_manual = "\n\n".join(f"## Part {i}\n\n" + TEXT.replace("#", "") for i in range(120))
    document_add(
        project=data, stream=SimpleUploadedFile("long.md", long_manual.encode()), name="long.md", size=None
    )
    base = base_model_register(source=str(tiny_dir), name="Tiny Llama")
    with django_capture_on_commit_callbacks(execute=True):
        build = build_start(project=data, user=owner, recipe="quantize:q4_0,quantize:q8_0,imatrix", base=base)
    build.refresh_from_db()
    assert build.status == Build.Status.SUCCEEDED, build.error
    steps = {s.params["type"]: s for s in build.steps.filter(name="quantize")}
    assert all(s.params["imatrix"] for s in steps.values())
    assert steps["q4_0"].metrics["imatrix_tokens"] == 128 == steps["q8_0"].metrics["imatrix_tokens"]
    assert any("Importance matrix from 128 tokens" in m for m in build.logs.values_list("message", flat=True))
    assert build.model_versions.count() == 2


def test_no_imatrix_when_calibration_would_be_the_evaluation_text(
    data, owner, tiny_dir, quick_eval, django_capture_on_commit_callbacks
):  # type: ignore[no-untyped-def]
    base = base_model_register(source=str(tiny_dir), name="Tiny Llama")
    with django_capture_on_commit_callbacks(execute=True):
        build = build_start(project=data, user=owner, recipe="quantize:q4_0,imatrix", base=base)
    build.refresh_from_db()
    assert build.status == Build.Status.SUCCEEDED, build.error
    assert build.steps.get(name="quantize").metrics["imatrix_tokens"] is None
    assert build.logs.filter(level="warning", message__contains="apart from evaluation").exists()


def test_a_gguf_only_base_cannot_be_quantized(project, owner) -> None:  # type: ignore[no-untyped-def]
    from training.ml.bundled import bundled_llm_gguf

    gguf_base = base_model_register(source=str(bundled_llm_gguf().path), name="Served as is")
    assert gguf_base.kind == "gguf" and gguf_base.slug != "smollm2-135m-instruct"
    with pytest.raises(ValidationError, match="without its original weights"):
        build_start(project=project, user=owner, recipe="quantize:q8_0", base=gguf_base)
