"""training.ml.gguf_convert and training.ml.quantize, checked against transformers on tiny random Llamas.

Every check runs llama.cpp itself (llama-cpp-python) on the files we write: logits, greedy tokens
and token ids must agree with what transformers computes from the source folder. The models are
random, built in seconds by tests/tinymodels.py; nothing is downloaded. The SmolLM2 tokenizer test
rebuilds SmolLM2's real vocabulary from the bundled GGUF.

F32 comparisons run llama.cpp with an F32 KV cache: its default F16 cache alone moves these
logits by ~0.07 and would hide a conversion error of that size.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tinymodels import TRAINING_TEXT, make_tiny_llama
from training.ml.gguf_convert import (
    LLAMA3_PATTERN,
    QWEN2_PATTERN,
    UnsupportedModel,
    convert_hf_to_gguf,
    convert_lora_to_gguf,
)
from training.ml.quantize import QUANT_TYPES, compute_imatrix, gguf_bits_per_weight, quantize_gguf

# Third-party noise from the LoRA tests: transformers deprecates a name peft still calls, and peft
# announces a default it picks.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning"),
]

GGML_TYPE_F32 = 0
PROMPT = "Grüße aus Köln — naïve café, 東京 🙂: hold RESET for 5 seconds if error E-4021 shows."
TOKENIZER_TEXTS = [
    PROMPT,
    "I'M sure they'll say it's 12345 or 3.14159; DON'T worry!!! \r\n end",
    "tabs\tand\nnewlines\n\n   indented    spaces   ",
    "def main():\n    return 42  # {}[]()<>",
]
CHAT_TEXT = "<|im_start|>user\nHello 2024<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------------------------
# Helpers


@contextmanager
def llama(path: Path, **kwargs) -> Iterator:
    """Load a GGUF like inference.engines.llama does (no AMX repacking), and always close it."""
    import llama_cpp
    import llama_cpp.llama_cpp as llama_lib

    original = llama_lib.llama_model_default_params

    def params():
        chosen = original()
        chosen.use_extra_bufts = False
        return chosen

    llama_lib.llama_model_default_params = params
    try:
        llm = llama_cpp.Llama(model_path=str(path), verbose=False, n_threads=1, n_threads_batch=1, **kwargs)
    finally:
        llama_lib.llama_model_default_params = original
    try:
        yield llm
    finally:
        llm.close()


def llama_logits(path: Path, ids: list[int], *, lora: Path | None = None) -> np.ndarray:
    with llama(
        path,
        n_ctx=128,
        logits_all=True,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        lora_path=str(lora) if lora else None,
    ) as llm:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])


@cache
def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@cache
def hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(model_dir)(torch.tensor([ids])).logits[0].numpy()


def prompt_ids(model_dir: Path) -> list[int]:
    return hf_tokenizer(model_dir)(PROMPT, add_special_tokens=False)["input_ids"]


def copy_weights(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)
    return dst


# --------------------------------------------------------------------------------------------
# Models


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    wide = make_tiny_llama(root / "wide", hidden=256, intermediate=512, heads=4, kv_heads=2)
    # Spread the RMSNorm gains so input columns differ in importance, as in trained models:
    # otherwise an importance matrix has nothing to tell the quantizer.
    model = hf_model(wide)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.copy_(torch.exp(torch.randn(param.shape, generator=generator)))
    model.save_pretrained(wide)
    return {
        "tied": make_tiny_llama(root / "tied", heads=4, kv_heads=2, tie_word_embeddings=True),
        "untied": make_tiny_llama(root / "untied", heads=4, kv_heads=1, tie_word_embeddings=False, seed=1),
        "wide": wide,
    }


@pytest.fixture(scope="module")
def f32_gguf(models: dict[str, Path]) -> dict[str, Path]:
    return {
        key: convert_hf_to_gguf(path, path.parent / f"{key}-f32.gguf", out_type="f32").path
        for key, path in models.items()
    }


# --------------------------------------------------------------------------------------------
# 1. Conversion round trip

# Max |llama.cpp - transformers| over all logits of the 56-token prompt (largest logit 8.6 tied,
# 10.6 untied). Measured tied / untied: F32 3.0e-5 / 9.6e-5, F16 0.046 / 0.041, BF16 0.31 / 0.33,
# Q8_0 0.85 / 1.55. Random weights of std 0.3 amplify rounding far more than trained ones do.
MAX_ABS_DIFF = {"f32": 5e-4, "f16": 0.2, "bf16": 1.0, "q8_0": 4.0}
# Share of positions with the same argmax. Measured tied / untied: F16 0.98 / 0.98, BF16 0.91 / 1.0,
# Q8_0 0.84 / 0.93 (random weights give many near-ties).
MIN_ARGMAX_AGREEMENT = {"f32": 1.0, "f16": 0.9, "bf16": 0.8, "q8_0": 0.7}


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("key", ["tied", "untied"])
def test_converted_logits_match_transformers(
    models: dict[str, Path], tmp_path: Path, key: str, out_type: str
):
    model_dir = models[key]
    seen: list[tuple[int, int]] = []
    result = convert_hf_to_gguf(
        model_dir, tmp_path / "m.gguf", out_type=out_type, progress=lambda *a: seen.append(a)
    )
    assert result.path.is_file() and result.size_bytes == result.path.stat().st_size
    assert result.tensors == 2 + 9 * 2 + (key == "untied")  # token_embd, output_norm, 2 blocks, output
    assert seen[-1] == (result.tensors, result.tensors) and len(seen) == result.tensors
    assert result.fallback_tensors == 0 and result.warnings == ()
    assert not list(tmp_path.glob(".*.part"))

    ids = prompt_ids(model_dir)
    assert len(ids) == 56
    expected, got = hf_logits(model_dir, ids), llama_logits(result.path, ids)
    assert np.abs(got - expected).max() < MAX_ABS_DIFF[out_type]
    agreement = (got.argmax(-1) == expected.argmax(-1)).mean()
    assert agreement >= MIN_ARGMAX_AGREEMENT[out_type]


@pytest.mark.parametrize("key", ["tied", "untied"])
def test_greedy_generation_matches_transformers(models: dict[str, Path], f32_gguf: dict[str, Path], key: str):
    model_dir, ids = models[key], prompt_ids(models[key])
    model = hf_model(model_dir)
    with torch.no_grad():
        output = model.generate(
            torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0
        )
    expected = output[0, len(ids) :].tolist()
    generated: list[int] = []
    with llama(f32_gguf[key], n_ctx=128, logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) as llm:
        llm.eval(ids)
        for _ in range(20):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            generated.append(token)
            llm.eval([token])
    assert generated == expected


def test_sharded_checkpoint_converts_to_the_same_file(models: dict[str, Path], tmp_path: Path):
    from safetensors.torch import load_file, save_file

    source = models["untied"]
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / name, sharded / name)
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, sharded / file, metadata={"format": "pt"})
    weight_map = {n: file for file, part in shards.items() for n in part}
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )

    one = convert_hf_to_gguf(source, tmp_path / "one.gguf", out_type="f16", name="same")
    two = convert_hf_to_gguf(sharded, tmp_path / "two.gguf", out_type="f16", name="same")
    assert one.path.read_bytes() == two.path.read_bytes()


def test_rope_scaling_llama3_and_linear(models: dict[str, Path], tmp_path: Path):
    """Both scalings change these logits by ~14; the GGUFs must follow them exactly."""
    from transformers import LlamaForCausalLM

    ids = list(range(3, 63))  # long enough to pass llama3's original context of 16
    llama3 = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    for rope in ({"rope_type": "llama3", **llama3}, {"rope_type": "linear", "factor": 4.0}):
        model_dir = copy_weights(models["tied"], tmp_path / rope["rope_type"])
        shutil.copy(models["tied"] / "tokenizer.json", model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        config["rope_parameters"] = {"rope_theta": 10000.0, **rope}
        (model_dir / "config.json").write_text(json.dumps(config))
        with torch.no_grad():
            expected = (
                LlamaForCausalLM.from_pretrained(model_dir).eval()(torch.tensor([ids])).logits[0].numpy()
            )
        result = convert_hf_to_gguf(model_dir, model_dir / "m.gguf", out_type="f32")
        assert np.abs(llama_logits(result.path, ids) - expected).max() < 2e-4  # measured 4.2e-5, 3.2e-5


# --------------------------------------------------------------------------------------------
# 2. Tokenizer


def assert_same_tokens(gguf_path: Path, tokenizer) -> None:
    with llama(gguf_path, vocab_only=True) as llm:
        for text in TOKENIZER_TEXTS:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
            assert llm.detokenize(ids).decode() == text
        chat_ids = tokenizer(CHAT_TEXT, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(CHAT_TEXT.encode(), add_bos=False, special=True) == chat_ids
        assert llm.detokenize(chat_ids, special=True).decode() == CHAT_TEXT


def test_tokenizer_round_trip(models: dict[str, Path], f32_gguf: dict[str, Path]):
    import gguf

    tokenizer = hf_tokenizer(models["tied"])
    assert_same_tokens(f32_gguf["tied"], tokenizer)
    fields = gguf.GGUFReader(f32_gguf["tied"]).fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False  # the tiny tokenizer adds none
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [3, 3, 3] and set(types[3:]) == {1}  # ChatML specials are CONTROL


def test_tokenizer_settings_from_older_files(models: dict[str, Path], tmp_path: Path):
    """transformers 4 layouts (template and add_bos_token in tokenizer_config.json, "a b" merges)."""
    import gguf

    source = models["tied"]
    model_dir = copy_weights(source, tmp_path / "m")
    tok = json.loads((source / "tokenizer.json").read_text())
    tok["model"]["merges"] = [" ".join(pair) for pair in tok["model"]["merges"]]
    (model_dir / "tokenizer.json").write_text(json.dumps(tok))
    tok_config = json.loads((source / "tokenizer_config.json").read_text())
    tok_config |= {"chat_template": "{{ messages[0]['content'] }}", "add_bos_token": True}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))

    # An embedding with more rows than the tokenizer has tokens (padded for speed, as many are).
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    n_tokens = tensors["model.embed_tokens.weight"].shape[0]
    tensors["model.embed_tokens.weight"] = torch.cat(
        [tensors["model.embed_tokens.weight"], torch.zeros(8, 64)]
    )
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"vocab_size": n_tokens + 8}))

    result = convert_hf_to_gguf(model_dir, tmp_path / "m.gguf", out_type="f32")
    fields = gguf.GGUFReader(result.path).fields
    assert fields["tokenizer.chat_template"].contents() == "{{ messages[0]['content'] }}"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    reference = gguf.GGUFReader(convert_hf_to_gguf(source, tmp_path / "ref.gguf", out_type="f32").path).fields
    assert fields["tokenizer.ggml.merges"].contents() == reference["tokenizer.ggml.merges"].contents()
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert tokens[:n_tokens] == reference["tokenizer.ggml.tokens"].contents()
    assert types[:n_tokens] == reference["tokenizer.ggml.token_type"].contents()
    assert tokens[n_tokens:] == [f"[PAD{i}]" for i in range(n_tokens, n_tokens + 8)]
    assert set(types[n_tokens:]) == {5}  # UNUSED
    assert_same_tokens(result.path, hf_tokenizer(source))


def _trained_tokenizer(pre_tokenizer, *, ignore_merges: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 10 + TOKENIZER_TEXTS * 5, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )


def _pre_tokenizer(layout: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return {
        "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False),
        "smollm": pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        ),
        "llama-bpe": pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"), byte_level]
        ),
        "qwen2": pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"), byte_level]
        ),
    }[layout]


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_pre_tokenizer_is_recognised_from_tokenizer_json(models: dict[str, Path], tmp_path: Path, pre: str):
    """Each layout gets the llama.cpp pre-tokenizer that splits text exactly as transformers does."""
    tokenizer = _trained_tokenizer(_pre_tokenizer(pre), ignore_merges=pre == "llama-bpe")
    model_dir = copy_weights(models["tied"], tmp_path / "m")
    tokenizer.save_pretrained(model_dir)
    result = convert_hf_to_gguf(model_dir, tmp_path / "m.gguf", out_type="f32")
    assert result.warnings == ()
    with llama(result.path, vocab_only=True) as llm:
        assert llm.metadata["tokenizer.ggml.pre"] == pre
    assert_same_tokens(result.path, tokenizer)


def test_unknown_pre_tokenizer_falls_back_to_default_with_a_warning(models: dict[str, Path], tmp_path: Path):
    from tokenizers import pre_tokenizers

    tokenizer = _trained_tokenizer(
        pre_tokenizers.Sequence(
            [pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    )
    model_dir = copy_weights(models["tied"], tmp_path / "m")
    tokenizer.save_pretrained(model_dir)
    result = convert_hf_to_gguf(model_dir, tmp_path / "m.gguf", out_type="f32")
    assert len(result.warnings) == 1 and "tokenizer.ggml.pre='default'" in result.warnings[0]
    with llama(result.path, vocab_only=True) as llm:
        assert llm.metadata["tokenizer.ggml.pre"] == "default"


def test_smollm2_tokenizer_round_trip(tmp_path: Path):
    """SmolLM2's real 49k vocabulary, rebuilt from the bundled GGUF with SmolLM2's pre-tokenizer layout."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from training.ml.bundled import BundledModelMissing, bundled_llm_gguf

    try:
        bundled = bundled_llm_gguf().path
    except BundledModelMissing as exc:
        pytest.skip(str(exc))
    fields = gguf.GGUFReader(bundled).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    control = [
        t for t, kind in zip(tokens, fields["tokenizer.ggml.token_type"].contents(), strict=True) if kind == 3
    ]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = _pre_tokenizer("smollm")
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )

    model_dir = tmp_path / "smollm2"
    fast.save_pretrained(model_dir)
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    result = convert_hf_to_gguf(model_dir, tmp_path / "m.gguf", out_type="f16")
    assert result.warnings == ()
    assert_same_tokens(result.path, fast)
    # The bundled GGUF (converted by llama.cpp's own script) splits the same way.
    assert_same_tokens(bundled, fast)


