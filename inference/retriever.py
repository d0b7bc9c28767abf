"""Each model version's index, opened read-only once per process and kept."""

from __future__ import annotations

import threading
from pathlib import Path

from training.embedding import shared_embedder
from training.ml.rag import HybridIndex
from training.models import ModelVersion

_lock = threading.Lock()
# Keyed by folder: a version's index never changes once built, and ids may be reused in tests.
_open: dict[str, HybridIndex] = {}


def index_for(version: ModelVersion) -> HybridIndex | None:
    """The version's hybrid index, or None for a model built without documents."""
    path = version.index_path
    return None if path is None else index_at(path)


def index_at(path: Path) -> HybridIndex:
    with _lock:
        index = _open.get(str(path))
        if index is None:
            index = _open[str(path)] = HybridIndex.open(path, shared_embedder())
        return index


def close_all() -> None:
    with _lock:
        for index in _open.values():
            index.close()
        _open.clear()
