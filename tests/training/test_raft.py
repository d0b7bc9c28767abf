"""training.ml.raft: RAFT examples built from question–answer pairs with a fake search (no models)."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import pytest

from training.ml.lora import Example
from training.ml.prompt import Passage, build_messages, cited_numbers
from training.ml.raft import (
    RaftSettings,
    RaftStats,
    RetrievedPassage,
    cite,
    lcs_length,
    passage_from_hit,
    raft_examples,
    words,
)
from training.ml.rag import Chunk, Hit

N_CTX = 100_000
MAX_NEW_TOKENS = 100


def count_tokens(messages: list[dict]) -> int:
    """A stand-in tokenizer: four characters a token."""
    return len("".join(m["content"] for m in messages)) // 4


def passage(pid: str, text: str) -> RetrievedPassage:
    return RetrievedPassage(pid, f"Doc {pid}", f"Section {pid}", text)


FILLER = [
    "The pump housing is cast iron and painted blue for outdoor use in most climates.",
    "Warranty claims go through the regional dealer within two years of purchase.",
    "Noise levels stay below fifty decibels at a distance of one metre from the unit.",
    "Spare filters ship in packs of three and fit every model built after 2019.",
    "The display shows error codes; code E4 means the inlet is blocked by debris.",
    "Winter storage requires draining the tank and disconnecting the power cable.",
    "Firmware updates arrive over the service port using the maintenance laptop.",
    "Each unit leaves the factory tested for leaks at twice its rated pressure.",
    "Cleaning the impeller every season keeps the flow rate near its rated value.",
    "The manual lists torque values for every bolt on the mounting bracket.",
]


class FakeSearch:
    """Ranked lists per query; any other query (question + answer) gets `fallback`."""

    def __init__(self, results: dict[str, list[RetrievedPassage]], fallback: Sequence[RetrievedPassage] = ()):
        self.results = results
        self.fallback = list(fallback)
        self.calls: list[tuple[str, int]] = []

    def __call__(self, query: str, k: int) -> list[RetrievedPassage]:
        self.calls.append((query, k))
        return list(self.results.get(query, self.fallback))[:k]


def fillers(prefix: str, count: int = 7) -> list[RetrievedPassage]:
    return [passage(f"{prefix}-f{i}", FILLER[i % len(FILLER)]) for i in range(count)]


def run(
    pairs: list[tuple[str, str]],
    search: FakeSearch,
    settings: RaftSettings = RaftSettings(),  # noqa: B008
    n_ctx: int = N_CTX,
) -> tuple[list[Example], RaftStats]:
    return raft_examples(
        pairs,
        search,
        count_tokens=count_tokens,
        n_ctx=n_ctx,
        max_new_tokens=MAX_NEW_TOKENS,
        settings=settings,
    )


def shown(example: Example) -> list[tuple[int, str]]:
    """(number, title) of each passage in the example's prompt, in order."""
    user = example.messages[-2]["content"]
    return [(int(n), title) for n, title in re.findall(r'<passage n="(\d+)" source="(Doc [^ ]+) —', user)]


def reply(example: Example) -> str:
    assert example.messages[-1]["role"] == "assistant"
    return example.messages[-1]["content"]


ALWAYS = RaftSettings(oracle_fraction=1.0)
NEVER = RaftSettings(oracle_fraction=0.0)

ANSWER = "Set the relief valve to 6 bar before the first start."
ORACLE_TEXT = (
    "Commissioning. Set the relief valve to 6 bar before the first start, then open the outlet slowly."
)
RELATED_TEXT = "The relief valve protects the pump; it is found beside the outlet on the left."


def test_the_oracle_is_the_passage_that_supports_the_answer_not_the_top_ranked() -> None:
    ranked = [
        passage("related", RELATED_TEXT),
        *fillers("a", 2),
        passage("oracle", ORACLE_TEXT),
        *fillers("b"),
    ]
    examples, stats = run(
        [("How do I set the relief valve?", ANSWER)],
        FakeSearch({"How do I set the relief valve?": ranked}),
        ALWAYS,
    )

    (example,) = examples
    numbers = {title: n for n, title in shown(example)}
    assert cited_numbers(reply(example)) == [numbers["Doc oracle"]]
    assert stats.with_oracle == 1 and stats.oracle_not_found == 0 and stats.oracle_from_answer_search == 0


def test_a_tie_goes_to_the_better_ranked_passage() -> None:
    first = passage("first", "Note. " + ANSWER)
    second = passage("second", ANSWER + " See also the annex.")
    question = "Relief valve?"
    (example,), _ = run(
        [(question, ANSWER)], FakeSearch({question: [*fillers("a", 2), first, second, *fillers("b")]}), ALWAYS
    )

    titles = {title: n for n, title in shown(example)}
    assert cited_numbers(reply(example)) == [titles["Doc first"]]
    assert "Doc second" not in titles  # it supports the answer too, so it is no distractor


