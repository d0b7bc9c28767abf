"""Read instruction/response pairs from uploaded JSONL, JSON, CSV and TSV files.

Framework-free on purpose: the import view, the management command and the tests all call
`read_pairs` with raw bytes and get back plain data, with one readable error per rejected row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

# Accepted spellings of each field, in order of preference, as they appear in alpaca, Dolly,
# prompt/completion and question/answer datasets. Matched case-insensitively.
ALIASES: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "prompt", "question", "query"),
    "input": ("input", "context"),
    "response": ("response", "output", "answer", "completion"),
}
CONVERSATION_KEYS = ("messages", "conversations")
USER_ROLES = frozenset({"user", "human"})
ASSISTANT_ROLES = frozenset({"assistant", "gpt"})

# A JSONL line longer than this many times max_chars cannot hold a pair within the limits (three
# fields, JSON escapes, a few extra keys); it is refused before json.loads builds a tree of it.
LINE_CHARS_PER_FIELD_LIMIT = 50

# json.loads turns a "\u0000" or lone "\ud800" escape into a real character; PostgreSQL text
# cannot hold NUL and a lone surrogate cannot be encoded as UTF-8, so such rows are refused here
# rather than failing later at save time.
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

# Characters that JSON allows raw inside strings but that str.splitlines() and some JSONL
# readers treat as line breaks; pairs_to_jsonl escapes them so one record stays one line.
LINE_BREAKS_JSON_ALLOWS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


@dataclass(frozen=True)
class PairData:
    instruction: str
    input: str  # optional context, "" when absent
    response: str
    line: int  # 1-based; for CSV the physical line where the record starts (header is line 1)

    def key(self) -> str:
        return pair_key(self.instruction, self.input, self.response)


@dataclass(frozen=True)
class RowError:
    line: int
    error: str


@dataclass
class PairImport:
    pairs: list[PairData]  # valid rows, in file order
    rejected: list[RowError]  # in line order
    file_error: str | None  # the file as a whole could not be read; pairs is then empty


class PairFormatError(Exception):
    """The file as a whole cannot be read; the message is shown to the user as is."""


class _RowProblem(Exception):
    """One record is unusable; the message becomes its RowError."""


# A parsed record with its line number, or a row that already failed to parse.
_Item = tuple[int, object] | RowError


def read_pairs(
    data: bytes,
    filename: str,
    *,
    max_chars: int = 20_000,
    existing_keys: Collection[str] = (),
) -> PairImport:
    """Parse an uploaded file into valid pairs and per-line rejections.

    The format comes from the extension (.jsonl/.ndjson/.json/.csv/.tsv), else from the content.
    """
    try:
        items = _read_items(_decode(data), filename, max_line_chars=LINE_CHARS_PER_FIELD_LIMIT * max_chars)
    except PairFormatError as exc:
        return PairImport(pairs=[], rejected=[], file_error=str(exc))

    known = frozenset(existing_keys)  # callers may pass a list or a queryset; make lookups O(1)
    first_line: dict[str, int] = {}
    result = PairImport(pairs=[], rejected=[], file_error=None)
    for item in items:
        if isinstance(item, RowError):
            result.rejected.append(item)
            continue
        line, record = item
        try:
            pair = _to_pair(record, line, max_chars)
            key = pair.key()
            _check_duplicate(key, known, first_line)
        except _RowProblem as exc:
            result.rejected.append(RowError(line, str(exc)))
            continue
        first_line[key] = line
        result.pairs.append(pair)
    return result


def pair_key(instruction: str, input: str, response: str) -> str:
    """Identity of a pair for de-duplication: case and whitespace differences do not count."""
    fields = (" ".join(field.casefold().split()) for field in (instruction, input, response))
    return hashlib.sha256("\x1f".join(fields).encode("utf-8")).hexdigest()


def split_for(key: str, eval_fraction: float = 0.1) -> str:
    """Assign a pair to "eval" or "train" from its key alone.

    Depends on nothing but the key (no RNG, no ordering), so a pair keeps its split across
    re-imports, processes and machines, and eval rows never leak into training.
    """
    return "eval" if int(key[:8], 16) / 2**32 < eval_fraction else "train"


def pairs_to_jsonl(rows: Iterable[Mapping[str, str]]) -> str:
    """Serialise rows as JSONL: instruction, input (omitted when empty), response, then extras."""
    lines = []
    for row in rows:
        record: dict[str, object] = {"instruction": row["instruction"]}
        if row.get("input"):
            record["input"] = row["input"]
        record["response"] = row["response"]
        record.update((k, v) for k, v in row.items() if k not in ALIASES)
        text = json.dumps(record, ensure_ascii=False)
        for char, escape in LINE_BREAKS_JSON_ALLOWS.items():
            text = text.replace(char, escape)
        lines.append(text + "\n")
    return "".join(lines)


# --- decoding and format detection ------------------------------------------------------------


def _decode(data: bytes) -> str:
    # Excel's "Unicode text" export is UTF-16; name it, since "binary" would puzzle the user.
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or _looks_like_utf16(data):
        raise PairFormatError("The file is UTF-16 text; save it as UTF-8 and import again.")
    if b"\x00" in data:
        line = data[: data.index(b"\x00")].count(b"\n") + 1
        raise PairFormatError(
            f"The file contains NUL bytes (first on line {line:,}), so it is not text; "
            "export it as UTF-8 CSV or JSONL and import again."
        )
    try:
        # No fallback to latin-1: it never fails, so it would silently garble non-UTF-8 text.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # Name the first bad line: in a file mixing encodings the rest may well be fine.
        line = data[: exc.start].count(b"\n") + 1
        raise PairFormatError(
            f"Line {line:,} is not UTF-8 text (byte 0x{data[exc.start]:02X}); the file may be in another "
            "encoding such as Windows-1252 or Latin-1, or mix several. Save it as UTF-8 and import again."
        ) from None
    if not text.strip():
        raise PairFormatError("The file is empty.")
    return text


def _looks_like_utf16(data: bytes) -> bool:
    """UTF-16 without a byte-order mark: mostly-ASCII text has a NUL in every other byte."""
    sample = data[:4096]
    even, odd = sample[0::2], sample[1::2]
    return len(sample) >= 16 and any(
        zeros.count(0) >= 0.9 * len(zeros) and other.count(0) == 0
        for zeros, other in ((odd, even), (even, odd))
    )


def _read_items(text: str, filename: str, *, max_line_chars: int) -> list[_Item]:
    extension = os.path.splitext(filename.lower())[1]
    first_char = text.lstrip()[:1]
    if extension in (".jsonl", ".ndjson", ".json") or (
        extension not in (".csv", ".tsv") and first_char in ("{", "[")
    ):
        # Many ".json" exports are really JSONL, so the content decides array versus lines.
        items = _json_array_items(text) if first_char == "[" else _jsonl_items(text, max_line_chars)
    else:
        items = _csv_items(text, "\t" if extension == ".tsv" else ",")
    if not items:
        raise PairFormatError("The file has no rows to import.")
    return items


# --- JSON ------------------------------------------------------------------------------------


def _jsonl_items(text: str, max_line_chars: int) -> list[_Item]:
    items: list[_Item] = []
    # split("\n") rather than splitlines(): JSON strings may hold raw U+2028 and friends.
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        if len(raw) > max_line_chars:
            items.append(
                RowError(number, f"line is {len(raw):,} characters long; the limit is {max_line_chars:,}")
            )
            continue
        try:
            items.append((number, json.loads(raw)))
        except json.JSONDecodeError as exc:
            items.append(RowError(number, f"not valid JSON: {exc.msg} at column {exc.colno}"))
        except RecursionError:
            items.append(RowError(number, "nested too deeply to be a pair"))
    # One bad line is a rejected row; when none parses, the file is simply not JSONL.
    errors = [item for item in items if isinstance(item, RowError)]
    if len(errors) == len(items):
        raise PairFormatError(
            f"This does not look like JSONL: no line is valid JSON "
            f"(line {errors[0].line}: {errors[0].error})."
        )
    return items


def _json_array_items(text: str) -> list[_Item]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PairFormatError(
            f"This is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}."
        ) from None
    except RecursionError:
        raise PairFormatError("This JSON is nested too deeply to be a list of pairs.") from None
    if not isinstance(value, list):
        raise PairFormatError(f"Expected a JSON array of pairs, got {_describe(value)}.")
    # A JSON array has no useful line numbers; the 1-based position is what users can find.
    return [(index, record) for index, record in enumerate(value, start=1)]


# --- CSV / TSV -------------------------------------------------------------------------------


def _csv_items(text: str, preferred_delimiter: str) -> list[_Item]:
    delimiter = _pick_delimiter(text, preferred_delimiter)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    items: list[_Item] = []
    start = 1
    try:
        for row in reader:
            # reader.line_num counts physical lines, so quoted multi-line fields keep the
            # record's first line as its number.
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue  # blank lines, and the ",,," rows spreadsheets leave at the end
            if header is None:
                header = _checked_header(row)
            else:
                items.append((line, dict(zip(header, row, strict=False))))
    except csv.Error as exc:
        if "field limit" in str(exc):
            raise PairFormatError(
                f"A row of the CSV file is larger than {csv.field_size_limit():,} characters (at line "
                f"{reader.line_num:,}); usually a quote left open swallows the rest of the file. "
                "Check that row, save the file again and import it."
            ) from None
        raise PairFormatError(f"The CSV file cannot be read at line {reader.line_num:,}: {exc}.") from None
    return items


def _pick_delimiter(text: str, preferred: str) -> str:
    # Spreadsheets in many locales save "CSV" with semicolons, and .txt uploads could be either;
    # take the first delimiter whose header names both required columns.
    header_line = next(line for line in text.splitlines() if line.strip())
    for delimiter in dict.fromkeys((preferred, ",", "\t", ";")):
        try:
            cells = next(csv.reader([header_line], delimiter=delimiter))
        except csv.Error:
            continue  # reading the whole file with this delimiter reports it, with its line
        if not _missing_columns([_normalise_name(cell) for cell in cells]):
            return delimiter
    return preferred


def _checked_header(row: list[str]) -> list[str]:
    names = [_normalise_name(cell) for cell in row]
    missing = _missing_columns(names)
    if missing:
        found = ", ".join(f"'{cell.strip()}'" for cell in row)
        expected = "; ".join(f"{field}: {', '.join(ALIASES[field])}" for field in missing)
        raise PairFormatError(
            f"The header row has no {' or '.join(missing)} column. "
            f"Columns found: {found}. Expected names ({expected})."
        )
    return names


def _missing_columns(names: list[str]) -> list[str]:
    return [field for field in ("instruction", "response") if not set(ALIASES[field]) & set(names)]


# --- records to pairs ------------------------------------------------------------------------


def _to_pair(record: object, line: int, max_chars: int) -> PairData:
    instruction, input_, response = _fields(record)
    if not instruction:
        raise _RowProblem("empty instruction")
    if not response:
        raise _RowProblem("empty response")
    prompt_chars = len(instruction) + len(input_)
    if prompt_chars > max_chars:
        what = "instruction and input are" if input_ else "instruction is"
        raise _RowProblem(f"{what} {prompt_chars:,} characters; the limit is {max_chars:,}")
    if len(response) > max_chars:
        raise _RowProblem(f"response is {len(response):,} characters; the limit is {max_chars:,}")
    return PairData(instruction=instruction, input=input_, response=response, line=line)


def _fields(record: object) -> tuple[str, str, str]:
    if not isinstance(record, dict):
        raise _RowProblem(f"expected a JSON object, got {_describe(record)}")
    fields = {_normalise_name(name): value for name, value in record.items()}
    for name in CONVERSATION_KEYS:
        if name in fields:
            instruction, response = _first_exchange(fields[name], name)
            return instruction, "", response
    return (
        _text(_pick(fields, "instruction"), "instruction"),
        _text(_pick(fields, "input"), "input", required=False),
        _text(_pick(fields, "response"), "response"),
    )


def _pick(fields: Mapping[str, object], field: str) -> object:
    return next((fields[name] for name in ALIASES[field] if name in fields), None)


def _first_exchange(turns: object, name: str) -> tuple[str, str]:
    """The first user turn and the first assistant turn after it.

    System turns are ignored (not folded into input) and later turns of a multi-turn chat are
    dropped: the model is trained on single instruction/response pairs.
    """
    if not isinstance(turns, list):
        raise _RowProblem(f"'{name}' should be a list of turns, got {_describe(turns)}")
    instruction: str | None = None
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise _RowProblem(f"turn {number} of '{name}' is {_describe(turn)}, not an object")
        # OpenAI style is role/content, ShareGPT is from/value; exports mix them, so accept both.
        role = str(turn.get("role", turn.get("from", ""))).strip().casefold()
        text_key = "content" if "content" in turn else "value"
        if instruction is None:
            if role in USER_ROLES:
                instruction = _text(turn.get(text_key), text_key)
        elif role in ASSISTANT_ROLES:
            return instruction, _text(turn.get(text_key), text_key)
    raise _RowProblem("no user message" if instruction is None else "no assistant reply")


def _text(value: object, field: str, *, required: bool = True) -> str:
    if value is None:
        if required:
            raise _RowProblem(f"missing field '{field}'")
        return ""
    # bool is an int subclass, but "True" as a response is almost certainly a data mistake.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _RowProblem(f"field '{field}' is {_describe(value)}, not text")
    text = str(value).strip()
    if UNSTORABLE.search(text):
        raise _RowProblem(f"field '{field}' contains a NUL or unpaired surrogate character")
    return text


def _check_duplicate(key: str, known: frozenset[str], first_line: Mapping[str, int]) -> None:
    if key in known:
        raise _RowProblem("duplicate of a pair already in the project")
    if key in first_line:
        raise _RowProblem(f"duplicate of line {first_line[key]}")


def _normalise_name(name: object) -> str:
    return str(name).strip().casefold()


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"  # the only JSON type left