# --------------------------------------------------------------------------------------------
# 3. Quantization

# Bits per weight each recipe aims at for its bulk tensors (ggml block sizes).
NOMINAL_BITS = {
    "q8_0": 8.5,
    "q6_k": 6.5625,
    "q5_k_m": 5.5,
    "q5_0": 5.5,
    "q4_k_m": 4.5,
    "q4_0": 4.5,
    "q4_1": 5.0,
}
K_QUANTS = {"q6_k", "q5_k_m", "q4_k_m"}


@pytest.fixture(scope="module")
def narrow_f16(models: dict[str, Path]) -> Path:
    path = models["tied"].parent / "tied-f16.gguf"
    return convert_hf_to_gguf(models["tied"], path, out_type="f16").path


@pytest.mark.parametrize("quant_type", list(QUANT_TYPES))
@pytest.mark.parametrize("source", ["narrow-f16", "wide-f32"])
def test_quantize_each_type(
    f32_gguf: dict[str, Path], narrow_f16: Path, tmp_path: Path, source: str, quant_type: str
):
    src = narrow_f16 if source == "narrow-f16" else f32_gguf["wide"]
    result = quantize_gguf(src, tmp_path / "q.gguf", quant_type, threads=1)
    assert result.size_bytes == result.path.stat().st_size < src.stat().st_size
    assert (result.bits_per_weight, result.tensor_types) == gguf_bits_per_weight(result.path)
    assert not list(tmp_path.glob(".*.part"))
    if source == "wide-f32":  # hidden 256: every recipe applies as named
        assert result.fallback_tensors == 0
        assert NOMINAL_BITS[quant_type] <= result.bits_per_weight < NOMINAL_BITS[quant_type] + 0.6
    else:  # hidden 64: rows too short for K-quants, which fall back to 32-blocks
        assert (result.fallback_tensors > 0) == (quant_type != "q8_0")
        if quant_type in K_QUANTS:
            assert result.fallback_tensors == 15  # 14 matrices and the tied embedding's Q6_K
            assert not {"Q4_K", "Q5_K", "Q6_K"} & set(result.tensor_types)
        assert NOMINAL_BITS[quant_type] <= result.bits_per_weight < 9.0
    with llama(result.path, n_ctx=64) as llm:
        output = llm("Reset the pump", max_tokens=8, temperature=0.0)
    assert output["usage"]["completion_tokens"] > 0