def test_when_the_question_finds_no_support_the_answer_joins_the_search() -> None:
    question = "Relief valve?"
    search = FakeSearch(
        {question: fillers("a", 8)}, fallback=[passage("oracle", ORACLE_TEXT), *fillers("b", 3)]
    )
    (example,), stats = run([(question, ANSWER)], search, ALWAYS)

    assert search.calls == [(question, 8), (f"{question}\n{ANSWER}", 8)]
    titles = {title: n for n, title in shown(example)}
    assert cited_numbers(reply(example)) == [titles["Doc oracle"]]
    # The distractors are still the question's own hard negatives.
    assert all(title.startswith("Doc a-") for title in titles if title != "Doc oracle")
    assert stats.oracle_from_answer_search == 1 and stats.with_oracle == 1


def test_without_any_support_the_pair_is_kept_with_a_plain_answer() -> None:
    question = "Relief valve?"
    (example,), stats = run(
        [(question, ANSWER)], FakeSearch({question: fillers("a", 8)}, fallback=fillers("b", 8))
    )

    assert reply(example) == ANSWER
    assert len(shown(example)) == 4  # as many passages as the chat shows
    assert stats == RaftStats(
        examples=1,
        with_oracle=0,
        without_oracle=0,
        oracle_not_found=1,
        oracle_from_answer_search=0,
        short_of_distractors=0,
        passages_dropped=0,
    )


def test_distractors_are_never_the_oracle_a_near_copy_of_it_or_another_supporting_passage() -> None:
    manual = " ".join(FILLER[6:])  # no distractor is part of it
    oracle = passage("oracle", f"{ANSWER} {manual}")
    near_copy = passage("near", f"{manual} Keep this page.")  # the oracle without the answer
    other_support = passage("support", f"Quick start: {ANSWER}")
    ranked = [near_copy, oracle, other_support, oracle, *fillers("a", 6)]  # the oracle twice: one passage
    question = "Relief valve?"
    for settings in (ALWAYS, NEVER):
        (example,), stats = run([(question, ANSWER)], FakeSearch({question: ranked}), settings)
        titles = [title for _, title in shown(example)]
        assert "Doc near" not in titles and "Doc support" not in titles
        if settings is ALWAYS:
            assert sorted(titles) == ["Doc a-f0", "Doc a-f1", "Doc a-f2", "Doc oracle"]
        else:
            assert sorted(titles) == ["Doc a-f0", "Doc a-f1", "Doc a-f2", "Doc a-f3"]
            assert stats.without_oracle == 1


def test_the_left_out_share_is_exact_per_seed() -> None:
    pairs, results = [], {}
    for i in range(200):
        question = f"Question {i}?"
        answer = f"Answer number {i} is to tighten bolt {i} by hand."
        pairs.append((question, answer))
        results[question] = [
            *fillers(f"q{i}", 3),
            passage(f"o{i}", f"Step {i}. {answer}"),
            *fillers(f"r{i}", 4),
        ]
    search = FakeSearch(results)

    examples, stats = run(pairs, search, RaftSettings(oracle_fraction=0.8, seed=7))
    assert (stats.with_oracle, stats.without_oracle) == (160, 40)
    left_out = [i for i, example in enumerate(examples) if not cited_numbers(reply(example))]
    assert len(left_out) == 40
    for i in left_out:
        assert reply(examples[i]) == pairs[i][1]
        assert f"Doc o{i}" not in [title for _, title in shown(examples[i])]
        assert len(shown(examples[i])) == 4

    again, _ = run(pairs, search, RaftSettings(oracle_fraction=0.8, seed=7))
    assert again == examples
    other, other_stats = run(pairs, search, RaftSettings(oracle_fraction=0.8, seed=8))
    assert other_stats.without_oracle == 40
    assert [i for i, e in enumerate(other) if not cited_numbers(reply(e))] != left_out


def test_the_oracle_lands_in_every_position_and_the_citation_follows_it() -> None:
    pairs, results = [], {}
    for i in range(60):
        question = f"Question {i}?"
        answer = f"Answer number {i} is to tighten bolt {i} by hand."
        pairs.append((question, answer))
        results[question] = [passage(f"o{i}", answer), *fillers(f"r{i}", 7)]
    examples, stats = run(pairs, FakeSearch(results), ALWAYS)

    positions = set()
    for i, example in enumerate(examples):
        numbers = {title: n for n, title in shown(example)}
        assert cited_numbers(reply(example)) == [numbers[f"Doc o{i}"]]
        positions.add(numbers[f"Doc o{i}"])
    assert positions == {1, 2, 3, 4}
    assert stats.with_oracle == 60


