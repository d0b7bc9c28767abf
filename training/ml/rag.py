"""Retrieval for the chat: chunk parsed documents, index them twice, search both and fuse.

Django-free on purpose (see `training/ml/__init__.py`): a build step feeds it parsed sections and a
folder, the chat opens that folder and asks questions. Two indexes, because they fail differently:
dense vectors (Chroma) find paraphrases, BM25 (bm25s) finds exact terms such as error codes and
command names that an embedding model smears away. Reciprocal rank fusion merges the two ranked
lists without having to calibrate cosine similarities against BM25 scores; it fuses each list's
top k only (`fusion_window` says why).

Nothing here downloads anything: embeddings are always passed to Chroma explicitly (it never
loads its default ONNX model), its telemetry is off, and the sentence-transformers model is read
from a local folder with the Hugging Face hub switched offline.

Heavy libraries (chromadb, bm25s, PyStemmer, sentence-transformers) are imported inside the
functions that need them, so that importing this module stays cheap for the web process.

On-disk layout written by `build_index` (format version 1):

    <index_dir>/chroma/         Chroma PersistentClient data, collection "chunks", cosine space
    <index_dir>/bm25/           bm25s index (its own save format)
    <index_dir>/chunks.jsonl    one Chunk per line, in BM25 document order
    <index_dir>/manifest.json   model, dimensions, counts, chunk config, format version
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import bm25s
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection

    from .embcache import EmbeddingCache

__all__ = [
    "DEFAULT_CHUNK_CONFIG",
    "FORMAT_VERSION",
    "Chunk",
    "ChunkConfig",
    "Embedder",
    "Hit",
    "HybridIndex",
    "IndexBuildStopped",
    "IndexStats",
    "SectionLike",
    "SentenceTransformerEmbedder",
    "build_index",
    "chunk_document",
    "fusion_window",
    "rrf",
]

FORMAT_VERSION = 1
COLLECTION = "chunks"
RRF_K = 60  # the constant from Cormack et al. (2009); it damps the weight of the very top ranks
MODES = ("hybrid", "dense", "lexical")
# Tokenisation is part of the index format: queries must be tokenised exactly like the corpus.
BM25_STOPWORDS = "en"
BM25_STEMMER = "english"
HEADING_SEPARATOR = " › "


# --------------------------------------------------------------------------------------------
# Chunking


class SectionLike(Protocol):
    """What `chunk_document` reads from a section; `projects.parsing.Section` fits."""

    heading: str | None
    level: int
    path: list[str]
    text: str
    page: int | None


@dataclass(frozen=True)
class ChunkConfig:
    """Sizes in characters.

    A chunk is never longer than `chunk_chars` (the tolerance is zero): the overlap counts towards
    the size, and a merged heading line counts towards the merged chunk.
    """

    chunk_chars: int = 1000  # target passage size
    # Repeated from the end of the previous chunk of the same section. 1000/200 are the seed
    # recipe's own sizes, so a comparison with it measures how we split, not how much.
    overlap_chars: int = 200
    min_chars: int = 200  # a shorter section is merged with the next one under the same parent heading

    def __post_init__(self) -> None:
        if self.chunk_chars < 1:
            raise ValueError("chunk_chars must be at least 1.")
        if not 0 <= self.overlap_chars < self.chunk_chars:
            raise ValueError("overlap_chars must be at least 0 and smaller than chunk_chars.")
        if self.min_chars < 0:
            raise ValueError("min_chars must be at least 0.")


DEFAULT_CHUNK_CONFIG = ChunkConfig()


@dataclass(frozen=True)
class Chunk:
    id: str  # f"{document_id}-{n}", n counting from 0 within the document
    document_id: int
    document_title: str
    heading_path: tuple[str, ...]  # e.g. ("Installation", "On Debian")
    page: int | None
    section_index: int  # the (first) source section, so the UI can link to #s-<index>
    text: str  # the passage, without its own heading path

    @property
    def location(self) -> str:
        """Where in its document the passage is, as people cite it: "Install › On Debian, page 3"."""
        parts = [" › ".join(self.heading_path)] if self.heading_path else []
        if self.page:
            parts.append(f"page {self.page}")
        return ", ".join(parts)

    def embedding_text(self) -> str:
        """What gets embedded and BM25-indexed: headings carry meaning the passage often lacks.

        The label is "title › heading path", except that the title is left out when the path
        already starts with it: parsers commonly take a document's title from its first heading
        (HTML <title> = <h1>, a Markdown "# Title", a PDF's first heading), and repeating it adds
        tokens to every chunk's embedding (compute, and room under the model's length limit)
        and doubles the title words' term frequency for BM25, with no information gained.
        """
        parts = [part for part in self.heading_path if part]
        if self.document_title and not (parts and _same_heading(parts[0], self.document_title)):
            parts.insert(0, self.document_title)
        label = HEADING_SEPARATOR.join(parts)
        return f"{label}\n\n{self.text}" if label else self.text


def _same_heading(a: str, b: str) -> bool:
    """Equal up to case and whitespace (a <title> and its <h1> often differ only there)."""
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


# Finer and finer places to cut a passage that is too long. Sentence ends may be followed by a
# closing quote or bracket, which stays with its sentence.
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)\]]))\s+")
_WHITESPACE = re.compile(r"\s+")
_PARAGRAPH, _SENTENCE, _WORD = 0, 1, 2  # levels of a piece of text
_FINER_SPLITS = {
    _PARAGRAPH: ((_SENTENCE_END, _SENTENCE), (_WHITESPACE, _WORD)),
    _SENTENCE: ((_WHITESPACE, _WORD),),
}


@dataclass(frozen=True)
class _Piece:
    text: str
    sep: str  # what joins it to the previous piece when both land in the same chunk
    level: int  # _PARAGRAPH, _SENTENCE or _WORD


@dataclass
class _Block:
    """One or more consecutive sections (merged when small) that are cut into chunks together."""

    section_index: int
    path: tuple[str, ...]
    page: int | None
    text: str


def chunk_document(
    document_id: int,
    title: str,
    sections: Sequence[SectionLike],
    config: ChunkConfig = DEFAULT_CHUNK_CONFIG,
) -> list[Chunk]:
    """Cut a document's sections into passages; deterministic, ids `f"{document_id}-{n}"`.

    Chunks never cross a page or heading boundary, except that a section shorter than
    `min_chars` absorbs the following ones on the same page under the same parent heading while
    the result stays within `chunk_chars`; each absorbed section's heading (relative to the first
    one's path) is kept as a line of the text, since the chunk's heading_path is the first one's.
    """
    chunks: list[Chunk] = []
    for block in _blocks(sections, config):
        for text in _pack(block.text, config):
            chunks.append(
                Chunk(
                    id=f"{document_id}-{len(chunks)}",
                    document_id=document_id,
                    document_title=title,
                    heading_path=block.path,
                    page=block.page,
                    section_index=block.section_index,
                    text=text,
                )
            )
    return chunks


def _blocks(sections: Sequence[SectionLike], config: ChunkConfig) -> list[_Block]:
    blocks: list[_Block] = []
    for index, section in enumerate(sections):
        text = (section.text or "").strip()
        if not text:
            continue
        path = tuple(section.path)
        last = blocks[-1] if blocks else None
        if last is not None and len(last.text) < config.min_chars and last.page == section.page:
            parent = last.path[:-1]
            merged = _merged_text(last, path, section.heading, text)
            if path[: len(parent)] == parent and len(merged) <= config.chunk_chars:
                last.text = merged
                continue
        blocks.append(_Block(section_index=index, path=path, page=section.page, text=text))
    return blocks


def _merged_text(block: _Block, path: tuple[str, ...], heading: str | None, text: str) -> str:
    common = 0
    while common < min(len(path), len(block.path)) and path[common] == block.path[common]:
        common += 1
    label = HEADING_SEPARATOR.join(path[common:]) or (heading or "").strip()
    return "\n\n".join(part for part in (block.text, label, text) if part)


def _pack(text: str, config: ChunkConfig) -> list[str]:
    """Greedily fill chunks with paragraphs, cutting a paragraph finer only where it must.

    A piece that does not fit ends the chunk if the chunk is at least half full; otherwise the
    piece is cut at sentence ends, then at whitespace, so chunks come out evenly sized. Only a
    single word longer than the whole chunk is cut mid-word.
    """
    limit = config.chunk_chars
    paragraphs = (p.strip() for p in _PARAGRAPH_BREAK.split(text))
    pending = deque(_Piece(p, "\n\n", _PARAGRAPH) for p in paragraphs if p)
    chunks: list[str] = []
    body = ""  # the chunk being filled, starting with the overlap
    fresh = False  # whether body holds anything beyond the overlap
    while pending:
        piece = pending[0]
        candidate = f"{body}{piece.sep}{piece.text}" if body else piece.text
        if len(candidate) <= limit:
            body, fresh = candidate, True
            pending.popleft()
            continue
        # Past half full, end the chunk rather than cut the piece; before, cut it to fill up.
        finer = None if fresh and len(body) >= limit // 2 else _split_finer(piece)
        if finer is not None:
            pending.popleft()
            pending.extendleft(reversed(finer))
        elif fresh:
            chunks.append(body)
            body, fresh = _overlap(body, config.overlap_chars), False
        elif body:
            body = ""  # only the overlap is there and it leaves no room for this word: drop it
        else:
            # A single word longer than a whole chunk (a URL, a hash, a base64 blob): cut it into
            # chunk-sized parts, each of which then fills a chunk of its own.
            pending.popleft()
            parts = (piece.text[i : i + limit] for i in range(0, len(piece.text), limit))
            pending.extendleft(reversed([_Piece(part, "", _WORD) for part in parts]))
    if fresh:
        chunks.append(body)
    return chunks


def _split_finer(piece: _Piece) -> list[_Piece] | None:
    for pattern, level in _FINER_SPLITS.get(piece.level, ()):
        parts = _split_keeping_separators(piece.text, pattern)
        if len(parts) > 1:
            return [_Piece(parts[0][1], piece.sep, level)] + [
                _Piece(part, "\n" if "\n" in sep else " ", level) for sep, part in parts[1:]
            ]
    return None


def _split_keeping_separators(text: str, pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    """(separator before, part) pairs, so a split passage can be joined back as it was."""
    parts: list[tuple[str, str]] = []
    start, sep = 0, ""
    for match in pattern.finditer(text):
        parts.append((sep, text[start : match.start()]))
        start, sep = match.end(), match.group()
    parts.append((sep, text[start:]))
    return [(sep, part) for sep, part in parts if part]


def _overlap(text: str, size: int) -> str:
    """At most `size` characters from the end of `text`, starting at a word boundary.

    Always a strict tail, so a chunk never repeats its predecessor whole; empty when the tail
    holds no word boundary (the end of a word cut mid-word).
    """
    start = max(1, len(text) - size)
    while start < len(text) and not (text[start - 1].isspace() and not text[start].isspace()):
        start += 1
    return text[start:]


# --------------------------------------------------------------------------------------------
# Embedding


class Embedder(Protocol):
    """What build_index and HybridIndex need from an embedding model.

    An embedder may also have `token_counts(texts) -> list[int]`, the number of tokens the model
    reads of each text; build_index then sorts its batches by that instead of by characters
    (see `_length_sorted_batches`). It is optional, so it is not part of the protocol.
    """

    name: str
    dimensions: int
    batch_size: int  # how many texts build_index embeds per call (and per progress report)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32, shape (len(texts), dimensions), L2-normalised rows."""
        ...


