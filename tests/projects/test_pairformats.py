"""Tests for projects.pairformats: pure functions, no Django, no database."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from projects.pairformats import (
    PairData,
    PairImport,
    RowError,
    pair_key,
    pairs_to_jsonl,
    read_pairs,
    split_for,
)


def jsonl(*records: object) -> bytes:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in records).encode("utf-8")


def read(data: bytes | str, filename: str = "pairs.jsonl", **kwargs: object) -> PairImport:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    result = read_pairs(raw, filename, **kwargs)  # type: ignore[arg-type]
    # Invariants every caller relies on.
    if result.file_error:
        assert result.pairs == [] and result.rejected == []
    assert [e.line for e in result.rejected] == sorted(e.line for e in result.rejected)
    return result


def triples(result: PairImport) -> list[tuple[str, str, str, int]]:
    return [(p.instruction, p.input, p.response, p.line) for p in result.pairs]


def errors(result: PairImport) -> list[tuple[int, str]]:
    return [(e.line, e.error) for e in result.rejected]


# --- shapes ----------------------------------------------------------------------------------


def test_alpaca_jsonl() -> None:
    result = read(
        jsonl(
            {"instruction": "Translate", "input": "bonjour", "output": "hello"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
        )
    )
    assert result.file_error is None
    assert triples(result) == [("Translate", "bonjour", "hello", 1), ("Say hi", "", "hi", 2)]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"prompt": "P", "completion": "C"}, ("P", "", "C")),
        ({"question": "Q", "answer": "A"}, ("Q", "", "A")),
        ({"query": "Q", "context": "ctx", "response": "R"}, ("Q", "ctx", "R")),
        ({" Instruction ": "I", "RESPONSE": "R"}, ("I", "", "R")),  # names are case-insensitive
        ({"prompt": 12, "completion": 3.5}, ("12", "", "3.5")),  # numbers become text
    ],
)
def test_field_aliases(record: dict[str, object], expected: tuple[str, str, str]) -> None:
    assert triples(read(jsonl(record))) == [(*expected, 1)]


def test_messages_shape_takes_first_exchange_and_ignores_system() -> None:
    record = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6"},
        ]
    }
    assert triples(read(jsonl(record))) == [("What is 2+2?", "", "4", 1)]


def test_sharegpt_shape() -> None:
    record = {
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "Hello?"},
            {"from": "gpt", "value": "Hi there."},
        ]
    }
    assert triples(read(jsonl(record))) == [("Hello?", "", "Hi there.", 1)]


def test_conversation_rejections() -> None:
    result = read(
        jsonl(
            {"messages": [{"role": "user", "content": "Q"}]},
            {"messages": [{"role": "assistant", "content": "A"}]},
            {"messages": "Q then A"},
            {"conversations": [{"from": "human", "value": ["a", "b"]}]},
            {"messages": ["Q"]},
        )
    )
    assert result.pairs == []
    assert errors(result) == [
        (1, "no assistant reply"),
        (2, "no user message"),
        (3, "'messages' should be a list of turns, got a string"),
        (4, "field 'value' is a list, not text"),
        (5, "turn 1 of 'messages' is a string, not an object"),
    ]


def test_json_array_uses_position_as_line() -> None:
    data = json.dumps(
        [
            {"instruction": "A", "output": "1"},
            {"instruction": "B"},
            {"instruction": "C", "output": "3"},
        ],
        indent=2,
    )
    result = read(data, "pairs.json")
    assert triples(result) == [("A", "", "1", 1), ("C", "", "3", 3)]
    assert errors(result) == [(2, "missing field 'response'")]


def test_json_extension_holding_jsonl() -> None:
    result = read(jsonl({"prompt": "P", "completion": "C"}), "export.json")
    assert triples(result) == [("P", "", "C", 1)]


def test_csv_with_quoted_multiline_field_numbers_records_by_first_line() -> None:
    data = (
        "Prompt,Context,Answer\r\n"
        'First,,"one\r\ntwo\r\nthree"\r\n'
        "Second,ctx,two\r\n"
        "\r\n"
        ",,\r\n"  # spreadsheet filler rows are skipped like blank lines
        "Third,,\r\n"
    )
    result = read(data, "pairs.csv")
    assert triples(result) == [
        ("First", "", "one\r\ntwo\r\nthree", 2),
        ("Second", "ctx", "two", 5),
    ]
    assert errors(result) == [(8, "empty response")]


def test_tsv() -> None:
    # Commas are plain text in TSV; spreadsheets quote a field that holds a tab or newline.
    data = 'instruction\tinput\toutput\nSum\t1, 2\t3\nSay "hi"\t\t"a\tb\nc"\nLast\t\tx\n'
    result = read(data, "pairs.tsv")
    assert triples(result) == [
        ("Sum", "1, 2", "3", 2),
        ('Say "hi"', "", "a\tb\nc", 3),
        ("Last", "", "x", 5),
    ]


def test_semicolon_csv_from_spreadsheet() -> None:
    result = read("question;answer\nQ;A\n", "pairs.csv")
    assert triples(result) == [("Q", "", "A", 2)]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (jsonl({"prompt": "P", "completion": "C"}).decode(), ("P", "", "C", 1)),
        ('[{"prompt": "P", "completion": "C"}]', ("P", "", "C", 1)),
        ("instruction,response\nI,R\n", ("I", "", "R", 2)),
        ("instruction\tresponse\nI\tR\n", ("I", "", "R", 2)),
    ],
)
def test_unknown_extension_sniffs_content(data: str, expected: tuple[str, str, str, int]) -> None:
    assert triples(read(data, "upload.txt")) == [expected]


def test_short_csv_row_is_missing_field() -> None:
    result = read("instruction,response\nonly instruction\n", "pairs.csv")
    assert errors(result) == [(2, "missing field 'response'")]


def test_csv_without_usable_header_names_columns_found_and_expected() -> None:
    result = read("title,body\nA,B\n", "pairs.csv")
    assert result.file_error is not None
    assert "'title', 'body'" in result.file_error
    assert "instruction or response" in result.file_error
    assert "prompt" in result.file_error and "completion" in result.file_error


def test_csv_header_only_has_no_rows() -> None:
    result = read("instruction,response\n", "pairs.csv")
    assert result.file_error == "The file has no rows to import."


# --- row rejections --------------------------------------------------------------------------


def test_each_row_rejection_reason_with_its_line() -> None:
    lines = [
        json.dumps({"instruction": "ok", "response": "fine"}),  # 1
        "",  # 2: blank lines are skipped but still counted
        json.dumps({"instruction": "Q"}),  # 3
        json.dumps({"response": "R"}),  # 4
        json.dumps({"instruction": "   ", "response": "R"}),  # 5
        json.dumps({"instruction": "Q", "response": "\n\t"}),  # 6
        json.dumps({"instruction": "Q", "response": ["a"]}),  # 7
        json.dumps({"instruction": {"a": 1}, "response": "R"}),  # 8
        json.dumps({"instruction": "Q", "response": True}),  # 9
        json.dumps(["Q", "R"]),  # 10
        '{"instruction": "Q" "response": "R"}',  # 11
        json.dumps({"instruction": "Q", "response": None}),  # 12
        json.dumps({"instruction": "Q", "response": "a\u0000b"}),  # 13
        json.dumps({"instruction": "Q", "input": 7, "response": "R"}),  # 14: input may be a number
    ]
    result = read("\n".join(lines))
    assert triples(result) == [("ok", "", "fine", 1), ("Q", "7", "R", 14)]
    assert errors(result) == [
        (3, "missing field 'response'"),
        (4, "missing field 'instruction'"),
        (5, "empty instruction"),
        (6, "empty response"),
        (7, "field 'response' is a list, not text"),
        (8, "field 'instruction' is an object, not text"),
        (9, "field 'response' is true/false, not text"),
        (10, "expected a JSON object, got a list"),
        (11, "not valid JSON: Expecting ',' delimiter at column 21"),
        (12, "missing field 'response'"),
        (13, "field 'response' contains a NUL or unpaired surrogate character"),
    ]


def test_values_are_stripped() -> None:
    result = read(jsonl({"instruction": "  Q \n", "input": " \t", "response": "\n R  "}))
    assert triples(result) == [("Q", "", "R", 1)]


def test_over_long_fields_report_numbers_with_separators() -> None:
    result = read(
        jsonl(
            {"instruction": "x" * 25_013, "response": "R"},
            {"instruction": "x" * 15_000, "input": "y" * 6_000, "response": "R"},
            {"instruction": "Q", "response": "z" * 25_013},
            {"instruction": "x" * 20_000, "response": "z" * 20_000},  # exactly at the limit
        )
    )
    assert errors(result) == [
        (1, "instruction is 25,013 characters; the limit is 20,000"),
        (2, "instruction and input are 21,000 characters; the limit is 20,000"),
        (3, "response is 25,013 characters; the limit is 20,000"),
    ]
    assert [p.line for p in result.pairs] == [4]


def test_max_chars_is_configurable() -> None:
    result = read(jsonl({"instruction": "Q", "response": "abcdef"}), max_chars=5)
    assert errors(result) == [(1, "response is 6 characters; the limit is 5")]


# --- duplicates ------------------------------------------------------------------------------


def test_duplicates_within_file_point_at_first_valid_line() -> None:
    result = read(
        jsonl(
            {"instruction": "", "response": "R"},  # invalid: a later copy is not its duplicate
            {"instruction": "Hello  World", "response": "Hi"},
            {"instruction": "Other", "response": "X"},
            {"prompt": "hello world", "completion": " HI "},
            {"instruction": "hello\nworld", "response": "hi"},
        )
    )
    assert [p.line for p in result.pairs] == [2, 3]
    assert errors(result) == [
        (1, "empty instruction"),
        (4, "duplicate of line 2"),
        (5, "duplicate of line 2"),
    ]


def test_duplicates_of_existing_pairs() -> None:
    existing = [pair_key("Known", "", "Answer")]
    result = read(
        jsonl(
            {"instruction": "known", "response": "answer"},
            {"instruction": "New", "response": "Answer"},
            {"instruction": "KNOWN", "response": "ANSWER"},
        ),
        existing_keys=existing,
    )
    assert [p.line for p in result.pairs] == [2]
    assert errors(result) == [
        (1, "duplicate of a pair already in the project"),
        (3, "duplicate of a pair already in the project"),
    ]


# --- file errors -----------------------------------------------------------------------------


def test_utf8_bom_is_accepted() -> None:
    csv_result = read(b"\xef\xbb\xbfinstruction,response\nCaf\xc3\xa9,ok\n", "pairs.csv")
    assert triples(csv_result) == [("Café", "", "ok", 2)]
    jsonl_result = read(b"\xef\xbb\xbf" + jsonl({"prompt": "P", "completion": "C"}))
    assert triples(jsonl_result) == [("P", "", "C", 1)]


def test_non_utf8_is_a_file_error_not_a_guess() -> None:
    data = "instruction,response\nCafé,résumé\n".encode("cp1252")
    assert read(data, "pairs.csv").file_error == (
        "Line 2 is not UTF-8 text (byte 0xE9); the file may be in another encoding such as "
        "Windows-1252 or Latin-1, or mix several. Save it as UTF-8 and import again."
    )


def test_utf16_is_named() -> None:
    data = "instruction,response\nQ,R\n".encode("utf-16")
    assert read(data, "pairs.csv").file_error == (
        "The file is UTF-16 text; save it as UTF-8 and import again."
    )


def test_nul_bytes_mean_binary() -> None:
    result = read(b"PK\x03\x04\x00\x00binary", "pairs.csv")
    assert result.file_error is not None and "NUL" in result.file_error


@pytest.mark.parametrize("data", [b"", b"\xef\xbb\xbf", b"  \n\r\n\t"])
def test_empty_file(data: bytes) -> None:
    assert read(data, "pairs.jsonl").file_error == "The file is empty."


def test_jsonl_where_no_line_parses_is_a_file_error() -> None:
    result = read("just some prose\nmore prose\n", "notes.jsonl")
    assert result.file_error is not None
    assert result.file_error.startswith("This does not look like JSONL:")
    assert "line 1" in result.file_error


def test_json_array_errors() -> None:
    broken = read('[{"prompt": "P",]', "pairs.json").file_error
    assert broken is not None and broken.startswith("This is not valid JSON:")
    assert read("[]", "pairs.json").file_error == "The file has no rows to import."


# --- keys, splits, serialisation -------------------------------------------------------------


def test_pair_key_normalises_case_and_whitespace_only() -> None:
    base = pair_key("Hello World", "", "Fine, thanks.")
    assert len(base) == 64 and int(base, 16) >= 0
    assert pair_key("  hello\n\tWORLD ", "", "fine,  THANKS. ") == base
    assert pair_key("STRASSE", "", "x") == pair_key("straße", "", "x")  # casefold, not lower
    assert pair_key("Hello World", "", "Fine, thanks") != base
    # The separator keeps field boundaries: moving text between fields changes the key.
    assert pair_key("a", "b", "c") != pair_key("a b", "", "c")
    expected = hashlib.sha256(b"hello world\x1f\x1ffine, thanks.").hexdigest()
    assert base == expected


def test_pair_data_key_matches_pair_key() -> None:
    pair = PairData(instruction="Q", input="ctx", response="R", line=3)
    assert pair.key() == pair_key("Q", "ctx", "R")


def test_split_for_is_a_fixed_function_of_the_key() -> None:
    # Pinned values: if these change, every existing project's train/eval split changes.
    assert split_for("00000000" + "0" * 56) == "eval"
    assert split_for("19999999" + "0" * 56) == "eval"  # just under 0.1
    assert split_for("1a000000" + "0" * 56) == "train"
    assert split_for("ffffffff" + "f" * 56) == "train"
    key = pair_key("What is 2+2?", "", "4")
    expected = "eval" if int(key[:8], 16) < 0x1999999A else "train"
    assert split_for(key) == split_for(key) == expected
    assert split_for(key, eval_fraction=0.0) == "train"
    assert split_for(key, eval_fraction=1.0) == "eval"


def test_split_for_eval_share_is_close_to_fraction() -> None:
    rng = random.Random(20240601)
    keys = [hashlib.sha256(rng.randbytes(16)).hexdigest() for _ in range(10_000)]
    share = sum(split_for(key) == "eval" for key in keys) / len(keys)
    assert 0.085 <= share <= 0.115
    share_20 = sum(split_for(key, 0.2) == "eval" for key in keys) / len(keys)
    assert 0.185 <= share_20 <= 0.215


def test_pairs_to_jsonl_format() -> None:
    text = pairs_to_jsonl(
        [
            {"instruction": "Café?", "input": "", "response": "Oui", "split": "train"},
            {"instruction": "Q", "input": "ctx", "response": "R", "source": "upload.csv"},
        ]
    )
    assert text == (
        '{"instruction": "Café?", "response": "Oui", "split": "train"}\n'
        '{"instruction": "Q", "input": "ctx", "response": "R", "source": "upload.csv"}\n'
    )
    assert pairs_to_jsonl([]) == ""


def test_pairs_to_jsonl_round_trips_through_read_pairs() -> None:
    rows = [
        {"instruction": 'Line\nbreaks\r\nand "quotes"', "input": "", "response": "ok"},
        {"instruction": "Unicode ✓ 日本語", "input": "ctx", "response": "a\u2028b\u2029c\x85d"},
        {"instruction": "Tabs\there", "input": "", "response": '{"json": [1]}', "split": "eval"},
    ]
    text = pairs_to_jsonl(rows)
    assert len(text.splitlines()) == len(rows)  # exotic line breaks stay escaped
    result = read(text, "export.jsonl")
    assert result.file_error is None and result.rejected == []
    assert [(p.instruction, p.input, p.response) for p in result.pairs] == [
        (r["instruction"].strip(), r["input"], r["response"].strip()) for r in rows
    ]
    assert [p.line for p in result.pairs] == [1, 2, 3]


def test_result_types() -> None:
    result = read(jsonl({"prompt": "P"}))
    assert isinstance(result.rejected[0], RowError)
    with pytest.raises(AttributeError):
        result.rejected[0].line = 2  # type: ignore[misc]
