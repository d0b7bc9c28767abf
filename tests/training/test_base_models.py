"""training.ml.base_models: inspecting, refusing pickles, loading, downloading and dequantizing.

The bundled SmolLM2-135M-Instruct Q4_1 is dequantized once per module (`dequantized`) and then
compared with transformers' own GGUF loading (same weights: equal logits) and with llama.cpp
running the Q4_1 file (activations quantized too: close logits).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.tinymodels import make_tiny_llama
from training.ml.base_models import (
    TOKENIZER_CHECK_TEXT,
    ModelUnavailable,
    UnsafeModelFile,
    dequantize_gguf_to_hf,
    download_hub_model,
    inspect_model,
    load_causal_lm,
    refuse_pickles,
)
from training.ml.bundled import bundled_llm_gguf

PICKLE_BYTES = b"\x80\x04\x95not a real pickle, and never unpickled"
CHAT = [{"role": "user", "content": "How do I reset the P-200 pump? It shows E-4021 since 2024."}]


@pytest.fixture(scope="module")
def gguf() -> Path:
    return bundled_llm_gguf().path


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), tie_word_embeddings=request.param)


# --- Inspecting -------------------------------------------------------------------------------


def test_it_inspects_a_model_folder_without_loading_it(tiny: Path) -> None:
    info = inspect_model(tiny)
    model, tokenizer = load_causal_lm(tiny)

    assert info.kind == "hf"
    assert info.architecture == "LlamaForCausalLM"
    assert info.parameters == sum(p.numel() for p in model.parameters())
    assert (info.hidden_size, info.layers, info.heads, info.kv_heads) == (64, 2, 4, 2)
    assert info.vocab_size == len(tokenizer) == model.config.vocab_size
    assert info.context_length == 256
    assert info.chat_template is True
    assert info.weights_format == "safetensors"
    assert dict(info.files)["model.safetensors"] == (tiny / "model.safetensors").stat().st_size
    assert info.size_bytes == sum(size for _, size in info.files)
    assert info.licence is None


def test_it_reads_the_licence_from_a_file_or_the_model_card(tmp_path: Path) -> None:
    folder = make_tiny_llama(tmp_path / "m", layers=1)
    (folder / "README.md").write_text("---\nlanguage: en\nlicense: apache-2.0\n---\n# Model\n")
    assert inspect_model(folder).licence == "apache-2.0"
    (folder / "LICENSE").write_text("MIT License\n\nCopyright (c) 2024\n")
    assert inspect_model(folder).licence.startswith("MIT License")


def test_it_inspects_the_bundled_gguf(gguf: Path) -> None:
    info = inspect_model(gguf)
    assert info.kind == "gguf"
    assert info.architecture == "llama"
    assert info.parameters == 134_515_008  # 134.5M, the embedding counted once
    assert info.context_length == 8192
    assert (info.hidden_size, info.layers, info.heads, info.kv_heads, info.vocab_size) == (
        576,
        30,
        9,
        3,
        49152,
    )
    assert info.weights_format == "gguf:Q4_1"
    assert info.licence == "apache-2.0"
    assert info.chat_template is True
    assert info.files == [(gguf.name, gguf.stat().st_size)]


def test_it_reports_missing_models(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable):
        inspect_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match="config.json"):
        inspect_model(tmp_path / "empty")


# --- Pickles ----------------------------------------------------------------------------------


def test_it_refuses_a_folder_with_only_pickle_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (tmp_path / "pytorch_model.bin").write_bytes(PICKLE_BYTES)
    with pytest.raises(UnsafeModelFile, match=r"pickle.*refused.*safetensors"):
        refuse_pickles(tmp_path)
    with pytest.raises(UnsafeModelFile):
        inspect_model(tmp_path)


def test_it_refuses_a_pickle_file(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(PICKLE_BYTES)
    with pytest.raises(UnsafeModelFile, match=r"model\.pt.*pickle.*refused"):
        refuse_pickles(checkpoint)


def test_it_accepts_pickles_beside_safetensors_and_gguf_files(tiny: Path, gguf: Path) -> None:
    (tiny / "training_args.bin").write_bytes(PICKLE_BYTES)
    try:
        refuse_pickles(tiny)
    finally:
        (tiny / "training_args.bin").unlink()
    refuse_pickles(gguf)


def test_it_never_loads_pickle_weights(tmp_path: Path, monkeypatch) -> None:
    import torch

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(PICKLE_BYTES)
    with pytest.raises(UnsafeModelFile):
        load_causal_lm(tmp_path)


# --- Downloading ------------------------------------------------------------------------------


def test_it_reports_the_hub_as_unavailable_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE"):
        download_hub_model("HuggingFaceTB/SmolLM2-135M", work / "model")
    assert not work.exists()
    with pytest.raises(ModelUnavailable, match="not a Hugging Face model id"):
        download_hub_model("../../etc", work / "model")


class _Sibling:
    def __init__(self, name: str) -> None:
        self.rfilename = name


class _Info:
    sha = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, *names: str) -> None:
        self.siblings = [_Sibling(name) for name in names]


@pytest.fixture
def online_hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return huggingface_hub


def test_it_refuses_a_hub_repo_without_safetensors(online_hub, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(
        online_hub.HfApi, "model_info", lambda self, repo_id: _Info("config.json", "pytorch_model.bin")
    )

    def no_download(*args, **kwargs):
        raise AssertionError("snapshot_download was called")

    monkeypatch.setattr(online_hub, "snapshot_download", no_download)
    with pytest.raises(UnsafeModelFile, match="pickle"):
        download_hub_model("someone/pickled", tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_it_downloads_only_safe_files_and_renames_when_complete(
    online_hub, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(
        online_hub.HfApi, "model_info", lambda self, repo_id: _Info("model.safetensors", "pytorch_model.bin")
    )
    calls = []

    def fake_download(repo_id, *, local_dir, **kwargs):
        calls.append((repo_id, kwargs))
        local = Path(local_dir)
        (local / ".cache" / "huggingface").mkdir(parents=True)
        (local / "model.safetensors").write_bytes(b"weights")
        return str(local)

    monkeypatch.setattr(online_hub, "snapshot_download", fake_download)
    work = tmp_path / "work"
    out = download_hub_model("someone/model", work / "model")
    assert out == work / "model"
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert [p.name for p in work.iterdir()] == ["model"]  # no temporary folder left
    ((repo_id, kwargs),) = calls
    assert repo_id == "someone/model"
    assert kwargs["revision"] == _Info.sha
    assert "*.safetensors" in kwargs["allow_patterns"]
    assert not any(".bin" in pattern or ".pt" in pattern for pattern in kwargs["allow_patterns"])


# --- Dequantizing the bundled GGUF ------------------------------------------------------------


@pytest.fixture(scope="module")
def dequantized(gguf: Path, tmp_path_factory):
    """The bundled GGUF as an HF folder, its loaded model and tokenizer, and the conversion's record."""
    out = tmp_path_factory.mktemp("dequantized") / "smollm2"
    calls: list[tuple[int, int]] = []
    started = time.perf_counter()
    dequantize_gguf_to_hf(gguf, out, progress=lambda done, total: calls.append((done, total)))
    seconds = time.perf_counter() - started
    model, tokenizer = load_causal_lm(out)
    return {"dir": out, "model": model, "tokenizer": tokenizer, "progress": calls, "seconds": seconds}