def test_the_prompt_is_exactly_what_the_chat_builds_for_those_passages() -> None:
    question = "Relief valve?"
    ranked = [*fillers("a", 2), passage("oracle", ORACLE_TEXT), *fillers("b")]
    by_title = {p.title: p for p in ranked}
    for settings in (ALWAYS, NEVER):
        (example,), _ = run([(question, ANSWER)], FakeSearch({question: ranked}), settings)
        passages = [
            Passage(n, title, by_title[title].location, by_title[title].text) for n, title in shown(example)
        ]
        expected = build_messages(
            question, passages, [], count_tokens=count_tokens, n_ctx=N_CTX, max_new_tokens=MAX_NEW_TOKENS
        )
        assert example.messages[:-1] == expected


def test_a_prompt_too_long_loses_distractors_never_the_oracle() -> None:
    question = "Relief valve?"
    long_fillers = [passage(f"f{i}", FILLER[i] + " " + "padding " * 60) for i in range(7)]
    # Put the oracle last in retrieval, so only a shuffle could place it first.
    ranked = [*long_fillers, passage("oracle", ORACLE_TEXT + " " + "detail " * 60)]
    by_title = {p.title: p for p in ranked}
    pairs = [(question, ANSWER)] * 12
    n_ctx = 600  # room for about two of these passages
    examples, stats = run(pairs, FakeSearch({question: ranked}), ALWAYS, n_ctx=n_ctx)

    assert stats.passages_dropped > 0
    for example in examples:
        numbers = {title: n for n, title in shown(example)}
        assert 1 <= len(numbers) < 4
        assert cited_numbers(reply(example)) == [numbers["Doc oracle"]]
        passages = [Passage(n, t, by_title[t].location, by_title[t].text) for t, n in numbers.items()]
        expected = build_messages(
            question, passages, [], count_tokens=count_tokens, n_ctx=n_ctx, max_new_tokens=MAX_NEW_TOKENS
        )
        assert example.messages[:-1] == expected


def test_too_few_candidates_still_make_an_example() -> None:
    question = "Relief valve?"
    (example,), stats = run(
        [(question, ANSWER)], FakeSearch({question: [passage("oracle", ORACLE_TEXT)]}), ALWAYS
    )
    assert [title for _, title in shown(example)] == ["Doc oracle"]
    assert reply(example) == "Set the relief valve to 6 bar before the first start [1]."
    assert stats.short_of_distractors == 1


def test_markers_already_in_an_answer_are_removed() -> None:
    question = "Relief valve?"
    answer = "Set the relief valve to 6 bar [3] before the first start.[12]"
    (example,), _ = run([(question, answer)], FakeSearch({question: fillers("a", 8)}, fallback=fillers("b")))
    assert reply(example) == "Set the relief valve to 6 bar before the first start."


@pytest.mark.parametrize(
    ("answer", "cited"),
    [
        ("Use 230 V.", "Use 230 V [2]."),
        ("Is it safe? Yes!", "Is it safe? Yes [2]!"),
        ("See the table below:\n\n| a | b |", "See the table below:\n\n| a | b | [2]"),
        ("It depends...", "It depends... [2]"),
    ],
)
def test_cite(answer: str, cited: str) -> None:
    assert cite(answer, 2) == cited
    assert cited_numbers(cited) == [2]


def test_lcs_length_matches_dynamic_programming() -> None:
    def slow(a: list[str], b: list[str]) -> int:
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]

    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randrange(0, 70))]
        b = [rng.choice("abcdef") for _ in range(rng.randrange(0, 70))]
        assert lcs_length(a, b) == slow(a, b)
    assert lcs_length(words("The Pump, the PUMP!"), words("a pump the pump")) == 3


def test_a_hit_becomes_the_passage_the_chat_shows() -> None:
    from inference.services import sources_from_hits

    for heading_path, page in [(("Install", "On Debian"), 3), ((), None), (("Install",), None), ((), 2)]:
        hit = Hit(Chunk("4-1", 4, "Guide", heading_path, page, 0, "Text."), 0.5, 1, None)
        (source,) = sources_from_hits([hit])
        assert passage_from_hit(hit) == RetrievedPassage(
            "4-1", source["title"], source["location"], source["text"]
        )


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        RaftSettings(oracle_fraction=1.5)
    with pytest.raises(ValueError):
        RaftSettings(distractors=-1)
    with pytest.raises(ValueError):
        RaftSettings(distractors=3, candidates=3)