class SentenceTransformerEmbedder:
    """A local sentence-transformers model folder (e.g. the bundled all-MiniLM-L6-v2).

    `embed` may be called from several threads: the Hugging Face fast tokenizer is not safe to
    share between concurrent calls ("Already borrowed"), so calls are serialised.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        batch_size: int = 32,
        device: str = "cpu",
        name: str | None = None,
        precision: str = "auto",
    ) -> None:
        # Set before sentence-transformers (and so huggingface_hub) is imported: a model folder
        # must never turn into a download, whatever the folder holds.
        os.environ["HF_HUB_OFFLINE"] = "1"
        from sentence_transformers import SentenceTransformer

        model_dir = Path(model_dir)
        self._model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
        dimension_of = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension  # sentence-transformers < 6
        )
        self.dimensions: int = int(dimension_of())
        self.batch_size = batch_size
        # Models shipped inside a wheel sit in a folder called "model"; its package names it.
        self.name: str = name or (model_dir.parent.name if model_dir.name == "model" else model_dir.name)
        self._lock = threading.Lock()
        self.precision: str = resolve_precision(precision, device)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        with self._lock, self._compute():
            vectors = self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)

    def _compute(self) -> contextlib.AbstractContextManager[Any]:
        """bfloat16 autocast: matrix products in bf16 with fp32 accumulation, while layer norms,
        softmax and the mean pooling stay fp32 — so the vectors stay fp32 and within a cosine
        distance of about 3e-5 of full precision (measured on the Debian FAQ), at 2.5x the speed
        on CPUs that multiply bf16 in hardware. The weights themselves are left in fp32."""
        if self.precision != "bfloat16":
            return contextlib.nullcontext()
        import torch

        return torch.autocast(self._model.device.type, dtype=torch.bfloat16)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens the model reads of each text: special tokens included, cut at its length limit."""
        if not texts:
            return []
        limit = self._model.get_max_seq_length()
        with self._lock:  # the same tokenizer object that encode() uses
            ids = self._model.tokenizer(
                list(texts), truncation=limit is not None, max_length=limit, verbose=False
            )["input_ids"]
        return [len(row) for row in ids]


