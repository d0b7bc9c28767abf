"""A version's model as a GGUF file of the type asked for (`manage.py exportgguf`)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .ml import gguf_convert, quantize
from .models import ModelVersion
from .registry import BaseNotConvertible, base_model_weights, base_model_weights_path

EXPORT_TYPES = ("f32", "f16", "bf16", *quantize.QUANT_TYPES)


class ExportError(Exception):
    """The version cannot be exported as that type; the message says why."""


@dataclass(frozen=True)
class Exported:
    path: Path
    type: str
    size_bytes: int
    bits_per_weight: float
    made: str  # "copied", "converted" or "quantized"


def version_export_gguf(*, version: ModelVersion, out: Path, type: str | None = None) -> Exported:
    """Copy the version's own GGUF, or make another type: unquantized types are converted from
    its safetensors weights, quantized ones made from its unquantized parent (never from an
    already quantized file, which would stack the losses)."""
    wanted = (type or version.quant_type or "").lower()
    if wanted and wanted not in EXPORT_TYPES:
        raise ExportError(f"Unknown type “{wanted}”. Known: {', '.join(EXPORT_TYPES)}.")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not wanted or wanted == version.quant_type:
        if not version.gguf_file.is_file():
            raise ExportError(f"The model file of {version.name} is missing: {version.gguf_file}")
        if out.resolve() == version.gguf_file.resolve():
            raise ExportError("--out is the version's own file; choose another path.")
        shutil.copyfile(version.gguf_file, out)
        made = "copied"
    elif wanted in ("f32", "f16", "bf16"):
        gguf_convert.convert_hf_to_gguf(_weights(version), out, out_type=wanted, name=version.name)
        made = "converted"
    else:
        parent = version.parent_gguf
        with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
            if parent is None or not parent.is_file():
                parent = Path(scratch) / "parent-f16.gguf"
                gguf_convert.convert_hf_to_gguf(_weights(version), parent, out_type="f16", name=version.name)
            quantize.quantize_gguf(parent, out, wanted)
        made = "quantized"
    bits, _ = quantize.gguf_bits_per_weight(out)
    return Exported(out, wanted or "as built", out.stat().st_size, bits, made)


def _weights(version: ModelVersion) -> Path:
    if version.hf_path is not None:
        if (version.hf_path / "config.json").is_file():
            return version.hf_path
        # Its own weights (a trained or pruned model) are gone: the base's would be another model.
        if version.base is None or version.hf_path != base_model_weights_path(version.base):
            raise ExportError(f"The weights of {version.name} are missing: {version.hf_path}")
    if version.base is None:
        raise ExportError(f"{version.name} records no weights to convert from; export it as built.")
    try:
        return base_model_weights(version.base)
    except BaseNotConvertible as exc:
        raise ExportError(str(exc)) from None
