"""Refresh after one changed document vs a full rebuild, on the PostgreSQL documentation.

    cd /work/main && .venv/bin/python bench/refresh.py [--limit N] [--out bench/results]

Corpus: the HTML pages of the PostgreSQL manual (Debian package `postgresql-doc-15`, under
/usr/share/doc/postgresql-doc-15/html; `apt-get install postgresql-doc-15`), parsed with
projects.parsing.parse_file, in file-name order; --limit takes the first N pages.

Both runs do what the build's rag step does after the documents have been read: chunk every
document (library defaults) and build the hybrid index (Chroma + BM25) with the bundled
all-MiniLM-L6-v2, in the same process:
  full     an empty embedding cache: every passage is embedded (what every build did before)
  refresh  one document changed (a paragraph appended to its first section), the cache warm from
           the full run: only the changed document's passages are embedded
The ratio is full seconds / refresh seconds. The embedding model is loaded (and warmed) before
either run is timed. Parsing is not timed: a build reads each document once at upload.

No Django settings are needed: training.ml and projects.parsing are Django-free.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HTML_DIR = Path("/usr/share/doc/postgresql-doc-15/html")
RESULTS_DIR = REPO_ROOT / "bench" / "results"
RESULT_NAME = "refresh"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=0, help="only the first N pages (0: all)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the .json and .txt results")
    args = parser.parse_args(argv)
    if not HTML_DIR.is_dir():
        print(f"{HTML_DIR} is missing. Install it with: apt-get install postgresql-doc-15", file=sys.stderr)
        return 2

    from projects.parsing import parse_file
    from training.ml import rag
    from training.ml.bundled import bundled_embedding_dir
    from training.ml.embcache import EmbeddingCache

    pages = sorted(HTML_DIR.glob("*.html"))
    if args.limit:
        pages = pages[: args.limit]
    started = time.monotonic()
    parsed = []
    for path in pages:
        try:
            doc = parse_file(path, path.name)
        except Exception as exc:  # noqa: BLE001 (a page we cannot read is left out and counted)
            print(f"skipped {path.name}: {exc}", file=sys.stderr)
            continue
        if doc.sections:
            parsed.append((path.name, doc))
    parse_seconds = time.monotonic() - started
    embedder = rag.SentenceTransformerEmbedder(bundled_embedding_dir().path, name="all-MiniLM-L6-v2")
    embedder.embed(["warm up"] * 8)

    def chunk_all(docs):  # type: ignore[no-untyped-def]
        out = []
        for i, (name, doc) in enumerate(docs):
            out += rag.chunk_document(i, doc.title or name, doc.sections)
        return out

    # The changed document: the one in the middle of the list, with a paragraph appended.
    changed_at = len(parsed) // 2
    name, doc = parsed[changed_at]
    first = doc.sections[0]
    edited = replace(first, text=first.text + "\n\nThis paragraph was added to test a refresh of the index.")
    changed_docs = list(parsed)
    changed_docs[changed_at] = (name, replace(doc, sections=[edited, *doc.sections[1:]]))

    work = Path(tempfile.mkdtemp(prefix="bench-refresh-"))
    try:
        cache_dir = work / "embeddings"
        t0 = time.monotonic()
        chunks = chunk_all(parsed)
        full = rag.build_index(chunks, work / "full", embedder, cache=EmbeddingCache(cache_dir, embedder))
        full_seconds = time.monotonic() - t0

        t0 = time.monotonic()
        refreshed_chunks = chunk_all(changed_docs)
        refresh = rag.build_index(
            refreshed_chunks, work / "refresh", embedder, cache=EmbeddingCache(cache_dir, embedder)
        )
        refresh_seconds = time.monotonic() - t0
        changed_chunks = sum(1 for c in refreshed_chunks if c.document_id == changed_at)
        cache_files = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratio = full_seconds / refresh_seconds
    result = {
        "benchmark": "refresh",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "corpus": {
            "source": str(HTML_DIR),
            "pages_available": len(sorted(HTML_DIR.glob("*.html"))),
            "pages_used": len(pages),
            "documents": len(parsed),
            "limit": args.limit or None,
            "parse_seconds": round(parse_seconds, 1),
        },
        "embedding_model": embedder.name,
        "precision": embedder.precision,
        "changed_document": name,
        "full": {
            "seconds": round(full_seconds, 2),
            "chunks": full.chunks,
            "embedded": full.embedded,
            "reused": full.reused,
        },
        "refresh": {
            "seconds": round(refresh_seconds, 2),
            "chunks": refresh.chunks,
            "embedded": refresh.embedded,
            "reused": refresh.reused,
            "changed_document_chunks": changed_chunks,
        },
        "speedup": round(ratio, 1),
        "cache_bytes": cache_files,
    }
    printed = [
        f"PostgreSQL 15 documentation: {len(parsed)} documents ({len(pages)} of {result['corpus']['pages_available']} pages), "
        f"{full.chunks} passages; {embedder.name} ({embedder.precision}), {os.cpu_count()} CPUs",
        f"full rebuild (cold cache): {full_seconds:.1f} s, {full.embedded} passages embedded",
        f"refresh after changing {name}: {refresh_seconds:.1f} s, {refresh.embedded} passages embedded "
        f"(the changed document has {changed_chunks}; the others are unchanged text), {refresh.reused} from the cache",
        f"refresh is {ratio:.1f}x faster than a full rebuild",
        f"cache on disk: {cache_files / 1e6:.1f} MB",
    ]
    print("\n".join(printed))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{RESULT_NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{RESULT_NAME}.txt").write_text("\n".join(printed) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