PRECISIONS = ("auto", "float32", "bfloat16")


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """The precision ("float32" or "bfloat16") that `precision` means; "auto" picks one.

    "auto" means bfloat16 only where it is fast: on a CPU, when it multiplies bf16 in hardware
    (AMX or AVX512-BF16). Elsewhere autocast emulates bf16 and is slower than fp32, so auto
    stays fp32; accelerators keep fp32 too (the embedding model is small; nothing to win).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}.")
    if precision != "auto":
        return precision
    if device != "cpu":
        return "float32"
    import torch

    cpu = torch.cpu
    # Private helpers (torch >= 2.3); a torch without them gets the safe answer.
    native = any(
        getattr(cpu, probe, lambda: False)()
        for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    )
    return "bfloat16" if native else "float32"


def _embed_checked(embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
    vectors = np.asarray(embedder.embed(texts), dtype=np.float32)
    if vectors.shape != (len(texts), embedder.dimensions):
        raise ValueError(
            f"Embedder {embedder.name!r} returned shape {vectors.shape}, "
            f"expected {(len(texts), embedder.dimensions)}."
        )
    return vectors


# --------------------------------------------------------------------------------------------
# Fusion


def rrf(rankings: Sequence[Sequence[str]], *, k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: score(id) = sum over lists of 1 / (k + rank), rank 1-based.

    Returns (id, score) best first; equal scores keep the order in which ids first appear
    (scanning the lists in order). An id repeated within one list counts at its best rank.
    """
    if k < 0:
        raise ValueError("k must be at least 0.")
    ranks: dict[str, list[int]] = {}
    for ranking in rankings:
        seen: set[str] = set()
        for rank, item in enumerate(ranking, start=1):
            if item not in seen:
                seen.add(item)
                ranks.setdefault(item, []).append(rank)
    # Summing in rank order makes equal rank multisets give bit-identical floats, so that ties
    # are real ties and fall back to first appearance (sorted() is stable).
    scores = {
        item: sum(1.0 / (k + rank) for rank in sorted(item_ranks)) for item, item_ranks in ranks.items()
    }
    return sorted(scores.items(), key=lambda pair: -pair[1])


