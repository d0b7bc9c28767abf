"""The numbers of the dataset quality report, as pure functions over strings and numbers.

No Django, no database: `training/reports.py` gathers a project's documents and pairs, computes
the retrieval scores (it needs the embedding model) and calls these. The thresholds are here,
with the reason for each; docs/decisions.md ("Dataset quality report") says the same in prose.
"""

from __future__ import annotations

import math
import re
import statistics
import threading
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# --- Thresholds ------------------------------------------------------------------------------

# A page (or, for files without pages, a section) with fewer visible characters than this holds
# no usable text: a scanned image without OCR, a cover, a blank page. 40 characters is less than
# one line of prose, and more than a page number with a running header.
NEAR_EMPTY_CHARS = 40
# A document is "mostly empty" when at least this share of its pages is near-empty: typically a
# scanned PDF whose text layer is missing. Below it, a few blank or figure pages are normal.
EMPTY_PAGES_SHARE = 0.3
# Share of characters that cannot be real text (replacement characters, control and private-use
# characters, "(cid:N)" glyph codes from PDFs with broken fonts, mojibake such as "Ã©").
# Clean text scores 0; one stray symbol in a page scores far under 1%. 2% means several broken
# characters in every line, which retrieval and training will learn as noise.
GARBLED_WARN = 0.02
# MinHash over 5-character shingles of the normalised text, 128 permutations (the estimate's
# standard error is about 0.04). Two texts sharing 80% of their shingles say the same thing with
# small edits (a changed date, a reworded sentence); distinct texts on one topic share far fewer.
NEAR_DUPLICATE_JACCARD = 0.8
MINHASH_PERMUTATIONS = 128
SHINGLE_CHARS = 5
# Cosine (all-MiniLM-L6-v2, normalised vectors) between an answer and its best document passage
# under which the answer is "not supported by any passage". Measured on the test corpus: answers
# taken from a passage score 0.57-0.91; answers on the same subject that no passage states (a pump
# warranty against a pump manual) 0.29-0.30; unrelated ones 0.07-0.25. 0.4 sits in the gap.
SUPPORT_THRESHOLD = 0.4
# Fewer training pairs than this and LoRA memorises them instead of learning (the wizard's
# training.ml.advisor.MIN_PAIRS_FOR_TRAINING; a test checks the two agree).
PAIRS_FOR_TRAINING = 50
# Advice thresholds on shares of pairs.
DUPLICATE_SHARE_WARN = 0.1  # 1 in 10 pairs repeating another over-weights those answers
UNSUPPORTED_SHARE_WARN = 0.3  # a third of answers without a source: RAG cannot back them up
TOPIC_DOMINANT_SHARE = 0.6  # one document behind most pairs: the model learns one topic
LANGUAGE_MINOR_SHARE = 0.1  # a second language in at least 10% of documents is worth saying

# --- Text measures ---------------------------------------------------------------------------

_CID = re.compile(r"\(cid:\d+\)")
# UTF-8 read as Latin-1/cp1252: "Ã©" for "é", "â€™" for "’", "Â " before punctuation.
_MOJIBAKE = re.compile(r"Ã[\u0080-\u00bf]|â€[\u0080-\u00bf\u2018-\u203a™œž]|Â[\u00a0-\u00bf]")


def visible_chars(text: str) -> int:
    return sum(1 for ch in text if not ch.isspace())


def garbled_chars(text: str) -> int:
    """How many characters of `text` cannot be part of real text."""
    bad = sum(len(m) for m in _CID.findall(text)) + sum(len(m) for m in _MOJIBAKE.findall(text))
    cleaned = _MOJIBAKE.sub("", _CID.sub("", text))
    for ch in cleaned:
        if ch == "\ufffd":
            bad += 1
        elif not ch.isspace():
            category = unicodedata.category(ch)
            if category in ("Cc", "Co", "Cn", "Cs"):
                bad += 1
    return bad


def garbled_ratio(text: str) -> float:
    """Share of the visible characters that are garbled (0 for empty text)."""
    visible = visible_chars(text)
    return min(1.0, garbled_chars(text) / visible) if visible else 0.0