def test_quantize_refuses_unknown_types_and_quantized_sources(f32_gguf: dict[str, Path], tmp_path: Path):
    with pytest.raises(ValueError, match="Unknown quantization"):
        quantize_gguf(f32_gguf["wide"], tmp_path / "x.gguf", "q3_k_xl")
    q8 = quantize_gguf(f32_gguf["wide"], tmp_path / "q8.gguf", "q8_0").path
    with pytest.raises(ValueError, match="already quantized"):
        quantize_gguf(q8, tmp_path / "q4.gguf", "q4_0")
    assert not (tmp_path / "q4.gguf").exists()


def test_imatrix_guides_quantization(models: dict[str, Path], f32_gguf: dict[str, Path], tmp_path: Path):
    model_dir = models["wide"]
    imatrix = compute_imatrix(hf_model(model_dir), hf_tokenizer(model_dir), TRAINING_TEXT, n_ctx=64)
    assert len(imatrix) == 2 * 7 and imatrix["blk.0.attn_q.weight"].shape == (256,)
    assert imatrix["blk.1.ffn_down.weight"].shape == (512,)
    assert all(np.isfinite(v).all() and (v >= 0).all() for v in imatrix.values())

    ids = hf_tokenizer(model_dir)(" ".join(TRAINING_TEXT[:3]), add_special_tokens=False)["input_ids"]
    expected = hf_logits(model_dir, ids)

    def rms_error(path: Path) -> float:
        return float(np.sqrt(((llama_logits(path, ids) - expected) ** 2).mean()))

    # Measured RMS logit error without / with: Q4_K_M 2.84 / 2.49, Q4_0 2.35 / 2.16.
    for quant_type in ("q4_k_m", "q4_0"):
        plain = quantize_gguf(f32_gguf["wide"], tmp_path / f"{quant_type}.gguf", quant_type)
        guided = quantize_gguf(
            f32_gguf["wide"], tmp_path / f"{quant_type}-im.gguf", quant_type, imatrix=imatrix
        )
        assert guided.tensor_types == plain.tensor_types
        assert rms_error(guided.path) < 0.97 * rms_error(plain.path)

    with pytest.raises(ValueError, match="does not hold"):
        quantize_gguf(
            f32_gguf["wide"], tmp_path / "x.gguf", "q4_0", imatrix={"blk.9.attn_q.weight": np.ones(256)}
        )
    with pytest.raises(ValueError, match="rows have 256"):
        quantize_gguf(
            f32_gguf["wide"], tmp_path / "x.gguf", "q4_0", imatrix={"blk.0.attn_q.weight": np.ones(8)}
        )