def fusion_window(k: int, candidates: int | None = None) -> int:
    """How many of each list's top ids hybrid search fuses: `candidates`, by default k.

    Why the window defaults to k rather than to something deeper (this library used 20).
    RRF adds 1/(60 + rank) over the lists that hold a chunk. Cormack et al. (2009) chose the
    constant 60 for lists 1000 deep; over a list's top N the scores only run from 1/61 down to
    1/(60 + N), so for N <= 62 any chunk in both lists (>= 2/(60 + N)) outscores any chunk in
    one (<= 1/61): fusion is a vote count before it is a ranking. Over 20-deep lists a chunk
    that one retriever ranks first and the other does not rank at all lost to chunks that both
    rank, say, 15th: chunks that neither retriever would have returned in its own top k.
    Fusing each list's top k, the default of Elasticsearch 8.x's RRF (rank_window_size, formerly
    window_size, defaults to the request's size) and of Upstash's $rrf (window = LIMIT), makes
    "found by both" mean "both would return it". With two lists and k < 62 (2/(60 + k) > 1/61):

    * every chunk in both top-k lists is returned, first (there are at most k of them);
    * the remaining places go to the chunks in one top k only, in the order of their rank
      there, so the lists take turns, the dense one first at equal rank (rrf's first-appearance
      rule; hybrid asked for k = 1 hits returns the dense list's first hit unless the two
      lists' first hits are the same);
    * so a list's rank-1 chunk is always returned, except BM25's when the other k - 1 chunks of
      its top k are all in dense's top k as well and dense's first hit is not among them: an
      exact term (an error code) that only BM25 finds, at BM25 rank 1, stays in the top k.

    Ranks below k are not used even to break ties: the two lists differ in coverage (every
    chunk has a dense rank, only chunks sharing a query word have a BM25 one), so "the other
    list ranks it somewhere in its top 20" is far more often true of a BM25 hit than of a dense
    one, and such a tie-break would favour BM25 for that reason alone. The price of the window:
    two lists that agree just below k (both rank a chunk 6th for k = 5) no longer outvote a
    chunk that one list ranks in its top k. A larger `candidates` restores plain RRF over
    deeper lists.
    """
    return k if candidates is None else max(k, candidates)


