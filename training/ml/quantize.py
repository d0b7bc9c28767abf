"""Quantize an F32/F16/BF16 GGUF with llama.cpp, optionally guided by an importance matrix.

Django-free on purpose (see `training/ml/__init__.py`). The work is llama.cpp's own
`llama_model_quantize`, reached through llama-cpp-python; this module picks the parameters, writes
atomically, and reports what the file really holds.

A quantization name is a recipe, not a promise. K-quants pack rows in blocks of 256; a tensor whose
rows do not divide (SmolLM2's hidden size 576 does not) gets an older 32-block type instead, so a
"Q4_K_M" SmolLM2 is mostly Q5_0. Users therefore see `bits_per_weight` measured on the output file,
and `fallback_tensors` counts the tensors that missed their recipe (see `_INTENDED`).

Importance matrix: llama.cpp (0.3.36 here) takes it as an array of `llama_model_imatrix_data
{name, data, size}` ended by an entry whose name is NULL (llama_cpp.py's struct and
`llama_model_quantize_params.imatrix`; src/llama-quant.cpp loops `p->name != nullptr`). Values are
per input column of each weight, the mean of x² over the calibration tokens, which is what
llama-imatrix stores after dividing its sums by the counts. `compute_imatrix` collects them from a
transformers model with forward hooks.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from training.ml.gguf_convert import atomic_output, gguf_tensor_name

__all__ = [
    "QUANT_TYPES",
    "QuantizeResult",
    "compute_imatrix",
    "gguf_bits_per_weight",
    "quantize_gguf",
]

# Name -> llama_ftype (include/llama.h). The K_M mixes give attn_v and ffn_down one size up on a
# subset of layers and the output matrix Q6_K.
QUANT_TYPES: dict[str, int] = {
    "q8_0": 7,
    "q6_k": 18,
    "q5_k_m": 17,
    "q5_0": 8,
    "q4_k_m": 15,
    "q4_0": 2,
    "q4_1": 3,
}

_T = gguf.GGMLQuantizationType
_K_TYPES = frozenset({_T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K})
# The types each recipe gives a matrix whose rows fit its blocks. Legacy recipes store the output
# matrix (or the tied embedding that doubles as it) in Q6_K on purpose, Q8_0 keeps it Q8_0. A 2-D
# tensor of any other type fell back because of its shape: the fallback rule of llama-quant.cpp
# (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, F16 when not even 32 divides).
_INTENDED: dict[str, frozenset[gguf.GGMLQuantizationType]] = {
    "q8_0": frozenset({_T.Q8_0}),
    "q6_k": _K_TYPES,
    "q5_k_m": _K_TYPES,
    "q4_k_m": _K_TYPES,
    "q5_0": frozenset({_T.Q5_0, _T.Q6_K}),
    "q4_0": frozenset({_T.Q4_0, _T.Q6_K}),
    "q4_1": frozenset({_T.Q4_1, _T.Q6_K}),
}
_FLOAT_TYPES = frozenset({_T.F32, _T.F16, _T.BF16})


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    quant_type: str
    size_bytes: int
    bits_per_weight: float  # measured on the file, over all tensors
    tensor_types: dict[str, int]  # "Q4_K": 30, "F32": 61, ...
    fallback_tensors: int  # matrices stored in another type than the recipe intends (shape did not fit)
    seconds: float


def gguf_bits_per_weight(path: Path) -> tuple[float, dict[str, int]]:
    """Bits per weight over all tensors of a GGUF (bytes * 8 / elements) and tensor counts by type."""
    return _bits_and_types(gguf.GGUFReader(path))


def _bits_and_types(reader: gguf.GGUFReader) -> tuple[float, dict[str, int]]:
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_elements = sum(int(t.n_elements) for t in reader.tensors)
    histogram = Counter(t.tensor_type.name for t in reader.tensors)
    return (n_bytes * 8 / n_elements if n_elements else 0.0), dict(histogram.most_common())


def _count_fallbacks(reader: gguf.GGUFReader, quant_type: str) -> int:
    intended = _INTENDED[quant_type]
    return sum(1 for t in reader.tensors if len(t.shape) >= 2 and t.tensor_type not in intended)


def _check_source(reader: gguf.GGUFReader, src: Path) -> None:
    """llama.cpp would refuse a quantized source (or, with allow_requantize, degrade it twice)."""
    quantized = sorted({t.tensor_type.name for t in reader.tensors} - {q.name for q in _FLOAT_TYPES})
    if quantized:
        raise ValueError(
            f"{src.name} is already quantized ({', '.join(quantized)}); quantize from an F32/F16/BF16 GGUF."
        )


def _imatrix_array(imatrix: Mapping[str, np.ndarray], keep: list[Any]) -> Any:
    """A NULL-terminated C array of llama_model_imatrix_data; `keep` holds what it points into."""
    import llama_cpp

    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for entry, (name, values) in zip(entries, imatrix.items(), strict=False):
        data = np.ascontiguousarray(values, dtype=np.float32).ravel()
        if not np.isfinite(data).all():
            raise ValueError(f"The importance matrix for {name} holds non-finite values.")
        encoded = name.encode("utf-8")
        keep.extend((data, encoded))
        entry.name = encoded
        entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = data.size
    entries[len(imatrix)].name = None  # the terminator
    keep.append(entries)
    return ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))


@contextmanager
def _llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines instead of printing them, for the duration of the block.

    Quantizing logs a line per tensor (and a warning per fallback), which would flood a worker's
    log; the lines are kept for the error message instead. llama-cpp-python's own callback cannot
    be quietened by level: its table predates ggml's renumbered log levels, so warnings arrive as
    errors. The callback is process-wide; llama-cpp-python's is put back afterwards.
    """
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(_level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def quantize_gguf(
    src: Path,
    dst: Path,
    quant_type: str,
    *,
    threads: int | None = None,
    imatrix: Mapping[str, np.ndarray] | None = None,
) -> QuantizeResult:
    """Quantize `src` (F32/F16/BF16 GGUF) to `dst` with one of QUANT_TYPES.

    `imatrix` maps GGUF tensor names ("blk.0.attn_q.weight") to per-input-column importances, as
    returned by `compute_imatrix`; tensors it does not name are quantized without one.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"Unknown quantization {quant_type!r}; choose one of {', '.join(QUANT_TYPES)}.")
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    reader = gguf.GGUFReader(src)
    _check_source(reader, src)
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    del reader  # its memory map keeps the file open
    if imatrix:
        for name, values in imatrix.items():
            if name not in shapes:
                raise ValueError(f"The importance matrix names {name!r}, which {src.name} does not hold.")
            if np.size(values) != shapes[name][0]:  # GGUF shapes list the row length first
                raise ValueError(
                    f"The importance matrix for {name} has {np.size(values)} values; its rows have "
                    f"{shapes[name][0]}."
                )

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant_type]
    params.nthread = threads or os.cpu_count() or 1
    keep: list[Any] = []
    if imatrix:
        params.imatrix = _imatrix_array(imatrix, keep)
    try:
        with atomic_output(dst) as tmp, _llama_log() as log:
            status = llama_cpp.llama_model_quantize(
                str(src).encode(), str(tmp).encode(), ctypes.byref(params)
            )
            if status != 0:
                detail = "".join(log[-5:]).strip()
                raise RuntimeError(f"llama.cpp could not quantize {src.name} to {quant_type}: {detail}")
    finally:
        del keep

    reader = gguf.GGUFReader(dst)
    bits, types = _bits_and_types(reader)
    fallbacks = _count_fallbacks(reader, quant_type)
    del reader
    return QuantizeResult(
        path=dst,
        quant_type=quant_type,
        size_bytes=dst.stat().st_size,
        bits_per_weight=bits,
        tensor_types=types,
        fallback_tensors=fallbacks,
        seconds=time.perf_counter() - started,
    )


def compute_imatrix(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_tokens: int = 8192,
    n_ctx: int = 512,
) -> dict[str, np.ndarray]:
    """Mean x² per input column of every linear layer in the decoder blocks, keyed by GGUF name.

    The texts are joined (EOS between them, when the tokenizer has one), cut to `max_tokens` and
    run in independent windows of `n_ctx` tokens, like llama-imatrix's chunks. The model runs as
    it is (use fp32) without gradients; q/k row permutation does not matter, since it reorders
    outputs and importances describe inputs.
    """
    import torch

    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    if not ids:
        raise ValueError("No calibration tokens: texts are empty.")

    n_layers = int(model.config.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float32)
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{module_name}":
            gguf_name = gguf_tensor_name(f"{module_name}.weight", n_layers)
            if gguf_name:
                handles.append(module.register_forward_pre_hook(hook_for(gguf_name)))
    if not handles:
        raise ValueError("The model has no decoder-layer linear layers with a known GGUF name.")

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(ids), n_ctx):
                window = torch.tensor([ids[start : start + n_ctx]], device=model.device)
                model(window, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: (sums[name] / counts[name]).cpu().numpy().astype(np.float32) for name in sorted(sums)}