# --------------------------------------------------------------------------------------------
# 4-6. Refusals


def test_pickle_weights_are_refused_without_being_read(models: dict[str, Path], tmp_path: Path):
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    shutil.copy(models["tied"] / "config.json", model_dir)
    shutil.copy(models["tied"] / "tokenizer.json", model_dir)
    # Not even a valid pickle: were it ever unpickled, the test would fail with another error.
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 this is not read")
    with pytest.raises(UnsupportedModel, match="pickle.*refused for safety"):
        convert_hf_to_gguf(model_dir, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.part"))


def test_unsupported_architectures_are_refused_readably(models: dict[str, Path], tmp_path: Path):
    def convert_with(**changes) -> None:
        model_dir = tmp_path / "m"
        shutil.rmtree(model_dir, ignore_errors=True)
        copy_weights(models["tied"], model_dir)
        shutil.copy(models["tied"] / "tokenizer.json", model_dir)
        config = json.loads((model_dir / "config.json").read_text()) | changes
        (model_dir / "config.json").write_text(json.dumps(config))
        convert_hf_to_gguf(model_dir, tmp_path / "m.gguf")

    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel is not a Llama-family model"):
        convert_with(architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModel, match="MistralForCausalLM with a sliding window of 64"):
        convert_with(architectures=["MistralForCausalLM"], sliding_window=64)
    with pytest.raises(UnsupportedModel, match="RoPE scaling 'yarn' is not supported"):
        convert_with(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    # Fails while writing (shapes are checked against config.json): nothing is left behind.
    with pytest.raises(UnsupportedModel, match="has shape"):
        convert_with(intermediate_size=96)
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".*.part"))
    # A Mistral without a window has the Llama layout and converts.
    convert_with(architectures=["MistralForCausalLM"], sliding_window=None)


