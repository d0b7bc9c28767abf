"""The embedding cache (training.ml.embcache): hits, misses, identity, shards on a shared folder."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np

from tests.training.test_rag import HashingEmbedder, prose, section
from training.ml import rag
from training.ml.embcache import EmbeddingCache


def test_a_second_call_embeds_only_new_texts_and_returns_the_same_vectors(tmp_path: Path) -> None:
    embedder = HashingEmbedder()
    cache = EmbeddingCache(tmp_path, embedder)
    first = cache.embed(["pump reset", "vacation days"])
    assert embedder.batches == [["pump reset", "vacation days"]]
    again = EmbeddingCache(tmp_path, embedder)  # a new process: read from disk
    second = again.embed(["vacation days", "kitchen rules", "pump reset"])
    assert embedder.batches[-1] == ["kitchen rules"]
    assert (again.stats.hits, again.stats.misses) == (2, 1)
    np.testing.assert_array_equal(second[0], first[1])
    np.testing.assert_array_equal(second[2], first[0])
    np.testing.assert_allclose(second[1], embedder.embed(["kitchen rules"])[0])


def test_vectors_are_keyed_by_the_embedder_identity(tmp_path: Path) -> None:
    EmbeddingCache(tmp_path, HashingEmbedder(name="model-a")).embed(["same text"])
    other = HashingEmbedder(name="model-b")
    EmbeddingCache(tmp_path, other).embed(["same text"])
    assert other.batches == [["same text"]]  # another model: a miss
    bf16 = HashingEmbedder(name="model-a")
    bf16.precision = "bfloat16"  # type: ignore[attr-defined]
    EmbeddingCache(tmp_path, bf16).embed(["same text"])
    assert bf16.batches == [["same text"]]  # the same model at another precision: a miss too
    same = HashingEmbedder(name="model-a")
    EmbeddingCache(tmp_path, same).embed(["same text"])
    assert same.batches == []


def test_a_corrupt_or_foreign_shard_is_ignored(tmp_path: Path) -> None:
    embedder = HashingEmbedder()
    cache = EmbeddingCache(tmp_path, embedder)
    cache.embed(["one", "two"])
    (cache.folder / "broken.npz").write_bytes(b"PK\x03\x04 cut short")
    np.savez(
        cache.folder / "foreign.npz", keys=np.zeros((1, 32), np.uint8), vectors=np.zeros((1, 3), np.float32)
    )
    again = EmbeddingCache(tmp_path, embedder)
    again.embed(["one", "two", "three"])
    assert embedder.batches[-1] == ["three"]
    assert len(again) == 3


def _writer(folder: str, start: int) -> None:
    cache = EmbeddingCache(Path(folder), HashingEmbedder())
    for i in range(start, start + 20):
        cache.embed([f"text {i} alpha", f"text {i} beta"])


def test_concurrent_writers_leave_readable_shards_and_compaction_keeps_every_vector(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), n * 20)) for n in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    embedder = HashingEmbedder()
    cache = EmbeddingCache(tmp_path, embedder)
    assert not [p for p in cache.folder.iterdir() if p.name.endswith(".tmp")]
    assert len(cache) == 160  # 4 writers x 20 calls x 2 texts, all distinct
    cache.compact()
    assert len(list(cache.folder.glob("*.npz"))) == 1
    fresh = EmbeddingCache(tmp_path, embedder)
    fresh.embed([f"text {i} {w}" for i in range(80) for w in ("alpha", "beta")])
    assert embedder.batches == [] and fresh.stats.hits == 160


def test_build_index_embeds_only_what_the_cache_lacks(tmp_path: Path) -> None:
    embedder = HashingEmbedder(batch_size=4)
    cache = EmbeddingCache(tmp_path / "cache", embedder)
    docs = {n: [section(prose(300, seed=n), ["Doc"])] for n in range(3)}
    chunks = [c for n, sections in docs.items() for c in rag.chunk_document(n, f"Doc {n}", sections)]
    first = rag.build_index(chunks, tmp_path / "a", embedder, cache=cache, sources={"documents": [1, 2, 3]})
    assert (first.reused, first.embedded) == (0, len(chunks))
    assert (tmp_path / "a" / "sources.json").read_text().strip() == '{"documents": [1, 2, 3]}'
    embedder.batches.clear()
    changed = rag.chunk_document(1, "Doc 1", [section(prose(300, seed=99), ["Doc"])])
    second_chunks = [c for c in chunks if c.document_id != 1] + changed
    second = rag.build_index(
        second_chunks, tmp_path / "b", embedder, cache=EmbeddingCache(tmp_path / "cache", embedder)
    )
    assert (second.reused, second.embedded) == (len(second_chunks) - len(changed), len(changed))
    assert sorted(t for batch in embedder.batches for t in batch) == sorted(
        c.embedding_text() for c in changed
    )
    with rag.HybridIndex.open(tmp_path / "b", embedder) as index:  # cached vectors are searchable
        hit = index.search(changed[0].embedding_text(), k=1, mode="dense")[0]
        assert hit.chunk.id == changed[0].id