def near_empty(texts: Sequence[str], min_chars: int = NEAR_EMPTY_CHARS) -> list[int]:
    """Indexes of the pages (or sections) with fewer than `min_chars` visible characters."""
    return [i for i, text in enumerate(texts) if visible_chars(text) < min_chars]


def normalise(text: str) -> str:
    """Lower case, letters and digits only, single spaces: what duplicates are compared on."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.findall(r"\w+", text))


_language_lock = threading.Lock()
_identifier: Any = None


def language(text: str) -> tuple[str | None, float]:
    """The language (ISO 639-1) of a text and the identifier's confidence, from its first
    5,000 characters; (None, 0.0) for text too short to tell (under 20 letters)."""
    global _identifier
    sample = text[:5000]
    if sum(ch.isalpha() for ch in sample) < 20:
        return None, 0.0
    with _language_lock:
        if _identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        lang, probability = _identifier.classify(sample)
    return str(lang), round(float(probability), 3)


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, min, median, 90th percentile, max and mean of some sizes."""
    if not values:
        return {"count": 0, "min": None, "median": None, "p90": None, "max": None, "mean": None}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return {
        "count": len(ordered),
        "min": ordered[0],
        "median": statistics.median(ordered),
        "p90": p90,
        "max": ordered[-1],
        "mean": round(statistics.fmean(ordered), 1),
    }


def words(text: str) -> int:
    return len(text.split())


# --- Duplicates --------------------------------------------------------------------------------


def duplicate_groups(texts: Sequence[str]) -> list[list[int]]:
    """Groups (two or more indexes) of texts equal once normalised; empty texts are left out."""
    by_text: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        key = normalise(text)
        if key:
            by_text.setdefault(key, []).append(i)
    return [group for group in by_text.values() if len(group) > 1]


def _shingles(text: str) -> set[bytes]:
    norm = normalise(text)
    if len(norm) <= SHINGLE_CHARS:
        return {norm.encode()} if norm else set()
    return {norm[i : i + SHINGLE_CHARS].encode() for i in range(len(norm) - SHINGLE_CHARS + 1)}


def _minhashes(texts: Sequence[str]) -> list[Any]:
    from datasketch import MinHash

    hashes = []
    for text in texts:
        m = MinHash(num_perm=MINHASH_PERMUTATIONS, seed=1)
        shingles = _shingles(text)
        if shingles:
            m.update_batch(list(shingles))
        hashes.append(m if shingles else None)
    return hashes


@dataclass(frozen=True)
class Match:
    a: int
    b: int
    similarity: float  # estimated Jaccard similarity of the shingle sets


def near_duplicate_matches(
    texts: Sequence[str], threshold: float = NEAR_DUPLICATE_JACCARD, against: Sequence[str] | None = None
) -> list[Match]:
    """Pairs of texts whose estimated similarity reaches `threshold` (MinHash LSH, so thousands of
    texts cost about as much as reading them). Within `texts` (a < b), or with `against`, each
    text of `texts` (a) against those of `against` (b)."""
    from datasketch import MinHashLSH

    hashes = _minhashes(texts)
    others = hashes if against is None else _minhashes(against)
    lsh = MinHashLSH(threshold=threshold, num_perm=MINHASH_PERMUTATIONS)
    for j, m in enumerate(others):
        if m is not None:
            lsh.insert(j, m)
    matches = []
    for i, m in enumerate(hashes):
        if m is None:
            continue
        for j in lsh.query(m):
            if against is None and j <= i:
                continue
            similarity = m.jaccard(others[j])
            if similarity >= threshold:
                matches.append(Match(i, j, round(float(similarity), 3)))
    return sorted(matches, key=lambda x: (x.a, x.b))


def near_duplicate_groups(texts: Sequence[str], threshold: float = NEAR_DUPLICATE_JACCARD) -> list[list[int]]:
    """Connected groups of near-duplicate texts (exact duplicates included), largest first."""
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # MinHash on one copy of each distinct text: boilerplate repeated on every PDF page would
    # otherwise make each query return every copy (quadratic in the copies). Exact copies join
    # their first one directly.
    exact = duplicate_groups(texts)
    copies = {other for g in exact for other in g[1:]}
    distinct = [i for i in range(len(texts)) if i not in copies]
    links = [
        (distinct[m.a], distinct[m.b])
        for m in near_duplicate_matches([texts[i] for i in distinct], threshold)
    ]
    links += [(g[0], other) for g in exact for other in g[1:]]
    for a, b in links:
        parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for i in range(len(texts)):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def redundant(groups: Sequence[Sequence[int]]) -> int:
    """How many texts repeat another: every member of a group but one."""
    return sum(len(g) - 1 for g in groups)


