"""The report's pure measures: each flags what it should and leaves clean data alone."""

from __future__ import annotations

from projects import quality

PUMP = (
    "To reset the P-200 pump, hold the red RESET button for five seconds until the status LED "
    "blinks green. Then release it and wait ten seconds before opening the inlet valve."
)


def test_garbled_text_is_flagged_and_clean_text_is_not():
    assert quality.garbled_ratio(PUMP) == 0.0
    assert quality.garbled_ratio("Café déjà vu — naïve “quotes”, 25 °C, Zürich.") == 0.0
    broken = "(cid:12)(cid:34)(cid:56) pump \ufffd\ufffd reset"
    assert quality.garbled_ratio(broken) > quality.GARBLED_WARN
    assert quality.garbled_ratio("CafÃ© dÃ©jÃ  vu") > quality.GARBLED_WARN  # UTF-8 read as Latin-1


def test_near_empty_pages():
    assert quality.near_empty([PUMP, "  3  ", "", "Page 2 of 9"]) == [1, 2, 3]


def test_near_duplicates_found_and_distinct_texts_not():
    edited = PUMP.replace("five seconds", "5 seconds")
    other = "Employees get 25 days of paid vacation per year; requests go to your manager two weeks ahead."
    same_topic = "The P-200 pump warranty lasts three years from the date of purchase, parts and labour."
    texts = [PUMP, other, edited, same_topic, PUMP.upper()]
    groups = quality.near_duplicate_groups(texts)
    assert groups == [[0, 2, 4]]
    assert quality.redundant(groups) == 2
    assert quality.duplicate_groups(texts) == [[0, 4]]  # exact once normalised


def test_leakage_between_eval_and_train_questions():
    train = ["How do I reset the P-200 pump?", "What does error E-4021 mean?", "Who approves vacation?"]
    eval_ = [
        "How do I reset the P-200 pump ?",
        "When is the fridge emptied?",
        "What does error E-4021 mean on the pump?",
    ]
    leaks = quality.leakage(train, eval_)
    assert [(m.a, m.b) for m in leaks] == [(0, 0)]
    assert leaks[0].similarity == 1.0
    assert quality.leakage(train, ["When is the fridge emptied?"]) == []


def test_language_and_distribution():
    assert quality.language(PUMP)[0] == "en"
    assert (
        quality.language("Pour réinitialiser la pompe, maintenez le bouton rouge pendant cinq secondes.")[0]
        == "fr"
    )
    assert quality.language("42") == (None, 0.0)
    d = quality.distribution([1, 2, 3, 4, 100])
    assert (d["count"], d["min"], d["median"], d["max"], d["p90"]) == (5, 1, 3, 100, 100)
    assert quality.distribution([])["median"] is None


def test_topic_balance():
    even = quality.topic_balance(["a", "b", "a", "b", None])
    assert even["balance"] == 1.0 and even["without_topic"] == 1 and even["largest_share"] == 0.5
    skewed = quality.topic_balance(["a"] * 9 + ["b"])
    assert skewed["topics"][0] == {"topic": "a", "pairs": 9, "share": 0.9} and skewed["balance"] < 0.5


def _report(train: int, eval_: int = 5, **pairs) -> dict:
    return {"documents": {"count": 3, "passages": 30}, "pairs": {"train": train, "eval": eval_, **pairs}}


def test_advice_thresholds():
    few = quality.advice(_report(40))
    assert [a["code"] for a in few] == ["few_pairs"]
    assert few[0]["level"] == "warning" and few[0]["text"].startswith(
        "Only 40 training pairs: LoRA will overfit"
    )
    assert quality.advice(_report(quality.PAIRS_FOR_TRAINING)) == []
    codes = quality.advice_codes({"advice": quality.advice(_report(
        200, 0, leakage={"count": 3}, duplicates=15, near_duplicates=10,
        support={"scored": 200, "unsupported": 70},
    ))})  # fmt: skip
    assert codes == {"no_eval_pairs", "leakage", "duplicate_pairs", "unsupported_answers"}
    # Under the thresholds: nothing said.
    assert quality.advice(_report(200, 20, duplicates=5, support={"scored": 220, "unsupported": 20})) == []
    assert [a["code"] for a in quality.advice({})] == ["no_data"]
    warnings_first = quality.advice(_report(10, pending_review=4))
    assert [a["level"] for a in warnings_first] == ["warning", "info"]