# --------------------------------------------------------------------------------------------
# Building


class IndexBuildStopped(Exception):
    """should_stop() asked build_index to stop; nothing was left on disk."""


@dataclass(frozen=True)
class IndexStats:
    documents: int
    chunks: int
    dimensions: int
    embedding_model: str
    seconds: float
    # Chunks whose vectors came from the embedding cache, and chunks embedded by this build.
    reused: int = 0
    embedded: int = 0


def build_index(
    chunks: Sequence[Chunk],
    out_dir: Path,
    embedder: Embedder,
    *,
    config: ChunkConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    cache: EmbeddingCache | None = None,
    sources: dict[str, Any] | None = None,
) -> IndexStats:
    """Embed and index `chunks` into the new folder `out_dir`, all or nothing.

    With `cache` (an `embcache.EmbeddingCache` for this embedder), only chunks whose exact
    embedding text the cache lacks are embedded, and those vectors are added to it. `sources`
    (what the index was built from, e.g. the documents and their hashes) is kept as
    `sources.json` inside the index, written with the rest.

    Everything is written into a hidden sibling folder that is renamed to `out_dir` at the end,
    so a reader never sees half an index and a failed or stopped build leaves nothing behind.
    `config` is only recorded in the manifest. progress(done, total) follows each embedding
    batch; should_stop() is asked before each batch and raises IndexBuildStopped.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; an index folder is never overwritten.")
    ids = [chunk.id for chunk in chunks]
    if len(set(ids)) != len(ids):
        raise ValueError("Chunk ids must be unique.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would follow the rename and lock out a web process running as
    # another user; mkdir honours the umask.
    work = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.building"
    work.mkdir()
    try:
        _write_chunks(work / "chunks.jsonl", chunks)
        reused, embedded = _write_vectors(work / "chroma", chunks, embedder, progress, should_stop, cache)
        _write_bm25(work / "bm25", chunks)
        if sources is not None:
            (work / "sources.json").write_text(
                json.dumps(sources, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        stats = IndexStats(
            documents=len({chunk.document_id for chunk in chunks}),
            chunks=len(chunks),
            dimensions=embedder.dimensions,
            embedding_model=embedder.name,
            seconds=0.0,
            reused=reused,
            embedded=embedded,
        )
        _write_manifest(work / "manifest.json", stats, config, getattr(embedder, "precision", None))
        # Checked again because the build may have taken minutes; rename() would silently
        # replace an empty folder created meanwhile.
        if out_dir.exists():
            raise FileExistsError(f"{out_dir} appeared while the index was being built.")
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return replace(stats, seconds=time.monotonic() - started)


def _write_chunks(path: Path, chunks: Sequence[Chunk]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for chunk in chunks:
            f.write(json.dumps(asdict(chunk), ensure_ascii=False) + "\n")


def _read_chunks(path: Path) -> list[Chunk]:
    chunks: list[Chunk] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                chunks.append(Chunk(**{**record, "heading_path": tuple(record["heading_path"])}))
    return chunks


def _chroma_client(path: Path, *, read_only: bool) -> ClientAPI:
    import chromadb
    from chromadb.config import Settings

    # "validate" refuses to migrate a reader's database instead of rewriting it.
    settings = Settings(anonymized_telemetry=False, migrations="validate" if read_only else "apply")
    return chromadb.PersistentClient(path=str(path), settings=settings)


def _write_vectors(
    path: Path,
    chunks: Sequence[Chunk],
    embedder: Embedder,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
    cache: EmbeddingCache | None = None,
) -> tuple[int, int]:
    """Embed (or take from `cache`) and add every chunk; returns (reused, embedded) counts."""
    client = _chroma_client(path, read_only=False)
    try:
        collection = client.create_collection(
            COLLECTION,
            # sync_threshold=1 persists the HNSW files after every add. Left at its default, the
            # last vectors stay only in Chroma's log and every reader replays them into the HNSW
            # files when it opens the index, i.e. readers (several processes) would write.
            configuration={"hnsw": {"space": "cosine", "sync_threshold": 1}},
            embedding_function=None,
        )
        # Two sizes: `batch_size` texts per embed() call (the embedder's own batch size, which
        # progress and should_stop follow), and `window` chunks per Chroma add (the most Chroma
        # takes in one call). Within a window, texts are embedded longest first; see
        # _length_sorted_batches. Each window is then added in document order, in one call, so
        # the HNSW files are written once per window rather than once per batch.
        window = max(1, client.get_max_batch_size())
        batch_size = max(1, min(embedder.batch_size, window))
        total = len(chunks)
        done = reused = 0
        for window_start in range(0, total, window):
            part = chunks[window_start : window_start + window]
            texts = [chunk.embedding_text() for chunk in part]
            if cache is not None:
                vectors, missing = cache.lookup(texts)
            else:
                vectors, missing = (
                    np.empty((len(part), embedder.dimensions), dtype=np.float32),
                    list(range(len(part))),
                )
            reused += len(part) - len(missing)
            done += len(part) - len(missing)
            todo = [texts[i] for i in missing]
            for batch in _length_sorted_batches(todo, batch_size, _lengths(embedder, todo)):
                if should_stop is not None and should_stop():
                    raise IndexBuildStopped(f"Stopped after embedding {done} of {total} chunks.")
                vectors[[missing[i] for i in batch]] = _embed_checked(embedder, [todo[i] for i in batch])
                done += len(batch)
                if progress is not None:
                    progress(done, total)
            if cache is not None and missing:  # one shard per window: a later build reuses it
                cache.add(todo, vectors[missing])
            if progress is not None and not missing:
                progress(done, total)
            collection.add(
                ids=[chunk.id for chunk in part],
                embeddings=vectors,
                metadatas=[_chroma_metadata(chunk) for chunk in part],
            )
    finally:
        # A chromadb 1.x PersistentClient holds its SQLite and HNSW files open until closed;
        # the folder must be closed before it is renamed (and deleted, on a failed build).
        client.close()
    return reused, total - reused


def _lengths(embedder: Embedder, texts: Sequence[str]) -> list[int]:
    """Each text's cost to the model: its token count if the embedder can tell, else characters."""
    token_counts = getattr(embedder, "token_counts", None)
    if callable(token_counts):
        counts = [int(n) for n in token_counts(texts)]
        if len(counts) == len(texts):
            return counts
    return [len(text) for text in texts]


