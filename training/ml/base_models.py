"""Base models: look inside them, refuse unsafe ones, load them, and fetch them.

Django-free on purpose (see `training/ml/__init__.py`). A base model is either a Hugging Face
folder (config.json, safetensors weights, tokenizer files) or a single GGUF file such as the
bundled SmolLM2-135M-Instruct Q4_1.

Three rules hold throughout:

* Weights are never read to describe a model: parameters are counted from the safetensors JSON
  headers and the GGUF tensor table.
* Pickle checkpoints (.bin, .pt, ...) are refused, never opened: unpickling runs arbitrary code.
* Nothing is downloaded unless `download_hub_model` is called, and a download writes only
  safetensors, JSON, tokenizer, text and licence files.

`dequantize_gguf_to_hf` turns a Llama GGUF into an fp32 Hugging Face folder, so the training
recipes (which need torch weights) can start from the bundled model. It reads the GGUF with
gguf-py rather than through transformers' `from_pretrained(gguf_file=...)`: that path cannot
`save_pretrained` its model and spends tens of seconds converting the tokenizer, and its tokenizer
lacks SmolLM's digit splitting (harmless only because the vocabulary happens to hold no
multi-digit tokens). The tokenizer is rebuilt from the GGUF's tokens and merges and checked
against llama.cpp's own tokenization of a fixed text before anything is written.

Heavy libraries (gguf, llama_cpp, transformers, huggingface_hub) are imported inside the functions
that need them.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import shutil
import struct
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gguf import GGUFReader

__all__ = [
    "GgufHeader",
    "MalformedModelFile",
    "ModelInfo",
    "ModelUnavailable",
    "UnsafeModelFile",
    "dequantize_gguf_to_hf",
    "download_hub_model",
    "inspect_model",
    "load_causal_lm",
    "read_gguf_header",
    "refuse_pickles",
]

# Formats that torch.load unpickles. A folder may hold some (training_args.bin) next to
# safetensors weights: only the safetensors are ever loaded.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
LICENCE_NAMES = re.compile(r"^licen[cs]e", re.IGNORECASE)
# What a hub download may write; everything else (pickles, ONNX, GGUF copies) stays remote.
HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "tokenizer*",
    "*.txt",
    "*.md",
    "*.jinja",
    "LICENSE*",
    "LICENCE*",
    "license*",
    "licence*",
]
# Model files live at the top of a repo; sub-folders hold copies in other formats (onnx/, original/).
HUB_IGNORE_PATTERNS = ["*/*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_SHARD_BYTES = 2 * 1024**3  # fp32 shards written by dequantize_gguf_to_hf; bounds its memory use


class UnsafeModelFile(Exception):
    """The model's weights are pickles; they are refused without being opened."""


class ModelUnavailable(Exception):
    """The model cannot be reached or is incomplete: a hub id while offline, missing files."""


class MalformedModelFile(ModelUnavailable, ValueError):
    """The file's structure is broken or hostile, e.g. a GGUF header claiming more than the file
    holds. A ValueError too, like llama-cpp-python's own load failure, so callers catching that
    catch this."""


@dataclass(frozen=True)
class ModelInfo:
    kind: str  # "hf" (a folder) or "gguf" (a file)
    architecture: str  # e.g. "LlamaForCausalLM" for a folder, "llama" for a GGUF
    parameters: int  # tied weights counted once, like torch's sum of parameter sizes
    context_length: int | None
    hidden_size: int | None
    layers: int | None
    heads: int | None
    kv_heads: int | None
    vocab_size: int | None
    files: list[tuple[str, int]]  # (name relative to the folder, bytes), sorted by name
    size_bytes: int
    licence: str | None  # a LICENSE file's text, else GGUF general.license or the card's `license:`
    chat_template: bool
    weights_format: str  # "safetensors" or "gguf:<file type>", e.g. "gguf:Q4_1"


# --------------------------------------------------------------------------------------------
# Refusing pickles


def refuse_pickles(path: Path) -> None:
    """Raise UnsafeModelFile for a pickle file, or a folder whose only weights are pickles."""
    path = Path(path)
    advice = (
        "Loading a pickle can run arbitrary code, so it is refused. Convert the model to safetensors "
        "on a machine you trust (model.save_pretrained(folder, safe_serialization=True)) and use that."
    )
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeModelFile(f"{path.name} is a PyTorch pickle file. {advice}")
        return
    if not path.is_dir():
        return
    pickles = sorted(name for name, _ in _folder_files(path) if Path(name).suffix.lower() in PICKLE_SUFFIXES)
    if pickles and not _safetensors_files(path):
        shown = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
        raise UnsafeModelFile(f"{path.name} holds pickle weights ({shown}) and no safetensors. {advice}")


