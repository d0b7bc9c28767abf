"""Retrieval-augmented fine-tuning (RAFT) examples from question–answer pairs, free of Django.

RAFT (Zhang et al. 2024; the recipe of `ShishirPatil/gorilla` raft/raft.py) trains a model on the
prompts it will be served with: the question preceded by retrieved passages, some of which help
(the "oracle") and some of which do not (the "distractors"). In a share of the examples the oracle
is left out, so the model also learns the domain itself instead of only copying from the context.

What differs from the original recipe, and why:

* Passages come from our own retrieval (`HybridIndex.search`), not from random chunks: the
  distractors are the passages the chat would really show next to the oracle (hard negatives).
* The prompt is `training.ml.prompt.build_messages`, the one the chat serves with, and the number of
  passages (`distractors + 1`) defaults to the chat's `top_k` (4): train as you serve.
* The answers are the user's own, not a teacher's chain of thought; when the oracle is in the
  prompt the answer cites it with the chat's citation format ("… [2].").

Which passage is the oracle (the support rule):

    words(t)      the Unicode word runs (\\w+) of t, case-folded
    lcs(a, p)     the length of the longest common subsequence of words(a) and words(p): the
                  number of the answer's words the passage repeats in the answer's order (ROUGE-L)
    support(p)    lcs(answer, p) / len(words(answer))   (ROUGE-L recall of the answer in p)
    supports(p)   lcs(answer, p) >= SUPPORT_THRESHOLD * min(len(words(answer)), len(words(p)))

The oracle is the candidate that `supports` the answer with the highest `support`, ties going to the
better retrieval rank. The minimum in `supports` lets a passage that holds only part of a long
answer (a long answer spread over several chunks) still count, as long as most of the passage is
that part of the answer. When no passage retrieved for the question supports the answer, the
search is repeated with question and answer together; if that finds none either, the example keeps
its pair but has no oracle (`RaftStats.oracle_not_found`), which is what RAFT's oracle-free share
trains anyway.

A distractor is any other candidate that neither supports the answer (it would be a second oracle,
and a left-out oracle would not really be left out) nor is a near-duplicate of the oracle
(`lcs(oracle, p) >= NEAR_DUPLICATE * min(len(words(oracle)), len(words(p)))`: neighbouring chunks
share an overlap, and a copy of the oracle is the oracle). The best-ranked such candidates are used.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from training.ml.lora import Example
from training.ml.prompt import CITATION, Passage, build_messages

if TYPE_CHECKING:
    from training.ml.rag import Hit, HybridIndex

SUPPORT_THRESHOLD = 0.5
NEAR_DUPLICATE = 0.6

_WORD = re.compile(r"\w+")
_MARKER = re.compile(r"\s*" + CITATION.pattern)
_PASSAGE_OPENING = re.compile(r'^<passage n="(\d+)"', re.MULTILINE)


class PassageLike(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def title(self) -> str: ...

    @property
    def location(self) -> str: ...

    @property
    def text(self) -> str: ...


@dataclass(frozen=True)
class RetrievedPassage:
    id: str
    title: str
    location: str  # as the chat shows it: "Heading › Subheading, page 3"; "" when none
    text: str


@dataclass(frozen=True)
class RaftSettings:
    distractors: int = 3  # passages besides the oracle; distractors + 1 should equal the chat's top_k
    oracle_fraction: float = 0.8  # the share of examples (with an oracle) that keep it in the prompt
    seed: int = 0
    candidates: int = 8  # passages retrieved per question to pick the oracle and distractors from

    def __post_init__(self) -> None:
        if self.distractors < 0:
            raise ValueError("distractors must be at least 0.")
        if not 0.0 <= self.oracle_fraction <= 1.0:
            raise ValueError("oracle_fraction must be between 0 and 1.")
        if self.candidates < self.distractors + 1:
            raise ValueError("candidates must be at least distractors + 1.")


@dataclass(frozen=True)
class RaftStats:
    examples: int
    with_oracle: int  # the oracle is in the prompt and the answer cites it
    without_oracle: int  # an oracle was found and deliberately left out
    oracle_not_found: int  # no passage supports the answer, even searching with the answer
    oracle_from_answer_search: int  # found only by the second search (question + answer)
    short_of_distractors: int  # fewer than `distractors + 1` passages were usable
    passages_dropped: int  # distractors removed so that the prompt fits n_ctx


def passage_from_hit(hit: Hit) -> RetrievedPassage:
    """A search hit as the chat shows it (inference.services.sources_from_hits)."""
    chunk = hit.chunk
    return RetrievedPassage(chunk.id, chunk.document_title, chunk.location, chunk.text)


def index_search(index: HybridIndex, *, mode: str = "hybrid") -> Callable[[str, int], list[RetrievedPassage]]:
    """The `search` argument of `raft_examples` for a built index."""

    def search(query: str, k: int) -> list[RetrievedPassage]:
        return [passage_from_hit(hit) for hit in index.search(query, k=k, mode=mode)]

    return search


def raft_examples(
    pairs: Sequence[tuple[str, str]],
    search: Callable[[str, int], Sequence[PassageLike]],
    *,
    count_tokens: Callable[[list[dict]], int],
    n_ctx: int,
    max_new_tokens: int,
    settings: RaftSettings = RaftSettings(),  # noqa: B008 (frozen, so a shared default is safe)
) -> tuple[list[Example], RaftStats]:
    """One training example per (question, answer) pair, in the order of `pairs`.

    The same pairs, search results and settings always give the same examples. Pass the training
    sequence length as `n_ctx` (and the answers' room as `max_new_tokens`) so that no example is cut
    by the trainer: when the passages do not fit, distractors are dropped (never the oracle).
    """
    plans = [_plan(question, answer, search, settings) for question, answer in pairs]
    found = [i for i, plan in enumerate(plans) if plan.oracle is not None]
    leave_out_count = math.floor(len(found) * (1.0 - settings.oracle_fraction) + 0.5)
    left_out = set(random.Random(f"raft-leave-out:{settings.seed}").sample(found, leave_out_count))

    examples: list[Example] = []
    dropped = short = 0
    for i, ((question, answer), plan) in enumerate(zip(pairs, plans, strict=True)):
        keep_oracle = plan.oracle is not None and i not in left_out
        wanted = settings.distractors + (0 if keep_oracle else 1)
        chosen = list(plan.distractors[:wanted])
        short += len(chosen) < wanted
        if keep_oracle:
            chosen.append(plan.oracle)
        random.Random(f"raft-order:{settings.seed}:{i}").shuffle(chosen)
        while True:
            passages = [Passage(n, p.title, p.location, p.text) for n, p in enumerate(chosen, start=1)]
            messages = build_messages(
                question, passages, [], count_tokens=count_tokens, n_ctx=n_ctx, max_new_tokens=max_new_tokens
            )
            if _passages_shown(messages) >= len(passages) or len(chosen) <= 1:
                break
            # build_messages dropped the last passages, which may include the oracle: drop the
            # last distractor instead and number the rest again.
            distractor_at = [j for j, p in enumerate(chosen) if not (keep_oracle and p is plan.oracle)]
            del chosen[distractor_at[-1]]
            dropped += 1
        reply = _without_markers(answer)
        if keep_oracle:
            reply = cite(reply, next(n for n, p in enumerate(chosen, start=1) if p is plan.oracle))
        examples.append(Example(messages=[*messages, {"role": "assistant", "content": reply}]))

    stats = RaftStats(
        examples=len(examples),
        with_oracle=len(found) - len(left_out),
        without_oracle=len(left_out),
        oracle_not_found=len(pairs) - len(found),
        oracle_from_answer_search=sum(plan.from_answer_search for plan in plans),
        short_of_distractors=short,
        passages_dropped=dropped,
    )
    return examples, stats


def cite(answer: str, number: int) -> str:
    """The answer with a citation of passage `number` at its end, before a closing full stop."""
    answer = answer.rstrip()
    if answer and answer[-1] in ".!?" and not answer.endswith("..."):
        return f"{answer[:-1]} [{number}]{answer[-1]}"
    return f"{answer} [{number}]"


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two word lists.

    Bit-parallel (Allison and Dix 1986; Hyyrö 2004): one big-integer step per word of `b`, so a
    2,000-word answer against a 200-word passage costs 200 steps, not 400,000.
    """
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, word in enumerate(a):
        masks[word] = masks.get(word, 0) | (1 << i)
    full = (1 << len(a)) - 1
    row = full
    for word in b:
        matches = row & masks.get(word, 0)
        row = ((row + matches) | (row - matches)) & full
    return len(a) - row.bit_count()


# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    oracle: PassageLike | None
    distractors: list[PassageLike]  # usable ones, best-ranked first
    from_answer_search: bool


def _plan(
    question: str, answer: str, search: Callable[[str, int], Sequence[PassageLike]], settings: RaftSettings
) -> _Plan:
    answer_words = words(_without_markers(answer))
    retrieved = _unique(search(question, settings.candidates))
    oracle = _best_support(answer_words, retrieved)
    from_answer_search = False
    pool = retrieved
    if oracle is None:
        # Fill up from the second search only after the question's own hard negatives.
        pool = _unique([*retrieved, *search(f"{question}\n{answer}", settings.candidates)])
        oracle = _best_support(answer_words, pool)
        from_answer_search = oracle is not None
    oracle_words = words(oracle.text) if oracle is not None else []
    distractors = [
        p
        for p in pool
        if p is not oracle
        and not _supports(answer_words, p)
        and not (oracle is not None and _overlaps(oracle_words, words(p.text), NEAR_DUPLICATE))
    ]
    return _Plan(oracle, distractors, from_answer_search)


def _unique(passages: Sequence[PassageLike]) -> list[PassageLike]:
    seen: set[str] = set()
    out = []
    for passage in passages:
        if passage.id not in seen:
            seen.add(passage.id)
            out.append(passage)
    return out


def _best_support(answer_words: list[str], passages: Sequence[PassageLike]) -> PassageLike | None:
    best, best_lcs = None, 0
    for passage in passages:  # best rank first, so a tie keeps the better-ranked passage
        passage_words = words(passage.text)
        common = lcs_length(answer_words, passage_words)
        if common > best_lcs and _enough(common, answer_words, passage_words, SUPPORT_THRESHOLD):
            best, best_lcs = passage, common
    return best


def _supports(answer_words: list[str], passage: PassageLike) -> bool:
    return _overlaps(answer_words, words(passage.text), SUPPORT_THRESHOLD)


def _overlaps(a: list[str], b: list[str], threshold: float) -> bool:
    return _enough(lcs_length(a, b), a, b, threshold)


def _enough(common: int, a: list[str], b: list[str], threshold: float) -> bool:
    shorter = min(len(a), len(b))
    return shorter > 0 and common >= threshold * shorter


def _without_markers(answer: str) -> str:
    # A marker in a pair's answer (a footnote "[1]", a citation of some other context) would teach
    # the model to cite a passage that is not there.
    return _MARKER.sub("", answer).strip()


def _passages_shown(messages: list[dict]) -> int:
    # Passage texts cannot open a passage tag (build_messages neutralises "<passage").
    return len(_PASSAGE_OPENING.findall(messages[-1]["content"]))
