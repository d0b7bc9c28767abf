"""The base-model registry: the bundled SmolLM2, and models an admin registers.

A base model is used two ways: served as a GGUF as it is (RAG over the bundled Q4_1), and read
as safetensors weights by conversion, quantization and (later) training. The bundled model has
only a GGUF, so its weights are dequantized once into a safetensors folder in MODEL_CACHE_DIR.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils.text import slugify

from .ml import base_models
from .ml.bundled import bundled_llm_gguf
from .models import BaseModel, stored_path

BUNDLED_SLUG = "smollm2-135m-instruct"
# Architectures our GGUF converter writes (training/ml/gguf_convert.py).
CONVERTIBLE = ("LlamaForCausalLM", "MistralForCausalLM")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model_default() -> BaseModel:
    """The bundled SmolLM2-135M-Instruct row, created on first use and kept pointing at the
    installed file (a new virtualenv moves site-packages)."""
    gguf = bundled_llm_gguf()
    base = BaseModel.objects.filter(kind=BaseModel.Kind.BUNDLED).first()
    if base is None:
        try:
            with transaction.atomic():
                base = BaseModel.objects.create(
                    slug=BUNDLED_SLUG,
                    name="SmolLM2-135M-Instruct (bundled)",
                    kind=BaseModel.Kind.BUNDLED,
                    source=f"{gguf.distribution} {gguf.version}",
                    gguf_path=str(gguf.path),
                    info=_info(gguf.path),
                )
        except IntegrityError:  # another process created it first
            base = BaseModel.objects.get(kind=BaseModel.Kind.BUNDLED)
    elif base.gguf_path != str(gguf.path):
        base.gguf_path, base.info = str(gguf.path), _info(gguf.path)
        base.save(update_fields=["gguf_path", "info"])
    return base


def base_models_list() -> list[BaseModel]:
    base_model_default()
    return list(BaseModel.objects.all())


def _info(path: Path) -> dict:
    return asdict(base_models.inspect_model(path))


def base_model_register(*, source: str, name: str = "", user: AbstractBaseUser | None = None) -> BaseModel:
    """Register a local safetensors folder, a local GGUF file, or (online only) a hub id."""
    source = source.strip()
    if not source:
        raise ValidationError(
            "Give a folder, a .gguf file or a hub id such as HuggingFaceTB/SmolLM2-360M-Instruct."
        )
    path = Path(source).expanduser()
    slug = _unique_slug(name or (path.stem if path.suffix == ".gguf" else path.name))
    try:
        if path.exists():
            path = path.resolve()
            base_models.refuse_pickles(path)
            info = base_models.inspect_model(path)
            if path.is_dir():
                kind, hf_dir, gguf_path = BaseModel.Kind.HF, str(path), ""
            elif path.suffix.lower() == ".gguf":
                kind, hf_dir, gguf_path = BaseModel.Kind.GGUF, "", str(path)
            else:
                raise ValidationError("Register a model folder (config.json + safetensors) or a .gguf file.")
        elif HUB_ID.match(source):
            target = Path(settings.MODEL_CACHE_DIR) / "base" / slug / "hf"
            # No row holds this slug, so a folder there is left from a failed attempt.
            shutil.rmtree(target.parent, ignore_errors=True)
            downloaded = base_models.download_hub_model(source, target)
            info = base_models.inspect_model(downloaded)
            if info.architecture not in CONVERTIBLE:
                shutil.rmtree(target.parent, ignore_errors=True)
            kind, hf_dir, gguf_path = BaseModel.Kind.HUB, stored_path(downloaded), ""
        else:
            raise ValidationError(f"“{source}” is neither a file or folder on this server nor a hub id.")
    except (base_models.UnsafeModelFile, base_models.ModelUnavailable) as exc:
        raise ValidationError(str(exc)) from None
    if kind != BaseModel.Kind.GGUF and info.architecture not in CONVERTIBLE:
        raise ValidationError(
            f"{info.architecture} is not supported yet: builds convert Llama-family models "
            f"({', '.join(CONVERTIBLE)})."
        )
    return BaseModel.objects.create(
        slug=slug,
        name=name or (path.name if path.exists() else source),
        kind=kind,
        source=source,
        hf_dir=hf_dir,
        gguf_path=gguf_path,
        info=asdict(info),
        added_by=user,
    )


def _unique_slug(name: str) -> str:
    stem = slugify(name)[:80] or "model"
    slug, n = stem, 2
    # The bundled model's slug stays its own even before its row exists.
    while slug == BUNDLED_SLUG or BaseModel.objects.filter(slug=slug).exists():
        slug, n = f"{stem}-{n}", n + 1
    return slug


class BaseNotConvertible(Exception):
    """The base has no weights to convert (a quantized GGUF registered on its own)."""


def base_has_weights(base: BaseModel) -> bool:
    """Whether builds can convert (and so quantize or train) this base."""
    return base.hf_path is not None or base.kind == BaseModel.Kind.BUNDLED


def base_model_weights_path(base: BaseModel) -> Path | None:
    """Where `base_model_weights` puts (or finds) the weights, without preparing them."""
    if base.hf_path is not None:
        return base.hf_path
    if base.kind != BaseModel.Kind.BUNDLED or base.gguf_file is None:
        return None
    return Path(settings.MODEL_CACHE_DIR) / "base" / base.slug / _fingerprint(base.gguf_file) / "hf"


def base_model_weights(base: BaseModel, *, progress: Callable[[int, int], None] | None = None) -> Path:
    """The safetensors folder of `base`; the bundled GGUF is dequantized into the cache once."""
    if base.hf_path is not None:
        if not (base.hf_path / "config.json").is_file():
            raise BaseNotConvertible(f"The folder of {base.name} ({base.hf_path}) is gone or incomplete.")
        return base.hf_path
    target = base_model_weights_path(base)
    if target is None or base.gguf_file is None:
        raise BaseNotConvertible(
            f"{base.name} is a GGUF file without its original weights: it can answer from documents, "
            "but it cannot be converted or quantized again. Register its safetensors folder instead."
        )
    if not (target / "config.json").is_file():
        try:
            base_models.dequantize_gguf_to_hf(base.gguf_file, target, progress=progress)
        except FileExistsError:
            # It writes a temporary folder and renames it: a build racing this one got there first.
            if not (target / "config.json").is_file():
                raise
    return target


def base_model_f16(
    base: BaseModel, weights: Path, convert: Callable[[Path, Path], object]
) -> tuple[Path, bool]:
    """The F16 GGUF of an unchanged base, converted once into the cache by `convert(src, dst)`
    (which writes atomically); True when it was already there."""
    target = Path(settings.MODEL_CACHE_DIR) / "base" / base.slug / _fingerprint(weights) / "model-f16.gguf"
    if target.is_file():
        return target, True
    target.parent.mkdir(parents=True, exist_ok=True)
    convert(weights, target)
    return target, False


def _fingerprint(path: Path) -> str:
    """Names a cache entry after the files it came from (names, sizes, modification times), so
    a replaced model never reuses a stale conversion."""
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def base_model_remove(base: BaseModel) -> None:
    """Unregister; downloaded files in the cache go too, registered local files stay."""
    if base.kind == BaseModel.Kind.BUNDLED:
        raise ValidationError("The bundled model cannot be removed.")
    if base.builds.exists() or base.model_versions.exists():
        raise ValidationError(f"{base.name} has builds; it stays registered so they stay explained.")
    if base.kind == BaseModel.Kind.HUB and base.hf_path is not None:
        shutil.rmtree(base.hf_path.parent, ignore_errors=True)
    base.delete()