# --------------------------------------------------------------------------------------------
# Inspecting


def inspect_model(path: Path) -> ModelInfo:
    """Describe a model folder or GGUF file without loading its weights."""
    path = Path(path)
    if not path.exists():
        raise ModelUnavailable(f"{path} does not exist.")
    refuse_pickles(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _inspect_gguf(path)
    if path.is_dir():
        return _inspect_folder(path)
    raise ModelUnavailable(
        f"{path.name} is not a model: expected a folder with config.json and safetensors, or a .gguf file."
    )


def _folder_files(folder: Path) -> list[tuple[str, int]]:
    """Files under the folder, hidden ones (.cache/, .git/) left out."""
    files = []
    for item in folder.rglob("*"):
        relative = item.relative_to(folder)
        if item.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append((relative.as_posix(), item.stat().st_size))
    return sorted(files)


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors file's JSON header (8-byte length, then the JSON)."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(100 * 1024**2, path.stat().st_size - 8):
            raise MalformedModelFile(f"{path.name} is not a valid safetensors file (no header of that size).")
        header = _json_object(handle.read(length), path.name)
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise MalformedModelFile(
                f"{path.name} is not a valid safetensors file ({name!r} has no valid shape)."
            )
        shapes[name] = shape
    return shapes


def _json_object(raw: bytes | str, name: str) -> dict:
    """A JSON object from a model file; MalformedModelFile for anything else."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        value = None
    if not isinstance(value, dict):
        raise MalformedModelFile(f"{name} is not a valid JSON object, so the model cannot be described.")
    return value


def _first(config: dict, *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def _inspect_folder(folder: Path) -> ModelInfo:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelUnavailable(f"{folder.name} has no config.json: it is not a Hugging Face model folder.")
    weights = _safetensors_files(folder)
    if not weights:
        raise ModelUnavailable(f"{folder.name} has no .safetensors weights.")
    config = _json_object(config_path.read_bytes(), f"{folder.name}/config.json")
    text = config.get("text_config")  # multimodal configs nest the language model's
    text = text if isinstance(text, dict) and text else config

    shapes: dict[str, list[int]] = {}
    for weight_file in weights:
        shapes.update(_safetensors_shapes(weight_file))
    tied = bool(_first(text, "tie_word_embeddings") or config.get("tie_word_embeddings"))
    if tied and "lm_head.weight" in shapes and any(name.endswith("embed_tokens.weight") for name in shapes):
        del shapes["lm_head.weight"]  # one tensor in torch, saved twice by some exporters
    parameters = sum(math.prod(shape) for shape in shapes.values())

    heads = _first(text, "num_attention_heads", "n_head")
    files = _folder_files(folder)
    return ModelInfo(
        kind="hf",
        architecture=_architecture(config),
        parameters=parameters,
        context_length=_first(text, "max_position_embeddings", "n_positions", "max_sequence_length"),
        hidden_size=_first(text, "hidden_size", "n_embd", "d_model"),
        layers=_first(text, "num_hidden_layers", "n_layer"),
        heads=heads,
        kv_heads=_first(text, "num_key_value_heads") or heads,  # absent means one KV head per head
        vocab_size=_first(text, "vocab_size"),
        files=files,
        size_bytes=sum(size for _, size in files),
        licence=_folder_licence(folder),
        chat_template=_folder_has_chat_template(folder),
        weights_format="safetensors",
    )


def _architecture(config: dict) -> str:
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        return architectures[0]
    return str(config.get("model_type", "unknown"))


def _folder_licence(folder: Path) -> str | None:
    for item in sorted(folder.iterdir()):
        if item.is_file() and LICENCE_NAMES.match(item.name):
            text = item.read_text(errors="replace").strip()
            if text:
                return text
    card = folder / "README.md"
    if card.is_file():
        return _card_licence(card.read_text(errors="replace"))
    return None


def _card_licence(card: str) -> str | None:
    """The `license:` entry of a model card's YAML front matter (plus license_name/link if given)."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", card, re.DOTALL)
    if not match:
        return None
    values = {}
    for line in match.group(1).splitlines():
        entry = re.match(r"^(license|license_name|license_link):\s*(.+?)\s*$", line)
        if entry:
            values[entry.group(1)] = entry.group(2).strip("'\"")
    licence = values.get("license")
    if licence == "other" and values.get("license_name"):
        licence = values["license_name"]
    if licence and values.get("license_link"):
        licence = f"{licence} ({values['license_link']})"
    return licence


def _folder_has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        return bool(_json_object(tokenizer_config.read_bytes(), "tokenizer_config.json").get("chat_template"))
    return False


class _GgufMetadata:
    """Typed access to GGUF key/value metadata: values as Python objects, arrays as lists."""

    def __init__(self, values: Mapping[str, Any], array_lengths: Mapping[str, int] | None = None) -> None:
        self.values = values
        # read_gguf_header keeps only small arrays' values, so it passes every array's length.
        self.array_lengths = (
            array_lengths
            if array_lengths is not None
            else {key: len(value) for key, value in values.items() if isinstance(value, list)}
        )
        self.arch = str(self.get("general.architecture") or "unknown")

    @classmethod
    def from_reader(cls, reader: GGUFReader) -> _GgufMetadata:
        return cls({name: field.contents() for name, field in reader.fields.items()})

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def arch_int(self, suffix: str) -> int | None:
        value = self.get(f"{self.arch}.{suffix}")
        if isinstance(value, list):  # per-layer values in some architectures
            value = max(value) if value else None
        return int(value) if value is not None else None

    def arch_float(self, suffix: str) -> float | None:
        value = self.get(f"{self.arch}.{suffix}")
        # Stored as float32: the shortest decimal that reads back the same is what the author wrote.
        return float(str(np.float32(value))) if value is not None else None

    def array_length(self, key: str) -> int | None:
        return self.array_lengths.get(key)


def _gguf_licence(meta: _GgufMetadata) -> str | None:
    licence = meta.get("general.license") or meta.get("general.license.name")
    link = meta.get("general.license.link")
    if licence and link:
        return f"{licence} ({link})"
    return licence or link


def _gguf_weights_format(header: GgufHeader, meta: _GgufMetadata) -> str:
    import gguf

    file_type = meta.get("general.file_type")
    try:
        name = gguf.LlamaFileType(int(file_type)).name
        return "gguf:" + name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        # No (known) file type: name the type holding most of the matrix weights.
        totals: dict[str, int] = {}
        for tensor in header.tensors:
            if len(tensor.shape) > 1:
                kind = gguf.GGMLQuantizationType(tensor.type).name
                totals[kind] = totals.get(kind, 0) + tensor.n_elements
        return "gguf:" + (max(totals, key=totals.__getitem__) if totals else "unknown")


def _inspect_gguf(path: Path) -> ModelInfo:
    # Our own bounded reader rather than gguf's GGUFReader: that one loops over every array item
    # in Python (2M items: 33 s, 2 GB) and trusts the counts in the header (an array claiming 2**60
    # items never ends).
    header = read_gguf_header(path)
    meta = _GgufMetadata(header.values, header.array_lengths)
    size = path.stat().st_size
    return ModelInfo(
        kind="gguf",
        architecture=meta.arch,
        parameters=sum(tensor.n_elements for tensor in header.tensors),
        context_length=meta.arch_int("context_length"),
        hidden_size=meta.arch_int("embedding_length"),
        layers=meta.arch_int("block_count"),
        heads=meta.arch_int("attention.head_count"),
        kv_heads=meta.arch_int("attention.head_count_kv") or meta.arch_int("attention.head_count"),
        vocab_size=meta.arch_int("vocab_size") or meta.array_length("tokenizer.ggml.tokens"),
        files=[(path.name, size)],
        size_bytes=size,
        licence=_gguf_licence(meta),
        chat_template=bool(meta.get("tokenizer.chat_template")),
        weights_format=_gguf_weights_format(header, meta),
    )


# --------------------------------------------------------------------------------------------
# Reading GGUF headers
#
# Every count and length in a GGUF header is checked against what the file can hold before it is
# used, so a hostile header (2**60 entries, a 2**62-byte string, tensors past the end) is refused
# at once, in bounded time and memory, with a message that names the problem. Used to describe a
# model, and before llama.cpp or gguf's GGUFReader is given a file.

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what llama.cpp and gguf-py read; version 1 used 32-bit counts
GGUF_MAX_DIMS = 4  # GGML_MAX_DIMS
GGUF_MAX_NAME_BYTES = 65536  # keys and tensor names; real ones are under 100 bytes
# Array items in all (tokens, merges, scores...): the largest vocabularies (Gemma 3: 262k tokens,
# Llama 3: 128k tokens and 280k merges) need about a million; GGUFReader spends ~17 s per million.
GGUF_MAX_ARRAY_ITEMS = 4_000_000
GGUF_MAX_TENSORS = 1_000_000
_GGUF_SMALL_ARRAY = 4096  # arrays up to this long keep their values (per-layer settings)
# Value types: struct format of the scalar types; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


@dataclass(frozen=True)
class GgufTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: the fastest-moving dimension first
    type: int  # a GGMLQuantizationType value
    n_elements: int
    offset: int  # from the start of the tensor data


@dataclass(frozen=True)
class GgufHeader:
    version: int
    values: dict[str, Any]  # scalars, strings and arrays of up to _GGUF_SMALL_ARRAY items
    array_lengths: dict[str, int]  # every array, including the long ones left out of values
    tensors: list[GgufTensor]
    alignment: int
    data_offset: int


class _GgufCursor:
    """Reads little-endian values from a memory-mapped GGUF, refusing any read past its end."""

    def __init__(self, data: mmap.mmap | bytes, name: str) -> None:
        self.data, self.name, self.pos = data, name, 0

    def fail(self, problem: str) -> MalformedModelFile:
        return MalformedModelFile(
            f"{self.name} is not a valid GGUF file: {problem}. It may be damaged or malicious; "
            "it was not loaded."
        )

    def need(self, count: int, what: str) -> None:
        left = len(self.data) - self.pos
        if count > left:
            raise self.fail(f"{what} needs {count:,} bytes but only {left:,} are left in the file")

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return value

    def skip_string(self, what: str) -> int:
        length = self.scalar("Q", what)
        self.need(length, what)
        self.pos += length
        return length

    def string(self, what: str, *, limit: int | None = None) -> str:
        length = self.scalar("Q", what)
        if limit is not None and length > limit:
            raise self.fail(f"{what} is {length:,} bytes long; the limit is {limit:,}")
        self.need(length, what)
        raw = bytes(self.data[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", "replace")

    def name_string(self, what: str) -> str:
        length = self.scalar("Q", what)
        if length > GGUF_MAX_NAME_BYTES:
            raise self.fail(f"{what} is {length:,} bytes long; the limit is {GGUF_MAX_NAME_BYTES:,}")
        self.need(length, what)
        raw = bytes(self.data[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text") from None


def read_gguf_header(path: Path) -> GgufHeader:
    """Check a GGUF file's header against its size and return its metadata and tensor table.

    Raises MalformedModelFile naming the first problem; tensor data is never read.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 24:
                data: mmap.mmap | bytes = handle.read()
                return _read_gguf_header(_GgufCursor(data, path.name), size)
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _read_gguf_header(_GgufCursor(data, path.name), size)
    except OSError as exc:
        raise ModelUnavailable(f"{path.name} cannot be read: {exc.strerror or exc}") from exc


def _read_gguf_header(cursor: _GgufCursor, size: int) -> GgufHeader:
    import gguf

    if bytes(cursor.data[:4]) != GGUF_MAGIC:
        raise cursor.fail("it does not start with the GGUF signature")
    cursor.pos = 4
    version = cursor.scalar("I", "the version")
    if version not in GGUF_VERSIONS:
        if version and not version & 0xFFFF:
            raise cursor.fail("it is a big-endian GGUF, which llama.cpp cannot load on this machine")
        raise cursor.fail(
            f"version {version} is not supported (only {' and '.join(map(str, GGUF_VERSIONS))})"
        )
    tensor_count = cursor.scalar("Q", "the tensor count")
    kv_count = cursor.scalar("Q", "the metadata count")
    # The smallest entry is an empty key, a type and a one-byte value (13 bytes); the smallest
    # tensor entry an empty name, one dimension, a type and an offset (32 bytes).
    left = size - cursor.pos
    if kv_count * 13 > left:
        raise cursor.fail(f"it claims {kv_count:,} metadata entries, more than its {size:,} bytes can hold")
    if tensor_count > GGUF_MAX_TENSORS or tensor_count * 32 > left:
        raise cursor.fail(f"it claims {tensor_count:,} tensors, more than its {size:,} bytes can hold")

    values: dict[str, Any] = {}
    array_lengths: dict[str, int] = {}
    items = 0
    for index in range(kv_count):
        key = cursor.name_string(f"metadata key {index + 1}")
        if key in values or key in array_lengths:
            raise cursor.fail(f"the metadata key {key!r} appears twice")
        value_type = cursor.scalar("I", f"the type of {key!r}")
        if value_type == _GGUF_ARRAY:
            item_type = cursor.scalar("I", f"the item type of {key!r}")
            length = cursor.scalar("Q", f"the length of {key!r}")
            items += length
            if items > GGUF_MAX_ARRAY_ITEMS:
                raise cursor.fail(
                    f"its arrays hold more than {GGUF_MAX_ARRAY_ITEMS:,} items in all ({key!r} claims {length:,})"
                )
            array_lengths[key] = length
            value = _gguf_array(cursor, key, item_type, length)
            if value is not None:
                values[key] = value
        else:
            values[key] = _gguf_value(cursor, key, value_type)

    alignment = values.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or alignment <= 0
        or alignment & (alignment - 1)
    ):
        raise cursor.fail(f"its alignment {alignment!r} is not a power of two")

    raw_tensors = []
    names: set[str] = set()
    for index in range(tensor_count):
        name = cursor.name_string(f"the name of tensor {index + 1}")
        if name in names:
            raise cursor.fail(f"the tensor {name!r} appears twice")
        names.add(name)
        n_dims = cursor.scalar("I", f"the dimension count of {name!r}")
        if not 1 <= n_dims <= GGUF_MAX_DIMS:
            raise cursor.fail(f"the tensor {name!r} has {n_dims:,} dimensions (1 to {GGUF_MAX_DIMS} allowed)")
        shape = tuple(cursor.scalar("Q", f"the shape of {name!r}") for _ in range(n_dims))
        raw_tensors.append(
            (
                name,
                shape,
                cursor.scalar("I", f"the type of {name!r}"),
                cursor.scalar("Q", f"the offset of {name!r}"),
            )
        )
    data_offset = cursor.pos + (-cursor.pos % alignment)

    tensors = []
    for name, shape, type_id, offset in raw_tensors:
        try:
            block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
        except (ValueError, KeyError):
            raise cursor.fail(f"the tensor {name!r} has the unknown type {type_id}") from None
        n_elements = math.prod(shape)
        if n_elements >= 2**63:
            raise cursor.fail(f"the tensor {name!r} claims {n_elements:,} elements")
        if shape[0] % block:
            raise cursor.fail(f"the first dimension of {name!r} ({shape[0]:,}) is not a multiple of {block}")
        n_bytes = n_elements // block * block_bytes
        if offset % alignment:
            raise cursor.fail(f"the tensor {name!r} starts at {offset:,}, not a multiple of {alignment}")
        if data_offset + offset + n_bytes > size:
            raise cursor.fail(
                f"the tensor {name!r} ({n_bytes:,} bytes at {offset:,}) ends past the end of the file"
            )
        tensors.append(GgufTensor(name, shape, type_id, n_elements, offset))
    return GgufHeader(version, values, array_lengths, tensors, alignment, data_offset)


def _gguf_value(cursor: _GgufCursor, key: str, value_type: int) -> Any:
    if value_type == _GGUF_STRING:
        return cursor.string(f"the value of {key!r}")
    if value_type not in _GGUF_SCALARS:
        raise cursor.fail(f"{key!r} has the unknown value type {value_type}")
    return cursor.scalar(_GGUF_SCALARS[value_type], f"the value of {key!r}")


def _gguf_array(cursor: _GgufCursor, key: str, item_type: int, length: int) -> list[Any] | None:
    """The array's items if it is short, else None; the cursor ends past the array either way."""
    keep = length <= _GGUF_SMALL_ARRAY
    if item_type == _GGUF_STRING:
        if length * 8 > len(cursor.data) - cursor.pos:
            raise cursor.fail(f"{key!r} claims {length:,} strings, more than the rest of the file can hold")
        if keep:
            return [cursor.string(f"item {i + 1} of {key!r}") for i in range(length)]
        for i in range(length):
            cursor.skip_string(f"item {i + 1} of {key!r}")
        return None
    if item_type not in _GGUF_SCALARS:
        # Nested arrays are valid GGUF on paper, but llama.cpp refuses them and no model has any.
        raise cursor.fail(f"{key!r} is an array of the unsupported type {item_type}")
    fmt = _GGUF_SCALARS[item_type]
    cursor.need(length * struct.calcsize("<" + fmt), f"the items of {key!r}")
    if not keep:
        cursor.pos += length * struct.calcsize("<" + fmt)
        return None
    values = list(struct.unpack_from(f"<{length}{fmt}", cursor.data, cursor.pos))
    cursor.pos += length * struct.calcsize("<" + fmt)
    return values


# --------------------------------------------------------------------------------------------
# GGUF -> Hugging Face folder

# llama.cpp's Llama tensor names -> transformers' LlamaForCausalLM names.
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")

# How each `tokenizer.ggml.pre` value splits text before byte-level BPE (llama.cpp's
# llama-vocab.cpp regexes). Only these are supported; the llama.cpp check below catches mistakes.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SUPPORTED_PRE = ("smollm", "gpt-2", "llama-bpe", "llama3")

# Tokenized by both our tokenizer and llama.cpp before a conversion is written: letters and
# contractions, digit runs, unicode from several scripts, emoji, code, odd whitespace.
TOKENIZER_CHECK_TEXT = (
    "Hello world! I'm sure they'll say it's 3.14159, not 1,000,000 or $42.50 (abc123def).\n"
    "Grüße aus Köln — naïve café, 東京, Ελληνικά, русский, हिन्दी, 한국어 🙂 👨‍👩‍👧 🇩🇪\n"
    "def main():\n\treturn {'x': [1, 22, 333]}  # code\r\n\n\n   trailing   spaces  "
)


def _llama_config(meta: _GgufMetadata, *, tied: bool) -> Any:
    from transformers import LlamaConfig

    heads = meta.arch_int("attention.head_count")
    hidden = meta.arch_int("embedding_length")
    if heads is None or hidden is None:
        raise ValueError("The GGUF lacks llama.attention.head_count or llama.embedding_length.")
    head_dim = meta.arch_int("attention.key_length") or hidden // heads
    rope_dims = meta.arch_int("rope.dimension_count")
    if rope_dims not in (None, head_dim) or meta.get(f"{meta.arch}.rope.scaling.type") not in (None, "none"):
        raise ValueError("GGUFs with partial or scaled RoPE are not supported.")
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        dtype="float32",
        vocab_size=meta.arch_int("vocab_size") or meta.array_length("tokenizer.ggml.tokens"),
        hidden_size=hidden,
        intermediate_size=meta.arch_int("feed_forward_length"),
        num_hidden_layers=meta.arch_int("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=meta.arch_int("attention.head_count_kv") or heads,
        head_dim=head_dim,
        max_position_embeddings=meta.arch_int("context_length") or 2048,
        rms_norm_eps=meta.arch_float("attention.layer_norm_rms_epsilon") or 1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": meta.arch_float("rope.freq_base") or 10000.0},
        tie_word_embeddings=tied,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def _hf_tensor_name(name: str) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = _BLOCK_NAME.match(name)
    if match and match.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{match.group(1)}.{_BLOCK_TENSORS[match.group(2)]}"
    raise ValueError(f"The GGUF tensor {name} has no LlamaForCausalLM counterpart; not supported.")


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    HF rotates pairs (i, i + head_dim/2) of each head; llama.cpp rotates adjacent pairs (2i, 2i+1),
    so its converter interleaves the two halves of every head's rows. This puts them back.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # every digit on its own, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre == "gpt-2":
        return byte_level
    if pre in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ValueError(
        f"The GGUF's pre-tokenizer {pre!r} is not supported (supported: {', '.join(_SUPPORTED_PRE)})."
    )


def _tokenizer_from_gguf(meta: _GgufMetadata) -> Any:
    """A transformers fast tokenizer built from the GGUF's byte-level BPE vocabulary and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"Only byte-level BPE (gpt2) GGUF tokenizers are supported, not {kind!r}.")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges") or []]

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    pre = str(meta.get("tokenizer.ggml.pre") or "gpt-2")
    backend = Tokenizer(
        models.BPE(
            vocab={text: i for i, text in enumerate(tokens)},
            merges=merges,
            unk_token=token("unknown_token_id"),
            # Llama 3 takes a pre-token found whole in the vocabulary as it is (llama.cpp does too).
            ignore_merges=pre in ("llama-bpe", "llama3"),
        )
    )
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    # gguf token types: 3 CONTROL (special, e.g. <|im_end|>), 4 USER_DEFINED (added, not special).
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True) if k == 3]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types, strict=True) if k == 4]
    )

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token")) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token")) and eos is not None
    if add_bos or add_eos:

        def sequence(name: str, type_id: int) -> str:
            return " ".join(
                ([f"{bos}:{type_id}"] if add_bos else [])
                + [f"${name}:{type_id}"]
                + ([f"{eos}:{type_id}"] if add_eos else [])
            )

        backend.post_processor = processors.TemplateProcessing(
            single=sequence("A", 0),
            pair=f"{sequence('A', 0)} {sequence('B', 1)}",
            special_tokens=[
                (tokens[index], index)
                for index in {
                    meta.get("tokenizer.ggml.bos_token_id"),
                    meta.get("tokenizer.ggml.eos_token_id"),
                }
                if index is not None and 0 <= index < len(tokens)
            ],
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
    )
    template = meta.get("tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    return tokenizer


def _llama_cpp_token_ids(gguf_path: Path, text: str) -> list[int]:
    """llama.cpp's tokenization of text (with the BOS/EOS the model asks for), vocabulary only."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = LlamaModel(path_model=str(gguf_path), params=params, verbose=False)
    try:
        return list(model.tokenize(text.encode("utf-8"), add_bos=True, special=False))
    finally:
        model.close()


def _check_tokenizer(gguf_path: Path, tokenizer: Any) -> None:
    ours = tokenizer(TOKENIZER_CHECK_TEXT)["input_ids"]
    theirs = _llama_cpp_token_ids(gguf_path, TOKENIZER_CHECK_TEXT)
    if ours != theirs:
        at = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
            min(len(ours), len(theirs)),
        )
        raise ValueError(
            "The tokenizer rebuilt from the GGUF does not reproduce llama.cpp's tokenization "
            f"(first difference at token {at}); this pre-tokenizer is not supported."
        )


def _model_card(gguf_path: Path, meta: _GgufMetadata) -> str:
    licence = meta.get("general.license")
    front = f"---\nlicense: {licence}\n---\n\n" if licence else ""
    name = meta.get("general.name") or gguf_path.stem
    return (
        f"{front}# {name} (dequantized)\n\n"
        f"Float32 weights dequantized from `{gguf_path.name}` by SLM Studio. They equal the GGUF's "
        "quantized values exactly, not the original unquantized model's.\n"
    )


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename a finished temporary folder into place; FileExistsError if another writer won."""
    try:
        os.rename(tmp, out_dir)
    except OSError as exc:  # ENOTEMPTY or EEXIST when out_dir appeared meanwhile
        if out_dir.exists():
            raise FileExistsError(f"{out_dir} already exists.") from exc
        raise


def dequantize_gguf_to_hf(
    gguf_path: Path, out_dir: Path, *, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Write a Llama GGUF as a Hugging Face folder with fp32 safetensors; returns out_dir.

    The folder holds config.json, generation_config.json, model*.safetensors (LlamaForCausalLM
    names, q/k rows un-permuted), the tokenizer rebuilt from the GGUF (with its chat template) and a
    README.md whose front matter carries the GGUF's licence. It is written to a temporary sibling
    and renamed into place, so out_dir either is complete or does not exist; an existing out_dir
    raises FileExistsError. `progress(done, total)` is called after each tensor.
    """
    import gguf
    from safetensors.numpy import save_file
    from transformers import GenerationConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists.")
    read_gguf_header(gguf_path)  # refuses a hostile header before GGUFReader trusts its counts
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, OSError) as exc:
        raise ModelUnavailable(f"{gguf_path.name} is not a readable GGUF file: {exc}") from exc
    meta = _GgufMetadata.from_reader(reader)
    if meta.arch != "llama":
        raise ValueError(f"Only Llama-architecture GGUFs can be dequantized, not {meta.arch!r}.")
    names = {tensor.name: _hf_tensor_name(tensor.name) for tensor in reader.tensors}
    config = _llama_config(meta, tied="output.weight" not in names)
    tokenizer = _tokenizer_from_gguf(meta)
    _check_tokenizer(gguf_path, tokenizer)

    # Plan the shards up front so each file can be named "-0000i-of-0000n" when it is written.
    shards: list[list[Any]] = [[]]
    shard_bytes = 0
    for tensor in reader.tensors:
        size = int(tensor.n_elements) * 4
        if shards[-1] and shard_bytes + size > MAX_SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(tensor)
        shard_bytes += size
    shard_names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        done, total, weight_map, total_size = 0, len(reader.tensors), {}, 0
        for shard, shard_name in zip(shards, shard_names, strict=True):
            arrays: dict[str, np.ndarray] = {}
            for tensor in shard:
                shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists dimensions innermost first
                weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
                weight = np.ascontiguousarray(weight.reshape(shape), dtype=np.float32)
                if tensor.name.endswith("attn_q.weight"):
                    weight = _unpermute(weight, config.num_attention_heads)
                elif tensor.name.endswith("attn_k.weight"):
                    weight = _unpermute(weight, config.num_key_value_heads)
                arrays[names[tensor.name]] = np.ascontiguousarray(weight)
                weight_map[names[tensor.name]] = shard_name
                total_size += weight.nbytes
                done += 1
                if progress:
                    progress(done, total)
            save_file(arrays, str(tmp / shard_name), metadata={"format": "pt"})
            del arrays
        if len(shards) > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(str(tmp))
        GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        ).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(_model_card(gguf_path, meta))
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --------------------------------------------------------------------------------------------
# Loading and downloading


def load_causal_lm(model_dir: Path, *, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a local folder: safetensors only, never the network.

    dtype is a torch dtype; None means float32, which CPU training wants.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    refuse_pickles(model_dir)
    if not model_dir.is_dir() or not _safetensors_files(model_dir):
        raise ModelUnavailable(f"{model_dir} is not a folder with .safetensors weights.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            dtype=dtype if dtype is not None else torch.float32,
        )
    except OSError as exc:  # missing or unreadable files
        raise ModelUnavailable(f"Cannot load the model in {model_dir.name}: {exc}") from exc
    model.eval()
    return model, tokenizer


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; the environment may have changed since.
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return constants.HF_HUB_OFFLINE or flag in ("1", "true", "yes", "on")


def download_hub_model(repo_id: str, out_dir: Path) -> Path:
    """Download a Hugging Face Hub model's safetensors, config, tokenizer and licence files.

    Repos without safetensors weights are refused before anything is written. The files land in a
    temporary sibling that is renamed to out_dir once complete; an existing out_dir raises
    FileExistsError.
    """
    out_dir = Path(out_dir)
    if not _REPO_ID.fullmatch(repo_id):
        raise ModelUnavailable(
            f"{repo_id!r} is not a Hugging Face model id such as 'HuggingFaceTB/SmolLM2-135M'."
        )
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists.")
    if _hub_offline():
        raise ModelUnavailable(
            f"Cannot download {repo_id}: Hugging Face Hub access is switched off here (HF_HUB_OFFLINE)."
        )
    import httpx
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    failures = (OSError, HfHubHTTPError, HFValidationError, httpx.HTTPError)
    try:
        info = HfApi().model_info(repo_id)
    except failures as exc:
        raise ModelUnavailable(f"Cannot reach {repo_id} on the Hugging Face Hub: {exc}") from exc
    names = [sibling.rfilename for sibling in info.siblings or [] if "/" not in sibling.rfilename]
    if not any(name.endswith(".safetensors") for name in names):
        if any(Path(name).suffix.lower() in PICKLE_SUFFIXES for name in names):
            raise UnsafeModelFile(
                f"{repo_id} publishes only pickle weights (.bin/.pt); they are refused. "
                "Use a repository that has safetensors weights, or convert it to safetensors first."
            )
        raise ModelUnavailable(f"{repo_id} has no safetensors weights.")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.download-{uuid.uuid4().hex[:8]}"
    try:
        snapshot_download(
            repo_id,
            revision=info.sha,  # the commit whose file list was just checked
            local_dir=str(tmp),
            allow_patterns=HUB_ALLOW_PATTERNS,
            ignore_patterns=HUB_IGNORE_PATTERNS,
        )
    except failures as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelUnavailable(f"Downloading {repo_id} failed: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping
        refuse_pickles(tmp)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
