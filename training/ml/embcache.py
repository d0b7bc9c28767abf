"""A cache of embedding vectors, keyed by the exact text embedded and by the embedding model.

Django-free on purpose (see `training/ml/__init__.py`). A RAG rebuild after a few documents
changed finds most passages' vectors here and embeds only the new text; the data report can
embed the same chunks through the same cache.

Storage is safe on a shared filesystem (DATA_DIR may be NFS) with several workers writing at
once, without locks: a cache is a folder of append-only *shard* files. A writer never changes a
file: it writes its new vectors to a temporary name in the same folder and renames it to a fresh
unique name (rename is atomic on POSIX filesystems and on NFS within one folder). A reader loads
every shard it finds; a shard that cannot be read (cut short, or from another format) is skipped
and its texts are simply embedded again. When there are many shards, `compact()` merges them into
one new shard and then deletes the ones it merged; a reader that lists the folder in between
sees a vector twice (same key, same value) or, if a shard vanishes while it reads, misses it
and embeds again: both are harmless.

Layout:

    <root>/<identity>/<shard>.npz     keys: "keys" (n x 32 bytes, sha256 of each text) and
                                      "vectors" (n x dimensions float32)
    <root>/<identity>/identity.json   the model identity in words, for people reading the folder

`<identity>` is a short hash of the embedder's name, precision and dimensions: vectors from
another model, or from the same model at another precision, are never mixed up.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = ["CacheStats", "EmbeddingCache", "identity_of", "text_key"]

SUFFIX = ".npz"
# Shards past which `embed` compacts the folder after writing its own.
COMPACT_AFTER = 32


class _Embedder(Protocol):
    name: str
    dimensions: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def identity_of(embedder: _Embedder) -> dict[str, object]:
    """What makes two embedders' vectors interchangeable: same model, precision and width."""
    return {
        "name": embedder.name,
        "precision": getattr(embedder, "precision", None),
        "dimensions": int(embedder.dimensions),
    }


def text_key(text: str) -> bytes:
    """The cache key of a text: sha256 of exactly the characters embedded (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


@dataclass
class CacheStats:
    """What the cache saved so far: texts found (`hits`) and texts embedded (`misses`)."""

    hits: int = 0
    misses: int = 0


class EmbeddingCache:
    """`EmbeddingCache(folder, embedder).embed(texts)` returns vectors like `embedder.embed`,
    embedding only the texts it has not seen with this embedder before.

    `embed_missing` lets a caller embed the misses itself (build_index batches them longest first
    and reports progress); `add` stores what it embedded. Not thread-safe: one per build or job.
    """

    def __init__(self, root: Path, embedder: _Embedder) -> None:
        self.embedder = embedder
        self.identity = identity_of(embedder)
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root) / digest
        self.dimensions = int(embedder.dimensions)
        self.stats = CacheStats()
        self._vectors: dict[bytes, np.ndarray] | None = None

    # --- reading -------------------------------------------------------------------------

    def _shards(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.suffix == SUFFIX and not p.name.startswith("."))

    def _load(self) -> dict[bytes, np.ndarray]:
        if self._vectors is None:
            vectors: dict[bytes, np.ndarray] = {}
            for shard in self._shards():
                for key, vector in _read_shard(shard, self.dimensions):
                    vectors[key] = vector
            self._vectors = vectors
        return self._vectors

    def __len__(self) -> int:
        return len(self._load())

    def lookup(self, texts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """Vectors for `texts` (rows of zeros where missing) and the positions that are missing."""
        known = self._load()
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        missing: list[int] = []
        for i, text in enumerate(texts):
            vector = known.get(text_key(text))
            if vector is None:
                missing.append(i)
            else:
                out[i] = vector
        self.stats.hits += len(texts) - len(missing)
        self.stats.misses += len(missing)
        return out, missing

    # --- writing -------------------------------------------------------------------------

    def add(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Store `vectors` (one row per text) as one new shard."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(texts), self.dimensions):
            raise ValueError(
                f"Expected vectors of shape {(len(texts), self.dimensions)}, got {vectors.shape}."
            )
        if not texts:
            return
        keys = [text_key(text) for text in texts]
        unique = dict(zip(keys, vectors, strict=True))  # a text repeated in one call is stored once
        self.folder.mkdir(parents=True, exist_ok=True)
        label = self.folder / "identity.json"
        if not label.exists():
            _write_atomic(label, lambda f: f.write(json.dumps(self.identity, indent=2).encode() + b"\n"))
        _write_shard(self.folder, list(unique), np.stack(list(unique.values())))
        self._load().update(unique)
        if len(self._shards()) > COMPACT_AFTER:
            self.compact()

    def embed_missing(self, texts: Sequence[str], compute: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """Vectors for all `texts`; `compute(missing_texts)` embeds those the cache lacks."""
        out, missing = self.lookup(texts)
        if missing:
            wanted = [texts[i] for i in missing]
            fresh = np.asarray(compute(wanted), dtype=np.float32)
            self.add(wanted, fresh)
            out[missing] = fresh
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (len(texts), dimensions): cached vectors, and the embedder's for the rest."""
        return self.embed_missing(texts, lambda wanted: self.embedder.embed(wanted))

    def compact(self) -> Path | None:
        """Merge every shard into one new shard, then delete the merged ones. Safe to run while
        others read or write: their new shards are not among those deleted."""
        shards = self._shards()
        if len(shards) < 2:
            return None
        merged: dict[bytes, np.ndarray] = {}
        for shard in shards:
            merged.update(_read_shard(shard, self.dimensions))
        if not merged:
            return None
        target = _write_shard(self.folder, list(merged), np.stack(list(merged.values())))
        for shard in shards:
            shard.unlink(missing_ok=True)  # another process may have compacted it first
        return target


def _read_shard(path: Path, dimensions: int) -> list[tuple[bytes, np.ndarray]]:
    """A shard's (key, vector) pairs; [] for one that cannot be read or does not fit."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, vectors = data["keys"], data["vectors"]
    except Exception:  # cut short, vanished, or not ours: its texts are embedded again
        return []
    if keys.ndim != 2 or keys.shape[1] != 32 or vectors.shape != (len(keys), dimensions):
        return []
    vectors = vectors.astype(np.float32, copy=False)
    return [(bytes(key), vectors[i]) for i, key in enumerate(keys)]


def _write_shard(folder: Path, keys: list[bytes], vectors: np.ndarray) -> Path:
    keys_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
    target = folder / f"{uuid.uuid4().hex}{SUFFIX}"

    def write(f) -> None:  # type: ignore[no-untyped-def]
        np.savez(f, keys=keys_array, vectors=np.asarray(vectors, dtype=np.float32))

    _write_atomic(target, write)
    return target


def _write_atomic(target: Path, write: Callable) -> None:  # type: ignore[type-arg]
    """Write through a hidden temporary file in the same folder, flushed, then renamed."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
