"""Hugging Face Llama-family checkpoints (and PEFT LoRA adapters on them) to GGUF for llama.cpp.

Django-free on purpose (see `training/ml/__init__.py`). Written on the `gguf` package alone, after
reading how llama.cpp's own convert_hf_to_gguf.py / convert_lora_to_gguf.py do it; only the parts a
Llama-layout model needs, so every refusal can say exactly what is missing.

What converts:

- Architectures `LlamaForCausalLM` (SmolLM/SmolLM2, TinyLlama, Llama 2/3) and `MistralForCausalLM`
  without a sliding window (the GGUF "llama" graph attends to the whole context, so a model trained
  with a window would silently change). Anything else raises `UnsupportedModel`.
- Weights from `*.safetensors` only (sharded through `model.safetensors.index.json` too). A folder
  with only `.bin`/`.pt`/`.pth`/`.ckpt` files is refused: those are pickles, and unpickling runs
  arbitrary code from the file.
- RoPE: default, `linear` (a GGUF key) and `llama3` (a `rope_freqs` tensor of per-frequency
  divisors). Other scalings (dynamic, yarn, longrope) are refused rather than approximated.
- Tokenizers: byte-level BPE from `tokenizer.json` ("gpt2" in GGUF terms). llama.cpp splits text
  with a hard-coded regex chosen by the `tokenizer.ggml.pre` name; its converter picks that name by
  hashing the token ids of a test string, which only knows tokenizers someone has hashed. We read
  the pre-tokenizer structure instead (`_PRE_TOKENIZERS`): plain ByteLevel with the GPT-2 regex is
  "gpt-2", Digits(individual) + ByteLevel is "smollm", Llama 3's Split regex + ByteLevel is
  "llama-bpe", Qwen2's is "qwen2". An unknown structure gets "default" and a warning in
  `ConvertResult.warnings`: text may then tokenize differently in llama.cpp.
- SentencePiece tokenizers (GGUF model "llama": Llama 2, TinyLlama, Mistral v0.1) are NOT
  supported: their GGUF vocabulary needs per-piece scores from `tokenizer.model`, which takes the
  `sentencepiece` package, and this environment does not install it. They raise `UnsupportedModel`.

Files are written next to the destination and renamed into place, so a crash never leaves a
half-written GGUF under the final name.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "GPT2_PATTERN",
    "LLAMA3_PATTERN",
    "LLAMA_ARCHITECTURES",
    "OUT_TYPES",
    "QWEN2_PATTERN",
    "ConvertResult",
    "LlamaHParams",
    "UnsupportedModel",
    "atomic_output",
    "convert_hf_to_gguf",
    "convert_lora_to_gguf",
    "gguf_tensor_name",
    "read_llama_config",
]

logger = logging.getLogger(__name__)

OUT_TYPES = ("f32", "f16", "bf16", "q8_0")
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_QTYPE = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
_FILE_TYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


class UnsupportedModel(Exception):
    """The folder cannot be converted; the message is written for the person who chose it."""


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    out_type: str
    tensors: int
    size_bytes: int
    seconds: float
    # Tensors written as F16 instead of Q8_0 because their rows are not a whole number of blocks.
    fallback_tensors: int = 0
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Shared helpers


@contextmanager
def atomic_output(out_path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `out_path`; on success it replaces `out_path` in one rename.

    Beside, not in /tmp: a rename is only atomic within one file system.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        yield tmp
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


def gguf_tensor_name(hf_name: str, n_layers: int) -> str | None:
    """The GGUF name llama.cpp expects for a Hugging Face Llama tensor ("blk.0.attn_q.weight")."""
    return _name_map(n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))


_name_maps: dict[int, gguf.TensorNameMap] = {}


def _name_map(n_layers: int) -> gguf.TensorNameMap:
    if n_layers not in _name_maps:
        _name_maps[n_layers] = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    return _name_maps[n_layers]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnsupportedModel(f"{path.name} is missing from {path.parent}.") from None
    except json.JSONDecodeError as exc:
        raise UnsupportedModel(f"{path.name} is not valid JSON: {exc}.") from None


def _permute_for_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from Hugging Face's RoPE layout to llama.cpp's.

    Transformers rotates the first half of each head against the second half (`rotate_half`);
    llama.cpp's "normal" RoPE rotates adjacent pairs. Interleaving the two halves of every head
    makes both compute the same attention scores.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class LlamaHParams:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    head_dim_in_config: bool  # only then are key/value lengths written, as llama.cpp's converter does
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    rope: dict[str, Any]  # rope_type plus that type's parameters; {"rope_type": "default"} if none
    tie_word_embeddings: bool
    config: dict[str, Any] = field(repr=False, compare=False)


def read_llama_config(model_dir: Path) -> LlamaHParams:
    """config.json of a Llama-layout model, checked for what the GGUF "llama" graph can run."""
    config = _read_json(Path(model_dir) / "config.json")
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    arch = architectures[0]
    if arch not in LLAMA_ARCHITECTURES:
        raise UnsupportedModel(
            f"{arch} is not a Llama-family model; GGUF conversion supports {', '.join(LLAMA_ARCHITECTURES)}."
        )
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "unknown")
        raise UnsupportedModel(
            f"The checkpoint is already quantized ({method}); convert the unquantized model instead."
        )
    n_positions = int(config.get("max_position_embeddings") or 2048)
    window = config.get("sliding_window")
    if arch == "MistralForCausalLM" and window and int(window) < n_positions:
        raise UnsupportedModel(
            f"MistralForCausalLM with a sliding window of {window} tokens (context {n_positions}) is not "
            "supported: llama.cpp's Llama graph attends to the whole context and would compute "
            "something else beyond the window."
        )
    if config.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"Activation {config['hidden_act']!r} is not supported; Llama uses silu.")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise UnsupportedModel("Models with bias terms in attention or MLP layers are not supported.")

    hidden = int(config["hidden_size"])
    n_heads = int(config["num_attention_heads"])
    head_dim = config.get("head_dim")
    # transformers 5 nests RoPE settings in rope_parameters; 4.x has rope_theta and rope_scaling.
    rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope_theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
    if rope_type not in ("default", "linear", "llama3"):
        raise UnsupportedModel(
            f"RoPE scaling {rope_type!r} is not supported (only default, linear and llama3 convert exactly)."
        )
    return LlamaHParams(
        architecture=arch,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        n_layers=int(config["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim) if head_dim else hidden // n_heads,
        head_dim_in_config=bool(head_dim),
        context_length=n_positions,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope={"rope_type": rope_type, **rope},
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        config=config,
    )


def _llama3_rope_factors(hp: LlamaHParams) -> np.ndarray:
    """Per-frequency divisors that turn llama.cpp's plain RoPE into Llama 3's scaled one.

    Transformers divides the low frequencies by `factor`, keeps the high ones and blends linearly
    in wavelength between; llama.cpp divides each frequency by the matching `rope_freqs` entry.
    """
    rope = hp.rope
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    dim = hp.head_dim
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = np.where(
        wavelen < old_context / high,
        1.0,
        np.where(wavelen > old_context / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    return factors.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Weights


class _SafetensorsCheckpoint:
    """Tensor names, shapes and data across one or more safetensors files, never a pickle."""

    def __init__(self, model_dir: Path, *, pattern: str = "*.safetensors") -> None:
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.exists() and pattern == "*.safetensors":
            weight_map: dict[str, str] = _read_json(index)["weight_map"]
            files = sorted({model_dir / f for f in weight_map.values()})
        else:
            files = sorted(model_dir.glob(pattern))
        if not files:
            pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise UnsupportedModel(
                    f"Only pickle weight files were found ({', '.join(pickles)}). They are refused for "
                    "safety: loading a pickle runs code stored in the file. Save the model as "
                    "safetensors (save_pretrained(..., safe_serialization=True)) and try again."
                )
            raise UnsupportedModel(f"No .safetensors weight files in {model_dir}.")
        self.files = files
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}
        from safetensors import safe_open

        for file in files:
            handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                self._where[name] = handle

    def __enter__(self) -> _SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def float32(self, name: str) -> np.ndarray:
        import torch

        return self.tensor(name).to(torch.float32).numpy()


@dataclass(frozen=True)
class _PlannedTensor:
    gguf_name: str
    shape: tuple[int, ...]  # numpy order: rows first
    qtype: gguf.GGMLQuantizationType
    source: str | None  # tensor name in the checkpoint; None for one we compute
    rope_heads: int | None = None  # q/k projections: permute rows for llama.cpp's RoPE layout
    scale: float = 1.0


def _choose_type(shape: tuple[int, ...], out_type: str) -> tuple[gguf.GGMLQuantizationType, bool]:
    """The stored type and whether it is a fallback from the requested one.

    Norms and other vectors stay F32: they are tiny, and llama.cpp reads them as F32 anyway.
    Q8_0 packs rows in blocks of 32; a row that does not divide gets F16.
    """
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32, False
    qtype = _QTYPE[out_type]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16, True
    return qtype, False


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * type_size


def _encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def _expected_shapes(hp: LlamaHParams) -> dict[str, tuple[int, ...]]:
    q_rows, kv_rows = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (hp.vocab_size, hp.hidden_size),
        "output_norm.weight": (hp.hidden_size,),
    }
    if not hp.tie_word_embeddings:
        shapes["output.weight"] = (hp.vocab_size, hp.hidden_size)
    for i in range(hp.n_layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hp.hidden_size,),
            f"blk.{i}.attn_q.weight": (q_rows, hp.hidden_size),
            f"blk.{i}.attn_k.weight": (kv_rows, hp.hidden_size),
            f"blk.{i}.attn_v.weight": (kv_rows, hp.hidden_size),
            f"blk.{i}.attn_output.weight": (hp.hidden_size, q_rows),
            f"blk.{i}.ffn_norm.weight": (hp.hidden_size,),
            f"blk.{i}.ffn_gate.weight": (hp.intermediate_size, hp.hidden_size),
            f"blk.{i}.ffn_up.weight": (hp.intermediate_size, hp.hidden_size),
            f"blk.{i}.ffn_down.weight": (hp.hidden_size, hp.intermediate_size),
        }
    return shapes


def _rope_heads(gguf_name: str, hp: LlamaHParams) -> int | None:
    if gguf_name.endswith(".attn_q.weight"):
        return hp.n_heads
    if gguf_name.endswith(".attn_k.weight"):
        return hp.n_kv_heads
    return None


def _tensor_order(name: str) -> tuple[int, int, str]:
    """token_embd first, then the blocks in layer order, then the output tensors."""
    if match := re.match(r"blk\.(\d+)\.", name):
        return (1, int(match.group(1)), name)
    return (0 if name.startswith(("token_embd", "rope_freqs")) else 2, 0, name)


def _plan_model_tensors(
    ckpt: _SafetensorsCheckpoint, hp: LlamaHParams, out_type: str
) -> tuple[list[_PlannedTensor], int]:
    expected = _expected_shapes(hp)
    plan: list[_PlannedTensor] = []
    fallbacks = 0
    for hf_name in ckpt.names():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp from rope.freq_base
        if hf_name == "lm_head.weight" and hp.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd, as transformers does
        name = gguf_tensor_name(hf_name, hp.n_layers)
        if name is None or name not in expected:
            raise UnsupportedModel(f"Unexpected tensor {hf_name!r}: this is not a plain Llama layout.")
        shape = ckpt.shape(hf_name)
        if shape != expected[name]:
            raise UnsupportedModel(
                f"{hf_name} has shape {list(shape)} but config.json implies {list(expected[name])}."
            )
        qtype, fell_back = _choose_type(shape, out_type)
        fallbacks += fell_back
        plan.append(_PlannedTensor(name, shape, qtype, hf_name, _rope_heads(name, hp)))
    missing = sorted(set(expected) - {t.gguf_name for t in plan})
    if missing:
        raise UnsupportedModel(f"The checkpoint lacks tensors llama.cpp needs: {', '.join(missing[:5])}.")
    if hp.rope["rope_type"] == "llama3":
        plan.append(
            _PlannedTensor("rope_freqs.weight", (hp.head_dim // 2,), gguf.GGMLQuantizationType.F32, None)
        )
    plan.sort(key=lambda t: _tensor_order(t.gguf_name))
    return plan, fallbacks


def _write_tensors(
    writer: gguf.GGUFWriter,
    plan: list[_PlannedTensor],
    load: Callable[[_PlannedTensor], np.ndarray],
    progress: Callable[[int, int], None] | None,
) -> None:
    """Header, metadata and tensor directory first, then the data one tensor at a time.

    Streaming keeps memory at one tensor instead of the whole model (a 1B model is 4 GB in F32).
    """
    for t in plan:
        writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), _nbytes(t.shape, t.qtype), t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for done, t in enumerate(plan, start=1):
        data = load(t)
        if t.rope_heads:
            data = _permute_for_rope(data, t.rope_heads)
        if t.scale != 1.0:
            data = data * np.float32(t.scale)
        writer.write_tensor_data(_encode(data, t.qtype))
        if progress:
            progress(done, len(plan))
    writer.close()


def _add_hparams(writer: gguf.GGUFWriter, hp: LlamaHParams) -> None:
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden_size)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.intermediate_size)
    writer.add_head_count(hp.n_heads)
    writer.add_head_count_kv(hp.n_kv_heads)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_norm_eps)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim_in_config:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_vocab_size(hp.vocab_size)
    if hp.rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp.rope["factor"]))


# --------------------------------------------------------------------------------------------
# Tokenizer

# The regex Hugging Face's ByteLevel pre-tokenizer applies when use_regex is on (GPT-2's).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.json pre-tokenizer pipeline (as normalised by _pre_tokenizer_steps) -> the
# tokenizer.ggml.pre name whose hard-coded regexes in llama.cpp (src/llama-vocab.cpp) split the
# same way. "smollm" shares StarCoder's rules: single digits first, then the GPT-2 regex.
_PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    (f"split:{GPT2_PATTERN}", "bytelevel"): "gpt-2",
    ("digits", f"split:{GPT2_PATTERN}", "bytelevel"): "smollm",
    (f"split:{LLAMA3_PATTERN}", "bytelevel"): "llama-bpe",
    (f"split:{QWEN2_PATTERN}", "bytelevel"): "qwen2",
}
# llama.cpp applies whole-word lookups before merges ("ignore_merges") for these only.
_PRE_IGNORES_MERGES = {"llama-bpe"}


def _pre_tokenizer_steps(node: dict[str, Any] | None) -> tuple[str, ...]:
    """Flatten a tokenizer.json pre_tokenizer into comparable steps ("digits", "split:<regex>"...)."""
    if not node:
        return ()
    kind = node.get("type")
    if kind == "Sequence":
        return tuple(step for child in node.get("pretokenizers", []) for step in _pre_tokenizer_steps(child))
    if kind == "ByteLevel":
        prefix = ("bytelevel-prefix-space",) if node.get("add_prefix_space") else ()
        regex = (f"split:{GPT2_PATTERN}",) if node.get("use_regex", True) else ()
        return (*prefix, *regex, "bytelevel")
    if kind == "Digits":
        return ("digits" if node.get("individual_digits") else "digit-runs",)
    if kind == "Split":
        pattern = node.get("pattern", {})
        if "Regex" in pattern and node.get("behavior") == "Isolated" and not node.get("invert"):
            return (f"split:{pattern['Regex']}",)
        return (f"split-other:{json.dumps(node, sort_keys=True)}",)
    return (f"other:{kind}",)


@dataclass
class _Vocab:
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # "bos" | "eos" | "unk" | "pad" -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    warnings: list[str]


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _template_ends(post_processor: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """Special tokens the post-processor puts before and after a single sequence."""
    if not post_processor:
        return None, None
    for proc in post_processor.get("processors", [post_processor]):
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single", [])
            first = single[0].get("SpecialToken", {}).get("id") if single else None
            last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
            return first, last
    return None, None


def _chat_template(model_dir: Path, tok_config: dict[str, Any]) -> str | None:
    jinja = model_dir / "chat_template.jinja"  # where transformers 5 saves it
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp reads the default one
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template or None


def _read_bpe_vocab(model_dir: Path, hp: LlamaHParams) -> _Vocab:
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        if (model_dir / "tokenizer.model").is_file():
            raise UnsupportedModel(
                "This model uses a SentencePiece tokenizer (tokenizer.model) without a tokenizer.json; "
                "SentencePiece vocabularies are not supported by this converter."
            )
        raise UnsupportedModel("tokenizer.json is missing; the GGUF needs the tokenizer.")
    tok = _read_json(tok_path)
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedModel(
            f"Tokenizer type {model.get('type')!r} is not supported; only byte-level BPE is."
        )
    steps = _pre_tokenizer_steps(tok.get("pre_tokenizer"))
    if (
        model.get("byte_fallback")
        or "other:Metaspace" in steps
        or "Prepend" in json.dumps(tok.get("normalizer"))
    ):
        raise UnsupportedModel(
            "This is a SentencePiece-style tokenizer (GGUF model 'llama', as in Llama 2, TinyLlama and "
            "Mistral v0.1). Its GGUF vocabulary needs piece scores from tokenizer.model via the "
            "sentencepiece package, which is not installed; only byte-level BPE tokenizers convert."
        )
    if "bytelevel" not in steps:
        raise UnsupportedModel("The tokenizer is not a byte-level BPE, the only kind this converter writes.")
    warnings: list[str] = []
    pre = _PRE_TOKENIZERS.get(steps)
    if pre is None:
        pre = "default"
        warnings.append(
            "Unrecognised pre-tokenizer in tokenizer.json; wrote tokenizer.ggml.pre='default', so llama.cpp "
            "may split some text differently from transformers."
        )
    elif bool(model.get("ignore_merges")) != (pre in _PRE_IGNORES_MERGES):
        warnings.append(
            f"tokenizer.json has ignore_merges={bool(model.get('ignore_merges'))} but llama.cpp's {pre!r} "
            "pre-tokenizer assumes the opposite; rare words may tokenize differently."
        )
    if tok.get("normalizer"):
        warnings.append(
            f"tokenizer.json has a {tok['normalizer'].get('type')} normalizer, which llama.cpp does not apply."
        )

    # Normal tokens carry their byte-level spelling ("Ġthe"); added tokens their raw text.
    by_id: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    types: dict[int, int] = dict.fromkeys(by_id, int(gguf.TokenType.NORMAL))
    for added in tok.get("added_tokens", []):
        i = int(added["id"])
        by_id[i] = added["content"]
        types[i] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    if by_id and max(by_id) >= hp.vocab_size:
        raise UnsupportedModel(
            f"The tokenizer has token id {max(by_id)} but the model's vocab_size is {hp.vocab_size}."
        )
    tokens, token_types = [], []
    for i in range(hp.vocab_size):  # the embedding may have more rows than the tokenizer has ids
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        token_types.append(types.get(i, int(gguf.TokenType.UNUSED)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    tok_config_path = model_dir / "tokenizer_config.json"
    tok_config = _read_json(tok_config_path) if tok_config_path.is_file() else {}
    specials_path = model_dir / "special_tokens_map.json"
    specials_map = _read_json(specials_path) if specials_path.is_file() else {}
    ids = {t: i for i, t in by_id.items()}
    special_ids: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        content = _token_content(tok_config.get(f"{kind}_token")) or _token_content(
            specials_map.get(f"{kind}_token")
        )
        if content in ids:
            special_ids[kind] = ids[content]
        elif isinstance(hp.config.get(f"{kind}_token_id"), int):
            special_ids[kind] = hp.config[f"{kind}_token_id"]
        elif isinstance(hp.config.get(f"{kind}_token_id"), list) and hp.config[f"{kind}_token_id"]:
            special_ids[kind] = int(hp.config[f"{kind}_token_id"][0])

    # Whether encode() adds BOS/EOS: an explicit flag wins, else what the post-processor inserts.
    first, last = _template_ends(tok.get("post_processor"))
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:
        add_bos = first is not None and ids.get(first) == special_ids.get("bos")
    add_eos = tok_config.get("add_eos_token")
    if add_eos is None:
        add_eos = last is not None and ids.get(last) == special_ids.get("eos")

    return _Vocab(
        pre=pre,
        tokens=tokens,
        token_types=token_types,
        merges=merges,
        special_ids=special_ids,
        add_bos=bool(add_bos),
        add_eos=bool(add_eos),
        chat_template=_chat_template(model_dir, tok_config),
        warnings=warnings,
    )


def _add_vocab(writer: gguf.GGUFWriter, vocab: _Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for kind, token_id in vocab.special_ids.items():
        adders[kind](token_id)
    # Always explicit: llama.cpp's defaults differ between pre-tokenizers.
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# --------------------------------------------------------------------------------------------
# Public entry points


def convert_hf_to_gguf(
    model_dir: Path,
    out_path: Path,
    *,
    out_type: str = "f16",
    name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ConvertResult:
    """Write a Hugging Face Llama-family model folder as one GGUF file llama.cpp can run.

    `progress(done, total)` is called after each tensor is written.
    """
    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type must be one of {', '.join(OUT_TYPES)}, not {out_type!r}.")
    started = time.perf_counter()
    model_dir, out_path = Path(model_dir), Path(out_path)
    hp = read_llama_config(model_dir)
    vocab = _read_bpe_vocab(model_dir, hp)
    with _SafetensorsCheckpoint(model_dir) as ckpt, atomic_output(out_path) as tmp:
        plan, fallbacks = _plan_model_tensors(ckpt, hp, out_type)
        rope_factors = _llama3_rope_factors(hp) if hp.rope["rope_type"] == "llama3" else None

        def load(t: _PlannedTensor) -> np.ndarray:
            return ckpt.float32(t.source) if t.source else rope_factors

        writer = gguf.GGUFWriter(path=tmp, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or Path(hp.config.get("_name_or_path") or model_dir.name).name)
        _add_hparams(writer, hp)
        writer.add_file_type(_FILE_TYPE[out_type])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_vocab(writer, vocab)
        try:
            _write_tensors(writer, plan, load, progress)
        finally:
            writer.close()
    for message in vocab.warnings:
        logger.warning("%s: %s", model_dir, message)
    return ConvertResult(
        path=out_path,
        out_type=out_type,
        tensors=len(plan),
        size_bytes=out_path.stat().st_size,
        seconds=time.perf_counter() - started,
        fallback_tensors=fallbacks,
        warnings=tuple(vocab.warnings),
    )


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def convert_lora_to_gguf(
    adapter_dir: Path, base_dir: Path, out_path: Path, *, out_type: str = "f32"
) -> ConvertResult:
    """Write a PEFT LoRA adapter trained on `base_dir` as a GGUF adapter for llama.cpp.

    llama.cpp scales each LoRA product by alpha / rank (rank read from lora_b), PEFT by
    lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; the stored alpha is chosen so the two
    agree, and per-module rank/alpha patterns are folded into lora_b.
    """
    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type must be one of {', '.join(OUT_TYPES)}, not {out_type!r}.")
    started = time.perf_counter()
    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    hp = read_llama_config(Path(base_dir))
    cfg = _read_json(adapter_dir / "adapter_config.json")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UnsupportedModel(f"Adapter type {cfg.get('peft_type')!r} is not supported; only LoRA is.")
    if cfg.get("use_dora"):
        raise UnsupportedModel("DoRA adapters are not supported by llama.cpp; merge the adapter instead.")
    if cfg.get("modules_to_save"):
        raise UnsupportedModel(
            f"The adapter also trains whole modules ({', '.join(cfg['modules_to_save'])}), which a GGUF "
            "LoRA cannot carry; merge the adapter into the model instead."
        )
    if cfg.get("fan_in_fan_out"):
        raise UnsupportedModel("Adapters with fan_in_fan_out are not supported (that is for GPT-2 layers).")
    if cfg.get("lora_bias"):
        raise UnsupportedModel("LoRA adapters with bias terms are not supported by llama.cpp.")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora"))
    rank_pattern: dict[str, int] = cfg.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = cfg.get("alpha_pattern") or {}
    # llama.cpp: scale = alpha_gguf / rank. PEFT: alpha / r, or alpha / sqrt(r) with rsLoRA.
    gguf_alpha = alpha * math.sqrt(r) if rslora else alpha

    def peft_scale(module: str) -> tuple[int, float]:
        """(rank, PEFT scaling) for a module, honouring rank_pattern/alpha_pattern (suffix keys)."""
        rank = next((int(v) for k, v in rank_pattern.items() if re.search(rf"(^|\.){k}$", module)), r)
        a = next((float(v) for k, v in alpha_pattern.items() if re.search(rf"(^|\.){k}$", module)), alpha)
        return rank, a / math.sqrt(rank) if rslora else a / rank

    expected = _expected_shapes(hp)
    with (
        _SafetensorsCheckpoint(adapter_dir, pattern="adapter_model.safetensors") as ckpt,
        atomic_output(out_path) as tmp,
    ):
        plan: list[_PlannedTensor] = []
        fallbacks = 0
        for key in ckpt.names():
            if "embed_tokens" in key or "lm_head" in key:
                raise UnsupportedModel(
                    "The adapter changes the embeddings or the output layer, which llama.cpp adapters "
                    "cannot carry; merge the adapter into the model instead."
                )
            match = _LORA_KEY.match(key)
            if not match:
                raise UnsupportedModel(
                    f"Unexpected tensor {key!r} in the adapter; only LoRA A/B weights convert."
                )
            module = match["module"]
            base_name = gguf_tensor_name(f"{module}.weight", hp.n_layers)
            if base_name is None or base_name not in expected or len(expected[base_name]) != 2:
                raise UnsupportedModel(f"The adapter targets {module!r}, which is not a Llama linear layer.")
            shape = ckpt.shape(key)
            rows, cols = expected[base_name]
            rank, scale = peft_scale(module)
            ok = shape == ((rank, cols) if match["ab"] == "A" else (rows, rank))
            if not ok:
                raise UnsupportedModel(
                    f"{key} has shape {list(shape)}, which does not fit {base_name} of the base model "
                    f"({rows}x{cols}, rank {rank}); was the adapter trained on a different model?"
                )
            qtype, fell_back = _choose_type(shape, out_type)
            fallbacks += fell_back
            is_b = match["ab"] == "B"
            plan.append(
                _PlannedTensor(
                    gguf_name=f"{base_name}.lora_{match['ab'].lower()}",
                    shape=shape,
                    qtype=qtype,
                    source=key,
                    # W' = P·W for q/k, so the update P·B·A only needs B's rows permuted.
                    rope_heads=_rope_heads(base_name, hp) if is_b else None,
                    scale=scale / (gguf_alpha / rank) if is_b else 1.0,
                )
            )
        if not plan:
            raise UnsupportedModel("adapter_model.safetensors holds no LoRA weights.")
        names = {t.gguf_name for t in plan}
        unpaired = sorted(n for n in names if n[:-1] + ("b" if n.endswith("a") else "a") not in names)
        if unpaired:
            raise UnsupportedModel(f"LoRA weights without their partner: {', '.join(unpaired[:3])}.")
        plan.sort(key=lambda t: _tensor_order(t.gguf_name))

        writer = gguf.GGUFWriter(path=tmp, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(adapter_dir.name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, gguf_alpha)
        writer.add_file_type(_FILE_TYPE[out_type])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        try:
            _write_tensors(writer, plan, lambda t: ckpt.float32(t.source), None)
        finally:
            writer.close()
    return ConvertResult(
        path=out_path,
        out_type=out_type,
        tensors=len(plan),
        size_bytes=out_path.stat().st_size,
        seconds=time.perf_counter() - started,
        fallback_tensors=fallbacks,
    )
