"""training.ml.rag: chunking, fusion, building and searching the hybrid index.

Everything but `test_real_minilm_finds_a_paraphrase` runs on a tiny deterministic embedder
(hashed bag of words), so these tests need no model and no database. That embedder only matches
shared words, so paraphrases (dense retrieval proper) are tested with the real bundled MiniLM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from projects.parsing import Section
from training.ml.rag import (
    Chunk,
    ChunkConfig,
    Hit,
    HybridIndex,
    IndexBuildStopped,
    SentenceTransformerEmbedder,
    build_index,
    chunk_document,
    fusion_window,
    rrf,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


class HashingEmbedder:
    """Hashed bag of words in 64 dimensions: texts sharing words point the same way.

    Like a small embedding model, it is blind to numbers, so exact codes are left to BM25.
    """

    dimensions = 64

    def __init__(self, *, batch_size: int = 4, name: str = "hashing-64") -> None:
        self.batch_size = batch_size
        self.name = name
        self.calls: list[int] = []  # batch sizes, to check what gets batched
        self.batches: list[list[str]] = []  # the texts of each call, in the order given
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            self.calls.append(len(texts))
            self.batches.append(list(texts))
        vectors = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[^\W\d_]+", text.lower()):
                # blake2b, not hash(): stable across processes (PYTHONHASHSEED).
                bucket = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "big")
                vectors[row, bucket % self.dimensions] += 1.0
            if not vectors[row].any():
                vectors[row, 0] = 1.0  # cosine needs a non-zero vector
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def section(
    text: str, path: Sequence[str] = (), page: int | None = None, heading: str | None = ""
) -> Section:
    """A parsed section; the heading defaults to the last element of the path."""
    if heading == "":
        heading = path[-1] if path else None
    return Section(heading=heading, level=len(path), path=list(path), text=text, page=page)


def words_of(text: str) -> list[str]:
    return text.split()


def prose(n_words: int, *, seed: int = 0, sentence_every: int = 12) -> str:
    """Deterministic filler with sentence ends and no paragraph breaks."""
    rnd = random.Random(seed)
    vocabulary = ["server", "disk", "backup", "restore", "network", "packet", "cache", "token", "queue"]
    out = []
    for i in range(1, n_words + 1):
        word = rnd.choice(vocabulary) + str(i)  # numbered, so each word is findable once
        out.append(word + ("." if i % sentence_every == 0 else ""))
    return " ".join(out)


# ---------------------------------------------------------------------------------------------
# Chunking


def test_empty_and_whitespace_sections_are_skipped_and_indexes_kept() -> None:
    sections = [
        section("", ["Empty"]),
        section("  \n\n \t", ["Blank"]),
        section("Real text " * 30, ["Real"]),
    ]
    chunks = chunk_document(1, "Doc", sections)
    assert [(c.id, c.section_index, c.heading_path) for c in chunks] == [("1-0", 2, ("Real",))]
    assert chunk_document(1, "Doc", sections[:2]) == []
    assert chunk_document(1, "Doc", []) == []


def test_one_huge_paragraph_is_split_on_sentences_within_the_limit() -> None:
    config = ChunkConfig(chunk_chars=500, overlap_chars=80, min_chars=100)
    text = prose(600)
    chunks = chunk_document(1, "Doc", [section(text, ["Big"])], config)
    assert len(chunks) > 5
    assert all(0 < len(c.text) <= config.chunk_chars for c in chunks)
    # Each chunk ends at a sentence end except the last, since sentences are short.
    assert all(c.text.endswith(".") for c in chunks[:-1])
    _assert_contiguous_cover(text, chunks)


def test_a_paragraph_without_sentence_ends_is_split_between_words() -> None:
    config = ChunkConfig(chunk_chars=300, overlap_chars=50, min_chars=0)
    text = prose(400, sentence_every=10**6)
    chunks = chunk_document(1, "Doc", [section(text)], config)
    assert all(len(c.text) <= config.chunk_chars for c in chunks)
    _assert_contiguous_cover(text, chunks)


def _assert_contiguous_cover(text: str, chunks: Sequence[Chunk]) -> None:
    """Every chunk is a run of whole words of `text`, and together they cover it in order."""
    words = words_of(text)
    position = {word: i for i, word in enumerate(words)}  # prose() words are unique
    previous_end = 0
    for chunk in chunks:
        chunk_words = words_of(chunk.text)
        start = position[chunk_words[0]]
        assert words[start : start + len(chunk_words)] == chunk_words
        assert start <= previous_end  # no gap between consecutive chunks
        previous_end = start + len(chunk_words)
    assert previous_end == len(words)


def test_paragraph_breaks_are_preferred() -> None:
    paragraphs = [prose(34, seed=i, sentence_every=8) for i in range(6)]
    assert all(270 < len(p) < 300 for p in paragraphs)
    config = ChunkConfig(chunk_chars=1000, overlap_chars=150, min_chars=200)
    chunks = chunk_document(1, "Doc", [section("\n\n".join(paragraphs), ["P"])], config)
    assert chunks[0].text == "\n\n".join(paragraphs[:3])
    # Later chunks: an overlap, then whole paragraphs.
    for chunk in chunks[1:]:
        body = chunk.text.split("\n\n", 1)[1]
        assert all(p in paragraphs for p in body.split("\n\n"))


def test_a_word_longer_than_a_chunk_is_cut_and_nothing_else_is() -> None:
    config = ChunkConfig(chunk_chars=1000, overlap_chars=150, min_chars=0)
    blob = "x" * 2500
    chunks = chunk_document(1, "Doc", [section(f"before {blob} after")], config)
    assert [c.text for c in chunks] == ["before", "x" * 1000, "x" * 1000, "x" * 500 + " after"]


def test_page_boundaries_are_never_crossed() -> None:
    sections = [
        section("Start of the chapter on page one.", ["Chapter"], page=1),
        section("Its continuation on page two.", ["Chapter"], page=2, heading=None),
        section("A small sibling, still on page two.", ["Other"], page=2),
    ]
    chunks = chunk_document(1, "Doc", sections)
    assert [(c.page, c.section_index) for c in chunks] == [(1, 0), (2, 1)]
    assert chunks[1].text == "Its continuation on page two.\n\nOther\n\nA small sibling, still on page two."


def test_heading_paths_are_kept_and_embedded() -> None:
    long_text = prose(300)
    sections = [
        section("Install things " * 20, ["Installation"]),
        section(long_text, ["Installation", "On Debian"]),
    ]
    chunks = chunk_document(4, "Admin guide", sections)
    assert chunks[0].heading_path == ("Installation",)
    debian = [c for c in chunks if c.section_index == 1]
    assert len(debian) > 1 and all(c.heading_path == ("Installation", "On Debian") for c in debian)
    assert debian[0].embedding_text() == f"Admin guide › Installation › On Debian\n\n{debian[0].text}"
    assert "On Debian" not in debian[0].text  # the heading is not prepended to the passage
    untitled = Chunk("1-0", 1, "", (), None, 0, "body")
    assert untitled.embedding_text() == "body"


def test_the_title_is_not_repeated_when_the_heading_path_starts_with_it() -> None:
    # An HTML page whose <title> is also its <h1>: the label names it once.
    chunk = Chunk("1-0", 1, "Chapter 1. Overview", ("Chapter 1.  overview", "Goals"), None, 0, "body")
    assert chunk.embedding_text() == "Chapter 1.  overview › Goals\n\nbody"
    assert Chunk("1-0", 1, "Guide", ("Guide",), None, 0, "body").embedding_text() == "Guide\n\nbody"
    # A title that is only part of the first heading, or comes later in the path, is kept.
    for path in (("Guide to X",), ("Intro", "Guide")):
        chunk = Chunk("1-0", 1, "Guide", path, None, 0, "body")
        assert chunk.embedding_text() == " › ".join(("Guide", *path)) + "\n\nbody"
    assert Chunk("1-0", 1, "Guide", (), None, 0, "body").embedding_text() == "Guide\n\nbody"


def test_small_sections_merge_with_the_next_under_the_same_parent() -> None:
    config = ChunkConfig(chunk_chars=400, overlap_chars=50, min_chars=100)
    sections = [
        section("Short Debian note.", ["Install", "Debian"]),  # 0: small, merges with 1
        section("Short Fedora note.", ["Install", "Fedora"]),  # 1
        section("Usage starts here.", ["Usage"]),  # 2: small, but "Usage" is outside "Install"
        section("Details under usage.", ["Usage", "Basics", "Details"]),  # 3: under Usage's parent (root)
        section("y " * 180, ["Usage", "Big"]),  # 4: 359 chars, too big to merge into the 2+3 block
        section("Tiny.", ["Usage", "Tiny"]),  # 5: follows a section that is not small
    ]
    chunks = chunk_document(1, "Doc", sections, config)
    by_index = {c.section_index: c for c in chunks}
    assert sorted(by_index) == [0, 2, 4, 5]
    assert by_index[0].heading_path == ("Install", "Debian")
    assert by_index[0].text == "Short Debian note.\n\nFedora\n\nShort Fedora note."
    assert by_index[2].text == "Usage starts here.\n\nBasics › Details\n\nDetails under usage."
    assert by_index[5].text == "Tiny."


def test_merging_stops_at_chunk_chars_and_at_min_chars() -> None:
    config = ChunkConfig(chunk_chars=100, overlap_chars=10, min_chars=30)
    sections = [section("a" * 20, ["S", "1"]), section("b " * 45, ["S", "2"]), section("c", ["S", "3"])]
    chunks = chunk_document(1, "Doc", sections, config)
    # 0+1 would be 20 + 2 + 1 + 2 + 89 = 114 > 100; 1 is not small, so 2 stays alone too.
    assert [c.section_index for c in chunks] == [0, 1, 2]


def test_overlap_repeats_the_end_of_the_previous_chunk_from_a_word_boundary() -> None:
    config = ChunkConfig(chunk_chars=400, overlap_chars=100, min_chars=0)
    chunks = chunk_document(1, "Doc", [section(prose(500), ["S"])], config)
    assert len(chunks) > 3
    for previous, chunk in zip(chunks, chunks[1:], strict=False):
        tail = _longest_tail_prefix(previous.text, chunk.text)
        assert 0 < len(tail) <= config.overlap_chars
        start = len(previous.text) - len(tail)
        assert previous.text[start - 1] == " " and tail[0] != " "  # starts at a word boundary
        assert chunk.text[len(tail)] == " "  # and ends where the previous chunk ended


def _longest_tail_prefix(previous: str, text: str) -> str:
    """The longest end of `previous` that `text` starts with."""
    for start in range(len(previous)):
        if text.startswith(previous[start:]):
            return previous[start:]
    return ""


def test_overlap_is_not_repeated_across_sections() -> None:
    config = ChunkConfig(chunk_chars=300, overlap_chars=100, min_chars=0)
    chunks = chunk_document(1, "Doc", [section(prose(100, seed=1), ["A"]), section("Second.", ["B"])], config)
    assert chunks[-1].text == "Second."


def test_chunking_is_deterministic_and_ids_count_from_zero() -> None:
    sections = [section(prose(400, seed=s), ["S", str(s)], page=s) for s in range(3)]
    first = chunk_document(7, "Doc", sections)
    assert first == chunk_document(7, "Doc", sections)
    assert [c.id for c in first] == [f"7-{n}" for n in range(len(first))]


def test_chunks_never_exceed_chunk_chars_on_random_text() -> None:
    rnd = random.Random(42)
    pieces = ["word", "x" * 180, ".", "!", "\n", "\n\n", " ", "  ", "e.g.", "(see below.)", "é"]
    for _ in range(200):
        config = ChunkConfig(chunk_chars=rnd.randint(20, 200), overlap_chars=rnd.randint(0, 19), min_chars=30)
        text = "".join(rnd.choice(pieces) + rnd.choice(" \n") for _ in range(rnd.randint(0, 120)))
        chunks = chunk_document(1, "Doc", [section(text, ["S"]), section(text, ["T"])], config)
        assert all(0 < len(c.text) <= config.chunk_chars for c in chunks)
        assert all(c.text == c.text.strip() for c in chunks)
        # Whole source words (or the merged heading "T"), except pieces of words too long for a chunk.
        allowed = set(words_of(text)) | {"T"}
        long_words = [w for w in allowed if len(w) > config.chunk_chars]
        for word in (w for c in chunks for w in words_of(c.text)):
            assert word in allowed or any(word in long_word for long_word in long_words)


def test_chunk_config_is_validated() -> None:
    with pytest.raises(ValueError):
        ChunkConfig(chunk_chars=100, overlap_chars=100)
    with pytest.raises(ValueError):
        ChunkConfig(chunk_chars=0)
    with pytest.raises(ValueError):
        ChunkConfig(min_chars=-1)


# ---------------------------------------------------------------------------------------------
# Reciprocal rank fusion


def test_rrf_known_order_and_scores() -> None:
    fused = rrf([["a", "b", "c"], ["b", "c", "a"]], k=60)
    assert [item for item, _ in fused] == ["b", "a", "c"]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[2][1] == pytest.approx(1 / 62 + 1 / 63)


def test_rrf_ties_keep_first_appearance() -> None:
    assert [item for item, _ in rrf([["a", "b"], ["b", "a"]])] == ["a", "b"]
    assert [item for item, _ in rrf([["x"], ["y"]])] == ["x", "y"]
    assert [item for item, _ in rrf([[], ["q", "p"]])] == ["q", "p"]
    # Equal ranks in a different order across three lists are still an exact tie.
    assert [item for item, _ in rrf([["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"]])] == ["a", "b", "c"]


def test_rrf_with_an_id_in_one_list_only() -> None:
    fused = dict(rrf([["a", "b"], ["c", "a"]], k=60))
    assert list(fused) == ["a", "c", "b"]
    assert fused["b"] == pytest.approx(1 / 62)
    assert rrf([]) == []
    assert rrf([["a", "a"]]) == [("a", pytest.approx(1 / 61))]


# ---------------------------------------------------------------------------------------------
# Building


CORPUS = {
    "Troubleshooting": {
        ("Errors", "E-4021"): "The upload fails with code E-4021 when the archive is larger than the quota.",
        ("Errors", "Timeouts"): "Requests time out when the proxy drops idle connections after a minute.",
    },
    "Administration": {
        ("Backups",): "Nightly backups copy the database dump to the object store and keep thirty days.",
        ("Users", "Passwords"): "Administrators reset forgotten passwords from the users page.",
        ("Network",): "The firewall allows inbound traffic on port 443 only.",
    },
    "Getting started": {
        ("Install",): "Install the package with apt, then start the service with systemctl.",
        ("Configure",): "Edit the configuration file and set the data directory and the listen address.",
        ("Upgrade",): "Stop the service, install the new package and run the migrations before starting.",
        ("Monitoring",): "Metrics are exported for Prometheus; dashboards show queue length and latency.",
        ("Logs",): "Logs go to the journal; raise the level to debug when reporting a problem.",
    },
}


def corpus_chunks() -> list[Chunk]:
    chunks: list[Chunk] = []
    for document_id, (title, sections) in enumerate(CORPUS.items(), start=1):
        parsed = [section(text, path, page=1) for path, text in sections.items()]
        chunks += chunk_document(document_id, title, parsed, ChunkConfig(min_chars=0))
    return chunks


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    index_dir = tmp_path_factory.mktemp("built") / "index"
    build_index(corpus_chunks(), index_dir, HashingEmbedder(), config=ChunkConfig(min_chars=0))
    return index_dir


@pytest.fixture
def index(built: Path) -> Iterator[HybridIndex]:
    with HybridIndex.open(built, HashingEmbedder()) as opened:
        yield opened


@pytest.fixture
def builds(tmp_path: Path) -> Path:
    """An empty folder (tmp_path also holds the project's DATA_DIR)."""
    folder = tmp_path / "builds"
    folder.mkdir()
    return folder


def test_build_writes_the_layout_and_manifest(builds: Path) -> None:
    chunks = corpus_chunks()
    progress: list[tuple[int, int]] = []
    stats = build_index(
        chunks, builds / "index", HashingEmbedder(batch_size=4), progress=lambda d, t: progress.append((d, t))
    )
    assert (stats.documents, stats.chunks, stats.dimensions, stats.embedding_model) == (
        3,
        10,
        64,
        "hashing-64",
    )
    assert stats.seconds > 0
    assert progress == [(4, 10), (8, 10), (10, 10)]
    assert sorted(p.name for p in (builds / "index").iterdir()) == [
        "bm25",
        "chroma",
        "chunks.jsonl",
        "manifest.json",
    ]
    assert [p.name for p in builds.iterdir()] == ["index"]  # no temporary folder left
    manifest = json.loads((builds / "index" / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["embedding_model"] == "hashing-64" and manifest["dimensions"] == 64
    assert (manifest["documents"], manifest["chunks"]) == (3, 10)
    assert manifest["chunk_config"] is None
    lines = (builds / "index" / "chunks.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {
        "id": "1-0",
        "document_id": 1,
        "document_title": "Troubleshooting",
        "heading_path": ["Errors", "E-4021"],
        "page": 1,
        "section_index": 0,
        "text": CORPUS["Troubleshooting"][("Errors", "E-4021")],
    }


def test_build_embeds_longest_texts_first_and_stores_each_vector_under_its_chunk(builds: Path) -> None:
    chunks = corpus_chunks()
    lengths = [len(c.embedding_text()) for c in chunks]
    assert lengths != sorted(lengths, reverse=True)  # document order is not length order
    embedder = HashingEmbedder(batch_size=3)
    build_index(chunks, builds / "index", embedder)
    # Batches of 3 over the whole corpus sorted by length, longest first (padding is per batch).
    assert embedder.calls == [3, 3, 3, 1]
    embedded = [len(text) for batch in embedder.batches for text in batch]
    assert embedded == sorted(lengths, reverse=True)
    # The vectors went back to their chunks: each chunk's own text finds that chunk first.
    with HybridIndex.open(builds / "index", HashingEmbedder()) as opened:
        for chunk, hits in zip(
            chunks, opened.search_many([c.embedding_text() for c in chunks], k=1, mode="dense"), strict=True
        ):
            assert hits[0].chunk.id == chunk.id and hits[0].score == pytest.approx(1.0, abs=1e-5)
    # Chunks are still listed (and BM25-indexed) in document order.
    lines = (builds / "index" / "chunks.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [c.id for c in chunks]


class CountingEmbedder(HashingEmbedder):
    """Tells build_index each text's token count (here: its words), as the real embedder does."""

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        return [len(text.split()) for text in texts]


def test_build_sorts_by_token_count_when_the_embedder_counts_tokens(builds: Path) -> None:
    long_words = Chunk("1-0", 1, "", (), None, 0, "incomprehensibilities " * 5)  # 110 chars, 5 words
    short_words = Chunk("1-1", 1, "", (), None, 1, "a b c d e f g h i j k l m n o p q r s")  # 37, 19
    middle = Chunk("1-2", 1, "", (), None, 2, "one two three four five six seven")  # 33 chars, 7 words
    embedder = CountingEmbedder(batch_size=1)
    build_index([long_words, short_words, middle], builds / "index", embedder)
    assert [batch[0] for batch in embedder.batches] == [short_words.text, middle.text, long_words.text]
    with HybridIndex.open(builds / "index", HashingEmbedder()) as opened:
        assert opened.search(middle.text, k=1, mode="dense")[0].chunk.id == "1-2"


def test_build_refuses_an_existing_folder(builds: Path) -> None:
    (builds / "index").mkdir()
    with pytest.raises(FileExistsError):
        build_index(corpus_chunks(), builds / "index", HashingEmbedder())
    assert [p.name for p in builds.iterdir()] == ["index"]


def test_should_stop_leaves_nothing_behind(builds: Path) -> None:
    asked: list[bool] = []

    def should_stop() -> bool:
        asked.append(True)
        return len(asked) >= 2  # stop before the second batch

    with pytest.raises(IndexBuildStopped):
        build_index(corpus_chunks(), builds / "index", HashingEmbedder(batch_size=4), should_stop=should_stop)
    assert list(builds.iterdir()) == []


def test_build_rejects_duplicate_ids(builds: Path) -> None:
    chunk = corpus_chunks()[0]
    with pytest.raises(ValueError, match="unique"):
        build_index([chunk, chunk], builds / "index", HashingEmbedder())
    assert list(builds.iterdir()) == []


def test_an_empty_index_returns_no_hits(tmp_path: Path) -> None:
    stats = build_index([], tmp_path / "index", HashingEmbedder())
    assert stats.chunks == 0
    with HybridIndex.open(tmp_path / "index", HashingEmbedder()) as empty:
        for mode in ("hybrid", "dense", "lexical"):
            assert empty.search("anything", mode=mode) == []
        assert empty.search_many(["a", "b"]) == [[], []]


def test_a_corpus_of_stopwords_only_can_be_indexed(tmp_path: Path) -> None:
    chunks = [Chunk("1-0", 1, "", (), None, 0, "the of and"), Chunk("1-1", 1, "", (), None, 1, "a b c")]
    build_index(chunks, tmp_path / "index", HashingEmbedder())
    with HybridIndex.open(tmp_path / "index", HashingEmbedder()) as opened:
        assert opened.search("the", mode="lexical") == []
        assert len(opened.search("the", mode="hybrid")) == 2


# ---------------------------------------------------------------------------------------------
# Searching


def test_an_exact_error_code_is_found_by_bm25(index: HybridIndex) -> None:
    lexical = index.search("E-4021", mode="lexical")
    assert lexical[0].chunk.heading_path == ("Errors", "E-4021")
    assert lexical[0].lexical_rank == 1 and lexical[0].dense_rank is None and lexical[0].score > 0
    assert len(lexical) == 1  # only chunks that share a term are lexical hits
    # The embedder cannot see "4021": dense alone misses the chunk, hybrid keeps it in its top k.
    # Hybrid fuses each list's top k, so there the chunk has no dense rank at all...
    query = "what does error 4021 mean"
    assert "1-0" not in [h.chunk.id for h in index.search(query, k=3, mode="dense")]
    hybrid = {h.chunk.id: h for h in index.search(query, k=3)}
    assert "1-0" in hybrid and hybrid["1-0"].lexical_rank == 1 and hybrid["1-0"].dense_rank is None
    # ...and fusing deeper lists (the old default, 20) keeps it too, with its dense rank below k.
    deep = {h.chunk.id: h for h in index.search(query, k=3, candidates=20)}
    assert "1-0" in deep and deep["1-0"].lexical_rank == 1 and deep["1-0"].dense_rank > 3


def test_a_query_without_lexical_match_still_gets_dense_hits(index: HybridIndex) -> None:
    hits = index.search("zzyzx qwerty", k=3)
    assert len(hits) == 3
    assert all(h.lexical_rank is None and h.dense_rank is not None for h in hits)
    assert [h.dense_rank for h in hits] == [1, 2, 3]
    assert index.search("zzyzx qwerty", mode="lexical") == []


def test_dense_mode_scores_cosine_similarity(index: HybridIndex) -> None:
    text = CORPUS["Administration"][("Backups",)]
    hits = index.search(f"Administration › Backups\n\n{text}", mode="dense", k=2)
    assert hits[0].chunk.text == text
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)  # the chunk's own embedding text
    assert hits[0].score > hits[1].score
    assert hits[0].lexical_rank is None


def test_hybrid_ranks_come_from_both_lists(index: HybridIndex) -> None:
    hits = index.search("restart the service after an upgrade", k=10, candidates=10)
    assert len(hits) == 10
    assert all(isinstance(h, Hit) for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    expected = dict(rrf([_ranked(hits, "dense_rank"), _ranked(hits, "lexical_rank")]))
    assert all(h.score == pytest.approx(expected[h.chunk.id]) for h in hits)


def _fake_lists(
    index: HybridIndex, monkeypatch: pytest.MonkeyPatch, dense: list[str], lexical: list[str]
) -> None:
    """Make the index's dense and BM25 searches return these rankings (cut to what is asked)."""

    def fake_dense(queries: Sequence[str], n: int) -> list[list[tuple[str, float]]]:
        return [[(item, 1.0 - rank / 100) for rank, item in enumerate(dense[:n])] for _ in queries]

    def fake_lexical(query: str, n: int) -> list[tuple[str, float]]:
        return [(item, 10.0 - rank) for rank, item in enumerate(lexical[:n])]

    monkeypatch.setattr(index, "_dense", fake_dense)
    monkeypatch.setattr(index, "_lexical", fake_lexical)


def test_hybrid_fuses_each_lists_top_k_so_a_strong_single_list_hit_is_kept(
    index: HybridIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [c.id for c in corpus_chunks()]
    a, b, c, l1, l2, l3, s1, s2, s3 = ids[:9]
    # Dense ranks a first; BM25 never finds it. s1-s3 are mediocre in both lists (ranks 4-6).
    dense = [a, b, c, s1, s2, s3]
    lexical = [l1, l2, l3, s1, s2, s3]
    _fake_lists(index, monkeypatch, dense, lexical)
    hits = index.search("q", k=3)
    # Nothing is in both top 3s: the lists take turns, dense first at equal rank.
    assert [h.chunk.id for h in hits] == [a, l1, b]
    assert [(h.dense_rank, h.lexical_rank) for h in hits] == [(1, None), (None, 1), (2, None)]
    assert [h.score for h in hits] == [pytest.approx(1 / 61), pytest.approx(1 / 61), pytest.approx(1 / 62)]
    # Fusing the 6-deep lists (as the old default of 20 did) lets the chunks both lists rank
    # 4th-6th push out the dense list's first hit and the BM25 list's first hit alike.
    assert [h.chunk.id for h in index.search("q", k=3, candidates=6)] == [s1, s2, s3]
    # What both top ks hold comes first.
    _fake_lists(index, monkeypatch, [a, b, s1], [l1, s1, l2])
    assert [h.chunk.id for h in index.search("q", k=3)] == [s1, a, l1]
    assert fusion_window(3) == 3 and fusion_window(3, 6) == 6 and fusion_window(3, 1) == 3


def test_hybrid_top_k_keeps_what_both_lists_agree_on_and_each_lists_first_hit() -> None:
    """The guarantees `fusion_window` documents, on random rankings of the 10 test chunks."""
    rnd = random.Random(7)
    ids = [c.id for c in corpus_chunks()]
    checked = 0
    with _opened_fake_index() as index:
        for _ in range(300):
            k = rnd.randint(1, 6)
            dense = rnd.sample(ids, len(ids))
            lexical = rnd.sample(ids, rnd.randint(0, len(ids)))  # BM25 matches only some chunks
            with pytest.MonkeyPatch.context() as monkeypatch:
                _fake_lists(index, monkeypatch, dense, lexical)
                top = [h.chunk.id for h in index.search("q", k=k)]
            both = set(dense[:k]) & set(lexical[:k])
            assert set(top[: len(both)]) == both  # agreement first
            assert dense[0] in top
            if lexical and (not set(lexical[1:k]) <= set(dense[:k]) or dense[0] in lexical[:k]):
                assert lexical[0] in top
                checked += 1
    assert checked > 100


@contextlib.contextmanager
def _opened_fake_index() -> Iterator[HybridIndex]:
    with tempfile.TemporaryDirectory() as folder:
        build_index(corpus_chunks(), Path(folder) / "index", HashingEmbedder())
        with HybridIndex.open(Path(folder) / "index", HashingEmbedder()) as opened:
            yield opened


def _ranked(hits: Sequence[Hit], attribute: str) -> list[str]:
    ranked = sorted((getattr(h, attribute), h.chunk.id) for h in hits if getattr(h, attribute) is not None)
    return [chunk_id for _, chunk_id in ranked]


def test_k_larger_than_the_index_returns_every_chunk(index: HybridIndex) -> None:
    assert len(index.search("service", k=50)) == 10
    assert len(index.search("service", k=50, mode="dense")) == 10


def test_bad_arguments_are_refused(index: HybridIndex) -> None:
    with pytest.raises(ValueError):
        index.search("x", mode="semantic")
    with pytest.raises(ValueError):
        index.search("x", k=0)


def test_open_refuses_another_embedding_model(built: Path) -> None:
    with pytest.raises(ValueError, match="hashing-64"):
        HybridIndex.open(built, HashingEmbedder(name="other-model"))


def test_open_refuses_a_folder_without_an_index(built: Path, builds: Path) -> None:
    with pytest.raises(FileNotFoundError):
        HybridIndex.open(builds / "missing", HashingEmbedder())
    partial = builds / "partial"
    partial.mkdir()
    shutil.copy(built / "manifest.json", partial)
    shutil.copy(built / "chunks.jsonl", partial)
    shutil.copytree(built / "bm25", partial / "bm25")
    with pytest.raises(FileNotFoundError):
        HybridIndex.open(partial, HashingEmbedder())
    assert not (partial / "chroma").exists()  # opening never creates anything


def test_reopening_after_the_build_gives_the_same_results_and_changes_no_vectors(built: Path) -> None:
    queries = ["E-4021", "backup retention", "firewall port"]
    before = _fingerprint(built)
    with HybridIndex.open(built, HashingEmbedder()) as first:
        expected = [first.search(q) for q in queries]
        assert first.manifest["chunks"] == 10
    with HybridIndex.open(built, HashingEmbedder()) as second:
        assert [second.search(q) for q in queries] == expected
    assert _fingerprint(built) == before


def _fingerprint(index_dir: Path) -> dict[str, str]:
    """Hashes of every file but Chroma's SQLite database, which Chroma stamps on each start."""
    return {
        str(p.relative_to(index_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(index_dir.rglob("*"))
        if p.is_file() and not p.name.startswith("chroma.sqlite3")
    }


def test_search_many_equals_single_searches_and_embeds_once(built: Path) -> None:
    embedder = HashingEmbedder(batch_size=2)
    queries = ["E-4021", "password reset", "zzyzx", "install the package"]
    with HybridIndex.open(built, embedder) as opened:
        for mode in ("hybrid", "dense", "lexical"):
            embedder.calls.clear()
            many = opened.search_many(queries, k=4, mode=mode)
            assert embedder.calls == ([] if mode == "lexical" else [4])
            assert many == [opened.search(q, k=4, mode=mode) for q in queries]
        assert opened.search_many([]) == []


def test_concurrent_searches_match_sequential_ones(index: HybridIndex) -> None:
    queries = ["E-4021", "backups", "proxy timeout", "dashboards", "debug logs", "port 443"] * 4
    expected = [index.search(q, k=4) for q in queries]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda q: index.search(q, k=4), queries))
    assert results == expected


def test_two_processes_can_open_the_same_index(built: Path, index: HybridIndex) -> None:
    child = (
        "import json, sys\n"
        "from tests.training.test_rag import HashingEmbedder\n"
        "from training.ml.rag import HybridIndex\n"
        "with HybridIndex.open(sys.argv[1], HashingEmbedder()) as index:\n"
        "    print(json.dumps([h.chunk.id for h in index.search('E-4021 backups', k=5)]))\n"
    )
    # Two children at once, while this process holds the index open too.
    children = [
        subprocess.Popen(
            [sys.executable, "-c", child, str(built)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    expected = [h.chunk.id for h in index.search("E-4021 backups", k=5)]
    for process in children:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        assert json.loads(out) == expected


def test_closed_index_refuses_searches(built: Path) -> None:
    opened = HybridIndex.open(built, HashingEmbedder())
    opened.close()
    opened.close()  # idempotent
    with pytest.raises(RuntimeError):
        opened.search("x")


# ---------------------------------------------------------------------------------------------
# The real model


def test_real_minilm_finds_a_paraphrase(tmp_path: Path) -> None:
    from training.ml.bundled import BundledModelMissing, bundled_embedding_dir

    try:
        model_dir = bundled_embedding_dir().path
    except BundledModelMissing as exc:
        pytest.skip(str(exc))
    embedder = SentenceTransformerEmbedder(model_dir, batch_size=8)
    assert embedder.dimensions == 384
    # [CLS] one [SEP]; a long text costs the model's length limit, 256 tokens, and no more.
    assert embedder.token_counts(["one", "word " * 1000, ""]) == [3, 256, 2]
    vectors = embedder.embed(["one", "two"])
    assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    build_index(corpus_chunks(), tmp_path / "index", embedder)
    with HybridIndex.open(tmp_path / "index", embedder) as opened:
        # No content word in common with the chunk ("Administrators reset forgotten passwords").
        hits = opened.search("I can't remember my login secret", k=3, mode="dense")
        assert hits[0].chunk.heading_path == ("Users", "Passwords")
        hybrid = opened.search("how long are database copies kept", k=3)
        assert hybrid[0].chunk.heading_path == ("Backups",)


def test_precision_is_resolved_from_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from training.ml.rag import resolve_precision

    assert resolve_precision("float32") == "float32"
    assert resolve_precision("bfloat16") == "bfloat16"
    assert resolve_precision("auto", "cuda") == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8")
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert resolve_precision("auto") == "float32"  # emulated bf16 would be slower than fp32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert resolve_precision("auto") == "bfloat16"


def test_bfloat16_embeddings_match_float32() -> None:
    from training.ml.bundled import BundledModelMissing, bundled_embedding_dir

    try:
        model_dir = bundled_embedding_dir().path
    except BundledModelMissing as exc:
        pytest.skip(str(exc))
    texts = [chunk.embedding_text() for chunk in corpus_chunks()] + ["E-4021 on the backup server", "ü → ß"]
    full = SentenceTransformerEmbedder(model_dir, precision="float32")
    half = SentenceTransformerEmbedder(model_dir, precision="bfloat16")
    assert (full.precision, half.precision) == ("float32", "bfloat16")
    a, b = full.embed(texts), half.embed(texts)
    assert b.dtype == np.float32
    # Autocast keeps norms, softmax and pooling in fp32; the Debian FAQ measured <= 3e-5.
    # Without bf16 hardware autocast emulates it, with the same numerics.
    assert float((1.0 - (a * b).sum(axis=1)).max()) < 1e-3
    assert not np.array_equal(a, b)  # bf16 really was used