def _length_sorted_batches(
    texts: Sequence[str], batch_size: int, lengths: Sequence[int] | None = None
) -> list[list[int]]:
    """Positions of `texts` in batches of `batch_size`, longest first (by `lengths`, or characters).

    A transformer batch is padded to its longest member, so a batch of texts in document order
    (where a short heading-only chunk sits next to a full one) costs as much as a batch of full
    ones. Sorting by length puts similar lengths together, as sentence-transformers' encode()
    (and so LangChain's HuggingFaceEmbeddings.embed_documents) does inside one call; build_index
    calls embed() once per batch (for progress and stopping), so it sorts across batches itself.
    It sorts by token count where the embedder can count tokens: characters are a poor proxy
    when most passages are near the chunk size (their token counts then vary with the words,
    not the characters), and texts past the model's length limit all cost the limit.
    The vectors do not depend on the batch (padding is masked), up to float rounding; the
    caller puts them back at their positions. Ties keep document order, so batches are
    deterministic.
    """
    sizes = [len(text) for text in texts] if lengths is None else list(lengths)
    order = sorted(range(len(texts)), key=lambda i: -sizes[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _chroma_metadata(chunk: Chunk) -> dict[str, Any]:
    metadata: dict[str, Any] = {"document_id": chunk.document_id, "section_index": chunk.section_index}
    if chunk.page is not None:  # Chroma metadata values cannot be None
        metadata["page"] = chunk.page
    return metadata


def _bm25_tokenize(texts: list[str], stemmer: Any, *, for_corpus: bool) -> Any:
    import bm25s

    # For the corpus, allow_empty=False gives a text without any indexable word the token "";
    # bm25s cannot index a corpus whose vocabulary is empty.
    return bm25s.tokenize(
        texts,
        stopwords=BM25_STOPWORDS,
        stemmer=stemmer,
        return_ids=for_corpus,
        show_progress=False,
        allow_empty=not for_corpus,
    )


def _new_stemmer() -> Any:
    import Stemmer

    return Stemmer.Stemmer(BM25_STEMMER)


def _write_bm25(path: Path, chunks: Sequence[Chunk]) -> None:
    path.mkdir()
    if not chunks:
        return  # bm25s cannot index an empty corpus; an empty folder means "no documents"
    import bm25s

    tokens = _bm25_tokenize([chunk.embedding_text() for chunk in chunks], _new_stemmer(), for_corpus=True)
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    retriever.save(str(path), show_progress=False)


def _write_manifest(path: Path, stats: IndexStats, config: ChunkConfig | None, precision: str | None) -> None:
    manifest = {
        "format_version": FORMAT_VERSION,
        "embedding_model": stats.embedding_model,
        "embedding_precision": precision,  # informational: bf16 and fp32 vectors are interchangeable
        "dimensions": stats.dimensions,
        "documents": stats.documents,
        "chunks": stats.chunks,
        "chunk_config": asdict(config) if config is not None else None,
        "bm25": {"stopwords": BM25_STOPWORDS, "stemmer": BM25_STEMMER},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Searching


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float  # fused score for hybrid, cosine similarity for dense, BM25 score for lexical
    # 1-based ranks in the lists searched (for hybrid: each list's top `fusion_window`, so the
    # fused score is the rrf of exactly these ranks), None if the chunk is not in that list.
    dense_rank: int | None
    lexical_rank: int | None


class HybridIndex:
    """A built index opened for searching. Thread-safe; several processes may open one folder.

    It never adds or changes index content. (Chroma itself records a bookkeeping row in its
    SQLite file whenever a client starts; the vectors and HNSW files are left as they are.)
    """

    def __init__(
        self,
        manifest: dict[str, Any],
        chunks: list[Chunk],
        retriever: bm25s.BM25 | None,
        client: ClientAPI,
        collection: Collection,
        embedder: Embedder,
    ) -> None:
        self._manifest = manifest
        self._chunks = chunks
        self._by_id = {chunk.id: chunk for chunk in chunks}
        self._retriever = retriever
        self._stemmer = _new_stemmer()
        self._client = client
        self._collection = collection
        self._embedder = embedder
        # PyStemmer objects are not thread-safe, and Chroma's bindings are not documented as
        # such; searches are short, so one lock around both is simpler than reasoning per call.
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, index_dir: Path, embedder: Embedder) -> HybridIndex:
        index_dir = Path(index_dir)
        manifest = json.loads((index_dir / "manifest.json").read_text(encoding="utf-8"))
        _check_compatible(manifest, embedder)
        chunks = _read_chunks(index_dir / "chunks.jsonl")
        retriever = None
        if chunks:
            import bm25s

            # mmap: processes that open the same index share the pages instead of copying them.
            retriever = bm25s.BM25.load(str(index_dir / "bm25"), mmap=True, show_progress=False)
        if not (index_dir / "chroma" / "chroma.sqlite3").is_file():
            # Checked here because Chroma would create an empty database in a missing folder.
            raise FileNotFoundError(f"{index_dir} holds no Chroma database.")
        client = _chroma_client(index_dir / "chroma", read_only=True)
        try:
            collection = client.get_collection(COLLECTION, embedding_function=None)
        except BaseException:
            client.close()
            raise
        return cls(manifest, chunks, retriever, client, collection, embedder)

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest))  # a copy the caller may change

    def search(
        self, query: str, *, k: int = 5, mode: str = "hybrid", candidates: int | None = None
    ) -> list[Hit]:
        """The k best chunks for `query`, best first.

        hybrid fuses (rrf) the top `candidates` dense ids with the top `candidates` BM25 ids;
        `candidates` defaults to k and is never less than k (`fusion_window` says why). Only
        chunks sharing a (stemmed, non-stop) word with the query are BM25 candidates, so a query
        without any still gets its dense hits.
        """
        return self.search_many([query], k=k, mode=mode, candidates=candidates)[0]

    def search_many(
        self, queries: Sequence[str], *, k: int = 5, mode: str = "hybrid", candidates: int | None = None
    ) -> list[list[Hit]]:
        """`search` for each query, embedding all of them in one batch."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}.")
        if k < 1 or (candidates is not None and candidates < 1):
            raise ValueError("k and candidates must be at least 1.")
        if self._closed:
            raise RuntimeError("This index has been closed.")
        if not self._chunks:
            return [[] for _ in queries]
        pool = min(fusion_window(k, candidates) if mode == "hybrid" else k, len(self._chunks))
        no_list: list[list[tuple[str, float]]] = [[] for _ in queries]
        dense = self._dense(queries, pool) if mode != "lexical" else no_list
        lexical = [self._lexical(query, pool) for query in queries] if mode != "dense" else no_list
        return [self._hits(d, lex, mode, k) for d, lex in zip(dense, lexical, strict=True)]

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._client.close()

    def __enter__(self) -> HybridIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _dense(self, queries: Sequence[str], n: int) -> list[list[tuple[str, float]]]:
        if not queries:
            return []
        vectors = _embed_checked(self._embedder, list(queries))  # outside the lock: the slow part
        with self._lock:
            result = self._collection.query(query_embeddings=vectors, n_results=n, include=["distances"])
        distances = result["distances"] or []
        # Chroma's cosine distance is 1 - cosine similarity.
        return [
            [(item, 1.0 - float(d)) for item, d in zip(ids, dists, strict=True)]
            for ids, dists in zip(result["ids"], distances, strict=True)
        ]

    def _lexical(self, query: str, n: int) -> list[tuple[str, float]]:
        assert self._retriever is not None  # only called on a non-empty index
        with self._lock:
            tokens = _bm25_tokenize([query], self._stemmer, for_corpus=False)[0]
        known = [token for token in tokens if token in self._retriever.vocab_dict]
        if not known:
            return []
        scores = self._retriever.get_scores(known)
        # Only chunks that contain a query term; ties keep corpus order, so results are stable.
        matched = np.flatnonzero(scores > 0)
        best = matched[np.argsort(-scores[matched], kind="stable")][:n]
        return [(self._chunks[i].id, float(scores[i])) for i in best]

    def _hits(
        self, dense: list[tuple[str, float]], lexical: list[tuple[str, float]], mode: str, k: int
    ) -> list[Hit]:
        dense_rank = {item: rank for rank, (item, _) in enumerate(dense, start=1)}
        lexical_rank = {item: rank for rank, (item, _) in enumerate(lexical, start=1)}
        if mode == "dense":
            scored = dense
        elif mode == "lexical":
            scored = lexical
        else:
            scored = rrf([[item for item, _ in dense], [item for item, _ in lexical]])
        return [
            Hit(
                chunk=self._by_id[item],
                score=score,
                dense_rank=dense_rank.get(item),
                lexical_rank=lexical_rank.get(item),
            )
            for item, score in scored[:k]
        ]


def _check_compatible(manifest: dict[str, Any], embedder: Embedder) -> None:
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"Index format {manifest.get('format_version')!r} is not supported (expected {FORMAT_VERSION})."
        )
    # Vectors from another model share no space with the query's, even at equal dimensions.
    if (manifest["embedding_model"], manifest["dimensions"]) != (embedder.name, embedder.dimensions):
        raise ValueError(
            f"The index was built with {manifest['embedding_model']} ({manifest['dimensions']} dimensions), "
            f"not {embedder.name} ({embedder.dimensions} dimensions)."
        )