def test_sentencepiece_tokenizers_are_refused_readably(models: dict[str, Path], tmp_path: Path):
    model_dir = copy_weights(models["tied"], tmp_path / "m")
    (model_dir / "tokenizer.model").write_bytes(b"\x0a\x00")  # never parsed
    with pytest.raises(UnsupportedModel, match=r"SentencePiece tokenizer \(tokenizer.model\)"):
        convert_hf_to_gguf(model_dir, tmp_path / "m.gguf")
    tok = json.loads((models["tied"] / "tokenizer.json").read_text())
    tok["model"]["byte_fallback"] = True  # how Llama 2 / TinyLlama tokenizer.json files look
    (model_dir / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UnsupportedModel, match="SentencePiece-style tokenizer"):
        convert_hf_to_gguf(model_dir, tmp_path / "m.gguf")


# --------------------------------------------------------------------------------------------
# 5. LoRA


def _adapter(base_dir: Path, out_dir: Path, *, targets: list[str], use_rslora: bool = False) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=use_rslora)
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT starts B at zero, which would make any conversion "match"
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.eval().save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_adapter_logits_match_peft(
    models: dict[str, Path], f32_gguf: dict[str, Path], tmp_path: Path, use_rslora: bool
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = models["tied"]
    adapter_dir = _adapter(
        base_dir,
        tmp_path / "adapter",
        targets=["q_proj", "k_proj", "v_proj", "o_proj"],
        use_rslora=use_rslora,
    )
    result = convert_lora_to_gguf(adapter_dir, base_dir, tmp_path / "adapter.gguf")
    assert result.tensors == 2 * 4 * 2  # A and B for 4 projections in 2 layers

    ids = prompt_ids(base_dir)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        expected = peft_model(torch.tensor([ids])).logits[0].numpy()
    base = hf_logits(base_dir, ids)
    assert np.abs(expected - base).max() > 5  # the adapter matters (measured 12-13)
    got = llama_logits(f32_gguf["tied"], ids, lora=result.path)
    assert np.abs(got - expected).max() < 2e-4  # measured 3.4e-5 (LoRA), 2.4e-5 (rsLoRA)


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_lora_on_embeddings_or_output_is_refused(models: dict[str, Path], tmp_path: Path, target: str):
    base_dir = models["untied"]
    adapter_dir = _adapter(base_dir, tmp_path / "adapter", targets=["q_proj", target])
    with pytest.raises(UnsupportedModel, match="embeddings or the output layer"):
        convert_lora_to_gguf(adapter_dir, base_dir, tmp_path / "adapter.gguf")
    assert not (tmp_path / "adapter.gguf").exists()