def leakage(
    train: Sequence[str], eval_: Sequence[str], threshold: float = NEAR_DUPLICATE_JACCARD
) -> list[Match]:
    """Evaluation questions the training pairs also hold, exactly or nearly: a = eval index,
    b = train index. One match per eval question (its most similar training question)."""
    exact: dict[str, int] = {}
    for j, text in enumerate(train):
        exact.setdefault(normalise(text), j)
    best: dict[int, Match] = {}
    for i, text in enumerate(eval_):
        j = exact.get(normalise(text))
        if j is not None and normalise(text):
            best[i] = Match(i, j, 1.0)
    for m in near_duplicate_matches(eval_, threshold, against=train):
        if m.a not in best or m.similarity > best[m.a].similarity:
            best[m.a] = m
    return [best[i] for i in sorted(best)]


# --- Topics ----------------------------------------------------------------------------------


def topic_balance(labels: Sequence[str | None]) -> dict[str, Any]:
    """How pairs spread over topics (None: no topic, e.g. an answer no passage supports).

    `balance` is the normalised entropy of the topic shares: 1 when every topic has as many
    pairs, near 0 when one topic holds nearly all; None with fewer than two topics.
    """
    counts = Counter(label for label in labels if label is not None)
    total = sum(counts.values())
    topics = [
        {"topic": topic, "pairs": n, "share": round(n / total, 3)}
        for topic, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    balance = None
    if len(counts) >= 2:
        entropy = -sum((n / total) * math.log(n / total) for n in counts.values())
        balance = round(entropy / math.log(len(counts)), 3)
    return {
        "topics": topics,
        "without_topic": sum(1 for label in labels if label is None),
        "largest_share": topics[0]["share"] if topics else None,
        "balance": balance,
    }


# --- Advice ----------------------------------------------------------------------------------


def _n(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def advice(report: dict[str, Any]) -> list[dict[str, str]]:
    """Plain-language advice from the report's numbers, warnings first. Each item:
    {"level": "warning"|"info", "code": a stable name the wizard reads, "text": what to do}."""
    docs = report.get("documents") or {}
    pairs = report.get("pairs") or {}
    privacy = report.get("privacy") or {}
    out: list[dict[str, str]] = []

    def add(level: str, code: str, text: str) -> None:
        out.append({"level": level, "code": code, "text": text})

    n_docs = docs.get("count", 0)
    train, eval_ = pairs.get("train", 0), pairs.get("eval", 0)
    n_pairs = train + eval_
    if not n_docs and not n_pairs:
        add("info", "no_data", "No documents or instruction pairs yet: add your documents first; "
            "the report fills in as you do.")  # fmt: skip
        return out
    if docs.get("failed"):
        add("warning", "failed_documents", f"{_n(docs['failed'], 'document')} could not be read: open the "
            "Documents tab for the reason, then fix and upload again.")  # fmt: skip
    empty = docs.get("mostly_empty") or []
    if empty:
        names = ", ".join(d["name"] for d in empty[:3]) + (" and others" if len(empty) > 3 else "")
        add("warning", "empty_pages", f"{_n(len(empty), 'document')} ({names}) {'is' if len(empty) == 1 else 'are'} "
            "mostly empty pages, usually a scan without a text layer: run OCR on "
            f"{'it' if len(empty) == 1 else 'them'} (or export a text PDF) and upload again.")  # fmt: skip
    garbled = (docs.get("garbled") or {}).get("documents") or []
    if garbled:
        add("warning", "garbled_text", f"The text of {_n(len(garbled), 'document')} is partly garbled "
            f"(e.g. {garbled[0]['name']}: {garbled[0]['ratio']:.0%} unreadable characters), often a PDF with "
            "broken fonts: export it again or upload another format.")  # fmt: skip
    if 0 < train < PAIRS_FOR_TRAINING:
        add("warning", "few_pairs", f"Only {_n(train, 'training pair')}: LoRA will overfit (about "
            f"{PAIRS_FOR_TRAINING} make a difference). Generate more from your documents, or use RAG alone.")  # fmt: skip
    if n_pairs and not eval_:
        add("warning", "no_eval_pairs", "No pair is held out for evaluation, so quality cannot be measured: "
            "add more pairs (about 1 in 10 is held out automatically).")  # fmt: skip
    leaked = (pairs.get("leakage") or {}).get("count", 0)
    if leaked:
        add("warning", "leakage", f"{_n(leaked, 'evaluation question')} also {'appears' if leaked == 1 else 'appear'} "
            "(nearly word for word) among the training pairs: the measured quality will look better than it is. "
            "Edit or delete one of each.")  # fmt: skip
    support = pairs.get("support") or {}
    unsupported, scored = support.get("unsupported", 0), support.get("scored", 0)
    if scored and unsupported / scored >= UNSUPPORTED_SHARE_WARN:
        add("warning", "unsupported_answers", f"{unsupported} of {scored} answers are not found in any "
            "document passage: add the documents they come from, or check those answers, or retrieval "
            "cannot back them up.")  # fmt: skip
    repeated = pairs.get("duplicates", 0) + pairs.get("near_duplicates", 0)
    if n_pairs and repeated / n_pairs >= DUPLICATE_SHARE_WARN:
        add("warning", "duplicate_pairs", f"{_n(repeated, 'pair')} repeat{'s' if repeated == 1 else ''} another "
            "(exactly or nearly): repeated answers weigh more in training. Delete the copies.")  # fmt: skip
    if privacy.get("unredacted"):
        add("warning", "unredacted_pii", f"{_n(privacy['unredacted'], 'finding')} of personal data "
            f"{'is' if privacy['unredacted'] == 1 else 'are'} kept as is: choose mask or pseudonym on the "
            "Privacy page if models must not learn them.")  # fmt: skip
    topics = pairs.get("topics") or {}
    if len(topics.get("topics") or []) >= 2 and (topics.get("largest_share") or 0) >= TOPIC_DOMINANT_SHARE:
        top = topics["topics"][0]
        add("info", "topic_imbalance", f"{top['share']:.0%} of your pairs are about “{top['topic']}”: the "
            "model will know that topic best. Add pairs about your other documents.")  # fmt: skip
    dup_passages = (docs.get("duplicates") or {}).get("redundant", 0)
    passages = docs.get("passages", 0)
    if passages and dup_passages / passages >= DUPLICATE_SHARE_WARN:
        add("info", "duplicate_passages", f"{dup_passages} of {passages} passages repeat another (the same text "
            "in several documents, or a boilerplate block): retrieval may show the same passage twice. "
            "Remove old copies of documents.")  # fmt: skip
    languages = docs.get("languages") or {}
    if len(languages) > 1 and n_docs:
        minor = [lang for lang, n in languages.items() if n / n_docs >= LANGUAGE_MINOR_SHARE]
        if len(minor) > 1:
            add("info", "languages", f"Your documents are in several languages ({', '.join(sorted(minor))}): the "
                "bundled embedding model understands English best.")  # fmt: skip
    if pairs.get("pending_review"):
        add("info", "pending_review", f"{_n(pairs['pending_review'], 'generated pair')} wait for review and are "
            "not used until accepted.")  # fmt: skip
    if not n_pairs and n_docs:
        add("info", "no_pairs", "No instruction pairs yet: answers will come from your documents (RAG). Generate "
            "pairs from your documents to measure quality and to fine-tune.")  # fmt: skip
    if not n_docs and n_pairs:
        add("info", "no_documents", "No documents yet: answers cannot cite sources, and whether answers are "
            "supported cannot be checked. Upload the documents your pairs come from.")  # fmt: skip
    order = {"warning": 0, "info": 1}
    return sorted(out, key=lambda item: order[item["level"]])


def advice_codes(report: dict[str, Any] | None) -> set[str]:
    return {item["code"] for item in (report or {}).get("advice") or []}