@pytest.fixture(scope="module")
def probe(dequantized) -> list[int]:
    """Token ids of text mixing scripts, digits, code and a chat prompt."""
    tokenizer = dequantized["tokenizer"]
    return tokenizer(TOKENIZER_CHECK_TEXT)["input_ids"] + tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def _logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_it_writes_a_complete_hf_folder(dequantized, gguf: Path) -> None:
    out = dequantized["dir"]
    print(f"dequantized in {dequantized['seconds']:.1f} s")
    assert dequantized["progress"][-1] == (272, 272)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # the temporary folder was renamed
    info = inspect_model(out)
    assert info.parameters == inspect_model(gguf).parameters == 134_515_008
    assert (info.architecture, info.context_length, info.licence) == ("LlamaForCausalLM", 8192, "apache-2.0")
    assert info.chat_template is True
    config = dequantized["model"].config
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert dequantized["model"].generation_config.eos_token_id == 2
    assert not hasattr(config, "quantization_config")


def test_it_matches_transformers_own_gguf_loading(dequantized, probe: list[int], gguf: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    expected = _logits(reference, probe)
    # The same dequantized weights in the same fp32 graph.
    assert np.abs(_logits(dequantized["model"], probe) - expected).max() <= 1e-4

    # Their tokenizer lacks SmolLM's digit splitting, which shows only where blanks precede a
    # digit ("x  1"; see test_it_tokenizes_exactly_like_llama_cpp): elsewhere ids must agree.
    their_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for text in (TOKENIZER_CHECK_TEXT, "1234567890 x=10**-3.5e+7; Ünïcödé ‘quotes’ (1.5%)"):
        assert dequantized["tokenizer"](text)["input_ids"] == their_tokenizer(text)["input_ids"]


def test_it_stays_close_to_llama_cpp_on_the_q4_1_file(dequantized, probe: list[int], gguf: Path) -> None:
    from training.ml.evaluate import _load_llama, kl_from_logits

    llm = _load_llama(gguf, n_ctx=512, n_threads=2, n_threads_batch=2, logits_all=True)
    try:
        llm.eval(probe)
        theirs = np.array(llm.scores[: len(probe)])
    finally:
        llm.close()
    ours = _logits(dequantized["model"], probe)
    # llama.cpp multiplies Q4_1 weights by 8-bit-quantized activations; we use fp32 activations.
    # Measured on this 210-token probe: mean |diff| 0.20 (max 2.0, logits up to 38.5), mean KL
    # 0.0045 nats (max 0.074), 96.7% same argmax.
    assert np.abs(ours - theirs).mean() < 0.5
    assert kl_from_logits(theirs, ours).mean() < 0.03
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


def test_it_tokenizes_exactly_like_llama_cpp(dequantized, gguf: Path) -> None:
    from training.ml.evaluate import _load_llama

    tokenizer = dequantized["tokenizer"]
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")

    llm = _load_llama(gguf, n_ctx=64, n_threads=1, n_threads_batch=1, logits_all=False)
    try:
        for text in (TOKENIZER_CHECK_TEXT, "  007 agents\n\n\tx1y22z333 ðŸ™‚ <b>ok</b> ", "x  1\n  2"):
            assert tokenizer(text)["input_ids"] == llm.tokenize(text.encode(), add_bos=True, special=False)
        assert tokenizer(prompt)["input_ids"] == llm.tokenize(prompt.encode(), add_bos=True, special=True)
    finally:
        llm.close()
    assert tokenizer.decode(tokenizer(TOKENIZER_CHECK_TEXT)["input_ids"]) == TOKENIZER_CHECK_TEXT


def test_it_refuses_to_overwrite_and_leaves_nothing_behind_on_failure(
    dequantized, gguf: Path, tmp_path: Path
) -> None:
    with pytest.raises(FileExistsError):
        dequantize_gguf_to_hf(gguf, dequantized["dir"])

    def fail(done: int, total: int) -> None:
        raise RuntimeError("stop here")

    work = tmp_path / "work"
    with pytest.raises(RuntimeError, match="stop here"):
        dequantize_gguf_to_hf(gguf, work / "out", progress=fail)
    assert list(work.iterdir()) == []  # the temporary folder is gone


def test_it_reports_a_download_that_lost_a_race(online_hub, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(online_hub.HfApi, "model_info", lambda self, repo_id: _Info("model.safetensors"))
    work = tmp_path / "work"

    def download_while_another_finishes(repo_id, *, local_dir, **kwargs):
        Path(local_dir).mkdir(parents=True)
        (Path(local_dir) / "model.safetensors").write_bytes(b"ours")
        (work / "model").mkdir()
        (work / "model" / "model.safetensors").write_bytes(b"theirs")
        return local_dir

    monkeypatch.setattr(online_hub, "snapshot_download", download_while_another_finishes)
    with pytest.raises(FileExistsError):
        download_hub_model("someone/model", work / "model")
    assert [p.name for p in work.iterdir()] == ["model"]
    assert (work / "model" / "model.safetensors").read_bytes() == b"theirs"
