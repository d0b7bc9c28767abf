"""Turn uploaded documents into structured text: sections with heading paths and page numbers.

This module is deliberately free of Django so that it can run in a worker, a script or a test on
its own. It reads one stored upload and never writes anything.

Untrusted input is the normal case here, so every format goes through the same gate:
`detect_kind` checks that the content matches the extension, each parser caps what it will
unpack, and every failure surfaces as a `ParseError` whose message can be shown to the uploader
as is. Library exceptions are chained (`raise ... from exc`) so callers can still log them.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import math
import posixpath
import re
import signal
import subprocess
import sys
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import ParseError as XmlSyntaxError

import charset_normalizer
import docx
from bs4 import BeautifulSoup, CData, NavigableString, Tag
from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeElementTree
from docx.table import Table
from docx.text.paragraph import Paragraph
from markdown_it import MarkdownIt
from markdown_it.token import Token
from pypdf import PageObject, PasswordType, PdfReader
from pypdf.errors import DependencyError, LimitReachedError, PyPdfError

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "ParseError",
    "ParseLimits",
    "ParseTimeout",
    "ParsedDocument",
    "Section",
    "detect_kind",
    "parse_file",
    "parse_file_isolated",
]


@dataclass
class Section:
    # None for text before the first heading, and for a section's continuation on a new PDF page.
    heading: str | None
    level: int  # heading level 1..6, 0 when there is no heading
    path: list[str]  # heading path from the top, e.g. ["Install", "On Debian"]
    text: str  # body text, paragraphs separated by blank lines
    page: int | None = None  # 1-based page number (PDF only)


@dataclass
class ParsedDocument:
    kind: str  # "pdf" | "docx" | "html" | "markdown" | "text" | "csv"
    title: str
    sections: list[Section]
    page_count: int | None  # PDFs only

    @property
    def text(self) -> str:
        """The whole text: headings as Markdown "# " lines, blocks (and so pages) separated by blank lines."""
        parts: list[str] = []
        for section in self.sections:
            if section.heading:
                parts.append("#" * max(section.level, 1) + " " + section.heading)
            if section.text:
                parts.append(section.text)
        return "\n\n".join(parts)

    @property
    def char_count(self) -> int:
        return len(self.text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "title": self.title,
            "page_count": self.page_count,
            "sections": [asdict(section) for section in self.sections],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParsedDocument:
        return cls(
            kind=d["kind"],
            title=d["title"],
            page_count=d.get("page_count"),
            sections=[
                Section(
                    heading=s["heading"],
                    level=s["level"],
                    path=list(s["path"]),
                    text=s["text"],
                    page=s.get("page"),
                )
                for s in d["sections"]
            ],
        )


class ParseError(Exception):
    """Message is shown to a non-technical user as is: say what is wrong and what to do."""


class ParseTimeout(ParseError):
    """The child process reading the file ran out of time; the file may be hostile or just slow."""


@dataclass(frozen=True)
class ParseLimits:
    max_unpacked_bytes: int = 200 * 1024 * 1024  # total uncompressed size of all zip members (DOCX)
    max_compression_ratio: int = 100  # per member, uncompressed/compressed
    max_zip_members: int = 2000
    max_pdf_pages: int = 2000
    max_chars: int = 20_000_000


_DEFAULT_LIMITS = ParseLimits()  # a module constant, not a call in the signature (ruff B008)


_KIND_BY_EXTENSION: dict[str, str] = {
    ".pdf": "pdf",
    ".docx": "docx",
    ".html": "html",
    ".htm": "html",
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".text": "text",
    ".csv": "csv",
}
SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(_KIND_BY_EXTENSION)

_LABELS = {
    "pdf": "PDF",
    "docx": "Word file",
    "html": "web page",
    "markdown": "Markdown file",
    "text": "text file",
    "csv": "CSV file",
}
_SUPPORTED_HINT = "a PDF, a Word file (.docx), a web page (.html), Markdown (.md), plain text (.txt) or CSV"
_EMPTY = "The file is empty."

# How many leading bytes parse_file reads for detect_kind: enough for magic bytes and a text sniff.
_HEAD_BYTES = 8192

# Magic bytes of formats people upload by mistake, to name what the file really is.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"MZ", "a Windows program"),
    (b"\x7fELF", "a Linux program"),
    (b"\xcf\xfa\xed\xfe", "a macOS program"),
    (b"\xca\xfe\xba\xbe", "a macOS or Java program"),
    (b"%PDF-", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive or an Office document"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old-format or password-protected Office document"),
    (b"{\\rtf", "an RTF document"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"\x1f\x8b", "a gzip archive"),
)
# Magic bytes that are themselves plain ASCII, so a text file starting with them is still text.
_TEXTUAL_MAGIC = (b"MZ", b"GIF8")

_BOMS: tuple[tuple[bytes, str], ...] = (
    # UTF-32 first: its little-endian BOM starts with the UTF-16 one.
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)

# Control characters other than tab/newline/carriage return/form feed; a real text file has
# next to none, binary data decoded by a lenient codec has plenty.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
_MAX_CONTROL_SHARE = 0.05
# How much more "mess" (charset-normalizer's chaos score) a Windows-1252 reading may show and still win.
_WESTERN_CHAOS_MARGIN = 0.05

_NEWLINES = re.compile(r"\r\n?|[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_INVISIBLE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_BLANK_LINE_RUNS = re.compile(r"\n{3,}")
_ANY_WHITESPACE = re.compile(r"\s+")

_TITLE_MAX_CHARS = 120


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def detect_kind(head: bytes, filename: str) -> str:
    """Decide the kind from the extension AND the content's first bytes (magic bytes).

    Raise ParseError for an unsupported extension, for content that does not match the extension
    (an .exe renamed .pdf: 'This file is not a PDF: it looks like a Windows program.'), and for
    binary content in a text format (NUL bytes / not decodable).
    """
    _, extension = _split_filename(filename)
    kind = _kind_for_extension(extension)
    if not head:
        raise ParseError(_EMPTY)
    if kind == "pdf":
        # The PDF header may legally follow a little junk, and pypdf copes with that.
        if b"%PDF-" not in head[:1024]:
            raise ParseError(_not_format("a PDF", head, "PDF"))
    elif kind == "docx":
        if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
            raise ParseError(
                "This file is not a .docx Word document: it is an old-format (.doc) or password-protected "
                "Word file. Open it in Word, remove any password, save it as .docx and upload it again."
            )
        if not head.startswith(b"PK\x03\x04"):
            raise ParseError(_not_format("a Word document (.docx)", head, "Word"))
    else:
        description = _describe_magic(head)
        if description and not head.startswith(_TEXTUAL_MAGIC):
            raise ParseError(_not_text(description))
        _refuse_binary(_decode(head, partial=True))
    return kind


def parse_file(path: Path, filename: str, *, limits: ParseLimits = _DEFAULT_LIMITS) -> ParsedDocument:
    """filename is the user's original name (only its extension and stem are used, never as a path)."""
    stem, _ = _split_filename(filename)
    size = path.stat().st_size
    with path.open("rb") as stream:
        head = stream.read(_HEAD_BYTES)
    if not head.strip() and size <= len(head):
        raise ParseError(_EMPTY)
    kind = detect_kind(head, filename)
    try:
        document = _PARSERS[kind](path, stem, limits)
    except (ParseError, MemoryError):
        raise
    except Exception as exc:
        # Damaged files make the libraries fail in endless ways; the user only needs to know it failed.
        raise ParseError(
            f"We could not read this {_LABELS[kind]}; it may be damaged. Open it, save it again "
            "(or export it to a new file) and upload the new copy."
        ) from exc
    if not document.sections:
        raise ParseError(
            f"This {_LABELS[kind]} contains no text we can use. Check that you uploaded the right file."
        )
    if document.char_count > limits.max_chars:
        raise ParseError(_too_much_text(limits))
    return document


# Kinds whose parser follows the file's own structure (a PDF's object graph, filters and content
# streams), so a small hostile file can cost unbounded time and memory: a 10 KB PDF of nested
# deflate streams kept pypdf busy for two minutes and 1.3 GB. The other kinds are bounded by the
# size and zip checks below, so they stay in-process (a child costs about 0.3 s of imports).
ISOLATED_KINDS = frozenset({"pdf"})
_CHILD_MAIN = (
    "import importlib, json, sys; request = json.load(sys.stdin); sys.path[:] = request['sys_path']; "
    "importlib.import_module(request['module'])._parse_in_child(request)"
)
_STDERR_KEPT = 2000  # characters of a crashed child's stderr kept for the log


def parse_file_isolated(
    path: Path,
    filename: str,
    *,
    limits: ParseLimits = _DEFAULT_LIMITS,
    timeout_seconds: float = 300.0,
    memory_bytes: int = 1024 * 1024 * 1024,
) -> ParsedDocument:
    """parse_file, with the kinds in ISOLATED_KINDS read in a child process limited in wall-clock
    time, CPU time and address space: a hostile file costs at most that, never the caller's memory
    or the caller itself. Raises ParseTimeout when the time runs out."""
    with path.open("rb") as stream:
        head = stream.read(_HEAD_BYTES)
    try:
        kind = detect_kind(head, filename)
    except ParseError:
        kind = ""  # parse_file raises the same error
    if kind not in ISOLATED_KINDS:
        return parse_file(path, filename, limits=limits)
    request = {
        "module": __name__,
        "sys_path": sys.path,
        "path": str(path),
        "filename": filename,
        "limits": asdict(limits),
        "memory_bytes": memory_bytes,
        "cpu_seconds": math.ceil(timeout_seconds),
    }
    label = _LABELS[kind]
    too_slow = ParseTimeout(
        f"Reading this {label} took longer than {timeout_seconds:g} seconds, so it was stopped. It may be "
        "malformed or malicious, or just very large: split it into smaller files, or print it to a new "
        f"{label}, and upload that."
    )
    try:
        # -I: no user site-packages or PYTHON* variables; the parent's sys.path comes with the request.
        child = subprocess.run(
            [sys.executable, "-I", "-c", _CHILD_MAIN],
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=timeout_seconds,
            check=False,
        )
    except subprocess.TimeoutExpired:  # run() has killed and reaped the child
        raise too_slow from None
    if child.returncode == -signal.SIGXCPU:
        raise too_slow
    try:
        reply = json.loads(child.stdout) if child.returncode == 0 else {}
    except ValueError:
        reply = {}
    if "document" in reply:
        return ParsedDocument.from_dict(reply["document"])
    if "error" in reply:
        raise ParseError(reply["error"])
    if "memory" in reply:
        raise ParseError(
            f"Reading this {label} needed more than {memory_bytes // (1024 * 1024):,} MB of memory, so it was "
            "stopped. It may be malformed or malicious, or just very large: split it into smaller files "
            "and upload those."
        )
    stderr = child.stderr.decode("utf-8", "replace")[-_STDERR_KEPT:]
    raise ParseError(
        f"We could not read this {label}; it may be damaged. Open it, save it again "
        "(or export it to a new file) and upload the new copy."
    ) from ChildProcessError(f"parser exited with {child.returncode}: {stderr}")


def _parse_in_child(request: dict[str, Any]) -> None:
    """The child's side of parse_file_isolated: limit itself, parse, print one JSON reply."""
    import resource

    def lower(limit: int, value: int) -> None:
        _, hard = resource.getrlimit(limit)  # a container may have set a lower one already
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, hard))

    lower(resource.RLIMIT_AS, request["memory_bytes"])
    # The parent's timeout kills the child first; this ends it even if the parent dies before.
    lower(resource.RLIMIT_CPU, request["cpu_seconds"])
    # A broken PDF makes pypdf log a warning per object; nobody reads them here.
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    try:
        document = parse_file(
            Path(request["path"]), request["filename"], limits=ParseLimits(**request["limits"])
        )
        reply: dict[str, Any] = {"document": document.to_dict()}
    except ParseError as exc:
        reply = {"error": str(exc)}
    except MemoryError:
        reply = {"memory": True}
    sys.stdout.write(json.dumps(reply))


# --------------------------------------------------------------------------------------------
# Shared helpers: names, decoding, cleaning, section building
# --------------------------------------------------------------------------------------------


def _split_filename(filename: str) -> tuple[str, str]:
    """(stem, lower-case extension) of the last component; browsers may send Windows paths."""
    name = re.split(r"[\\/]", filename)[-1].strip().rstrip(".")
    stem, extension = posixpath.splitext(name)
    return stem.strip(), extension.lower()


def _kind_for_extension(extension: str) -> str:
    if extension in _KIND_BY_EXTENSION:
        return _KIND_BY_EXTENSION[extension]
    if extension == ".doc":
        raise ParseError(
            "Old Word files (.doc) are not supported. Open the file in Word, save it as .docx "
            "and upload it again."
        )
    if not extension:
        raise ParseError(
            f"This file has no extension, so we cannot tell its type. Please upload {_SUPPORTED_HINT}."
        )
    raise ParseError(f"Files of type “{extension}” are not supported. Please upload {_SUPPORTED_HINT}.")


def _describe_magic(head: bytes) -> str | None:
    for magic, description in _MAGIC:
        if head.startswith(magic):
            return description
    return None


def _not_format(expected: str, head: bytes, short: str) -> str:
    description = _describe_magic(head)
    if description:
        return (
            f"This file is not {expected}: it looks like {description}. "
            f"Please upload the original {short} file."
        )
    return (
        f"This file is not {expected}: its content does not match its extension. "
        f"It may be damaged or renamed; please upload the original {short} file."
    )


def _not_text(description: str = "binary data") -> str:
    return (
        f"This file is not text: it looks like {description}. Please upload {_SUPPORTED_HINT}, "
        "with the extension that matches its content."
    )


def _too_much_text(limits: ParseLimits) -> str:
    return (
        f"This file contains too much text (more than {limits.max_chars:,} characters). "
        "Please split it into smaller files and upload them separately."
    )


def _decode(data: bytes, *, partial: bool = False) -> str:
    """Decode text of unknown encoding; `partial` tolerates a multi-byte character cut at the end."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return codecs.getincrementaldecoder(encoding)("replace").decode(data, final=not partial)
    if b"\x00" in data:
        if _looks_like_bomless_utf16(data):
            raise ParseError(
                "This file is UTF-16 text without a byte-order mark, so its encoding cannot be told "
                "for sure. Save it as UTF-8 (in Notepad: Save As, Encoding: UTF-8) and upload it again."
            )
        raise ParseError(_not_text())
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=not partial)
    except UnicodeDecodeError as exc:
        _refuse_mixed_encodings(data, exc)
    matches = charset_normalizer.from_bytes(data)
    best = matches.best()
    if best is None:
        raise ParseError(_not_text())
    # Among the Latin code pages the guess is close to random on short texts (French cp1252 comes
    # out as Baltic cp1257), while Windows-1252 is by far the most common legacy encoding.
    western = next((match for match in matches if "cp1252" in match.could_be_from_charset), None)
    if western is not None and western.chaos <= best.chaos + _WESTERN_CHAOS_MARGIN:
        return str(western)
    return str(best)


_UTF8_MULTIBYTE = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")


def _refuse_mixed_encodings(data: bytes, exc: UnicodeDecodeError) -> None:
    """Refuse UTF-8 text with lines in another encoding: any single guess would garble one part.

    A legacy-encoded file (Windows-1252, Latin-1...) almost never holds valid UTF-8 sequences, while
    nearly every accented letter in it is an invalid one; a file with at least as many valid
    sequences as invalid bytes is UTF-8 with something else pasted in.
    """
    valid = len(_UTF8_MULTIBYTE.findall(data))
    invalid = data.decode("utf-8", "replace").count("\ufffd") - data.count("\ufffd".encode())
    if valid and valid >= invalid:
        line = data[: exc.start].count(b"\n") + 1
        raise ParseError(
            f"Line {line:,} of this file is not UTF-8 text, while the rest of it is: the file mixes text "
            "encodings, and reading it either way would garble part of it. Open it, save it as UTF-8 "
            "and upload it again."
        )


def _looks_like_bomless_utf16(data: bytes) -> bool:
    """Mostly-ASCII text in UTF-16 has a NUL in every other byte, and nowhere else."""
    sample = data[:4096]
    even, odd = sample[0::2], sample[1::2]
    for zeros, other in ((odd, even), (even, odd)):
        if len(zeros) >= 8 and zeros.count(0) >= 0.9 * len(zeros) and other.count(0) == 0:
            return True
    return False


def _refuse_binary(text: str) -> None:
    if "\x00" in text or len(_CONTROL_CHARS.findall(text)) > _MAX_CONTROL_SHARE * len(text):
        raise ParseError(_not_text())


def _read_bytes(path: Path, limits: ParseLimits) -> bytes:
    # No encoding spends fewer than one byte per character, nor more than four.
    if path.stat().st_size > 4 * limits.max_chars:
        raise ParseError(_too_much_text(limits))
    return path.read_bytes()


def _read_text(path: Path, limits: ParseLimits) -> str:
    text = _decode(_read_bytes(path, limits))
    _refuse_binary(text)
    if len(text) > limits.max_chars:
        raise ParseError(_too_much_text(limits))
    if not _clean(text):
        raise ParseError(_EMPTY)
    return text


def _clean(text: str, *, keep_layout: bool = False) -> str:
    """Normalise newlines, drop control/invisible characters, squeeze blank-line runs to one.

    Without keep_layout, runs of spaces collapse and lines are stripped. keep_layout only trims
    line ends, because indentation carries meaning in Markdown (code blocks, nested lists).
    """
    text = _INVISIBLE.sub("", _NEWLINES.sub("\n", text))
    if keep_layout:
        lines = [line.rstrip() for line in text.split("\n")]
    else:
        lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINE_RUNS.sub("\n\n", "\n".join(lines)).strip("\n")


def _one_line(text: str) -> str:
    return _ANY_WHITESPACE.sub(" ", _INVISIBLE.sub("", text)).strip()


def _first_line(text: str) -> str:
    for line in text.split("\n"):
        if line.strip():
            return _one_line(line)[:_TITLE_MAX_CHARS].strip()
    return ""


def _choose_title(sections: list[Section], stem: str, *preferred: str | None) -> str:
    """The first non-empty of: preferred candidates, first level-1 heading, any heading, first line, stem."""
    candidates = [*preferred]
    candidates.append(next((s.heading for s in sections if s.heading and s.level == 1), None))
    candidates.append(next((s.heading for s in sections if s.heading), None))
    candidates.append(next((_first_line(s.text) for s in sections if s.text.strip()), None))
    for candidate in candidates:
        if candidate and _one_line(candidate):
            return _one_line(candidate)[:_TITLE_MAX_CHARS].strip()
    return stem or "Untitled document"


class _SectionBuilder:
    """Collects headings and body blocks in reading order into sections with heading paths."""

    def __init__(self) -> None:
        self.sections: list[Section] = []
        self._open: list[tuple[int, str]] = []  # (level, heading) from the top down to the current one
        self._heading: str | None = None
        self._level = 0
        self._blocks: list[str] = []
        self._page: int | None = None

    def heading(self, text: str, level: int) -> None:
        text = _one_line(text)
        if not text:
            return
        self._flush()
        level = min(max(level, 1), 6)
        while self._open and self._open[-1][0] >= level:
            self._open.pop()
        self._open.append((level, text))
        self._heading, self._level = text, level

    def block(self, text: str) -> None:
        if text.strip():
            self._blocks.append(text)

    def new_page(self, page: int) -> None:
        # A section running onto the next page continues there without repeating its heading.
        self._flush()
        self._heading, self._level, self._page = None, 0, page

    def finish(self) -> list[Section]:
        self._flush()
        return self.sections

    def _flush(self) -> None:
        body = "\n\n".join(self._blocks)
        if self._heading is not None or body:
            path = [heading for _, heading in self._open]
            self.sections.append(Section(self._heading, self._level, path, body, self._page))
        self._heading, self._level, self._blocks = None, 0, []


# --------------------------------------------------------------------------------------------
# PDF
# --------------------------------------------------------------------------------------------


@dataclass
class _PdfLine:
    text: str
    size: float  # effective font size in points; 0 when unknown


_HEADING_SIZE_FACTOR = 1.15  # a line this much larger than the body font counts as a heading

# Titles that PDF producers fill in by themselves: placeholders and the source file's name.
_PLACEHOLDER_PDF_TITLE = re.compile(
    r"|(untitled|unknown|no title|document|title)[\s_-]*\d*"
    r"|microsoft (word|powerpoint|excel) - .*"
    r"|.*\.(docx?|pdf|pptx?|xlsx?|odt|rtf|indd|tex|dvi)",
    re.IGNORECASE,
)


def _parse_pdf(path: Path, stem: str, limits: ParseLimits) -> ParsedDocument:
    reader = _open_pdf(path)
    try:
        page_count = len(reader.pages)
    except LimitReachedError as exc:
        raise _pdf_over_limit(exc) from exc
    if page_count == 0:
        raise ParseError("This PDF has no pages; it may be damaged. Please upload the original document.")
    if page_count > limits.max_pdf_pages:
        raise ParseError(
            f"This PDF has {page_count:,} pages; the limit is {limits.max_pdf_pages:,}. "
            "Please split it into smaller files."
        )
    pages = _extract_pdf_lines(reader, limits)
    if not any(line.text.strip() for lines in pages for line in lines):
        raise ParseError(
            "This PDF has no text layer (it is probably a scan or made of images). Text recognition (OCR) is "
            "not supported yet: please upload a PDF with selectable text, or the original Word or text file."
        )
    sections = _pdf_sections(pages)
    title = _choose_title(sections, stem, _pdf_metadata_title(reader))
    return ParsedDocument("pdf", title, sections, page_count)


def _open_pdf(path: Path) -> PdfReader:
    try:
        reader = PdfReader(path, strict=False)
        locked = reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED
    except LimitReachedError as exc:
        raise _pdf_over_limit(exc) from exc
    except DependencyError as exc:
        raise ParseError(
            "This PDF is encrypted with a method we cannot open. Remove its protection "
            "(for example, print it to a new PDF) and upload it again."
        ) from exc
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        raise ParseError(
            "This PDF is damaged and could not be read. Open it, save or print it as a new PDF, "
            "and upload that copy."
        ) from exc
    if locked:
        raise ParseError(
            "This PDF is password-protected. Remove the password (open it and save or print it as a new PDF "
            "without protection) and upload it again."
        )
    return reader


def _pdf_over_limit(exc: LimitReachedError) -> ParseError:
    # pypdf caps what one stream may inflate to and how many entries a page tree or array may
    # hold; real documents stay far below, decompression bombs and page-tree loops do not.
    return ParseError(
        f"This PDF looks malformed or malicious ({exc}). It was not read. If it is a genuine document, "
        "print it to a new PDF (or export it again from the program that made it) and upload that copy."
    )


def _pdf_metadata_title(reader: PdfReader) -> str | None:
    try:
        metadata = reader.metadata
        title = _one_line(str(metadata.title)) if metadata and metadata.title else ""
    except (PyPdfError, ValueError, KeyError, TypeError):
        return None
    return None if _PLACEHOLDER_PDF_TITLE.fullmatch(title) else title


def _extract_pdf_lines(reader: PdfReader, limits: ParseLimits) -> list[list[_PdfLine]]:
    pages: list[list[_PdfLine]] = []
    failures = 0
    total_chars = 0
    for page in reader.pages:
        try:
            lines = _pdf_page_lines(page)
        except LimitReachedError as exc:
            # Not a damaged page but a hostile one: the next pages would only repeat the work.
            raise _pdf_over_limit(exc) from exc
        except MemoryError:
            raise
        except Exception:
            # One unreadable page (a broken font, a bad stream) should not cost the whole document.
            failures += 1
            lines = []
        total_chars += sum(len(line.text) for line in lines)
        if total_chars > limits.max_chars:
            raise ParseError(_too_much_text(limits))
        pages.append(lines)
    if failures == len(pages):
        raise ParseError(
            "This PDF is damaged and its text could not be read. Open it, save or print it as a new PDF, "
            "and upload that copy."
        )
    return pages


def _pdf_page_lines(page: PageObject) -> list[_PdfLine]:
    """The page's lines, each with the font size most of its characters are drawn in."""
    fragments: list[tuple[str, float]] = []

    def visit(text: str, cm: list[float], tm: list[float], _font: Any, font_size: float) -> None:
        if text:
            fragments.append((text, _effective_font_size(cm, tm, font_size)))

    plain = page.extract_text(visitor_text=visit)
    if _ANY_WHITESPACE.sub("", plain) != _ANY_WHITESPACE.sub("", "".join(text for text, _ in fragments)):
        # The visitor did not see the same text the extractor returned: keep the text, lose the sizes.
        fragments = [(plain, 0.0)]
    lines: list[_PdfLine] = []
    current: list[tuple[str, float]] = []
    for text, size in fragments:
        for index, piece in enumerate(text.split("\n")):
            if index:
                lines.append(_pdf_line(current))
                current = []
            current.append((piece, size))
    lines.append(_pdf_line(current))
    return [line for line in lines if line.text]


def _effective_font_size(cm: list[float], tm: list[float], font_size: float) -> float:
    # The rendered size is the font size scaled by the text and transformation matrices (vertical axis).
    c = tm[2] * cm[0] + tm[3] * cm[2]
    d = tm[2] * cm[1] + tm[3] * cm[3]
    scale = math.hypot(c, d) or 1.0
    return round(abs(font_size) * scale * 2) / 2


def _pdf_line(pieces: list[tuple[str, float]]) -> _PdfLine:
    weights: Counter[float] = Counter()
    for text, size in pieces:
        weights[size] += len(text.strip())
    text = _one_line("".join(text for text, _ in pieces))
    return _PdfLine(text, weights.most_common(1)[0][0] if text else 0.0)


def _pdf_sections(pages: list[list[_PdfLine]]) -> list[Section]:
    levels = _pdf_heading_levels(pages)
    builder = _SectionBuilder()
    for number, lines in enumerate(pages, start=1):
        builder.new_page(number)
        body: list[str] = []
        for level, text in _group_pdf_lines(lines, levels):
            if level:
                builder.block(_clean("\n".join(body)))
                body = []
                builder.heading(text, level)
            else:
                body.append(text)
        builder.block(_clean("\n".join(body)))
    return builder.finish()


def _pdf_heading_levels(pages: list[list[_PdfLine]]) -> dict[float, int]:
    """Map font sizes to heading levels: the most used size is body text, clearly larger ones headings."""
    weights: Counter[float] = Counter()
    for lines in pages:
        for line in lines:
            weights[line.size] += len(line.text)
    body_size = weights.most_common(1)[0][0] if weights else 0.0
    if body_size <= 0:
        return {}
    heading_sizes = {
        line.size
        for lines in pages
        for line in lines
        if line.size >= body_size * _HEADING_SIZE_FACTOR and _could_be_heading(line.text)
    }
    return {size: min(rank, 6) for rank, size in enumerate(sorted(heading_sizes, reverse=True), start=1)}


def _could_be_heading(text: str) -> bool:
    return len(text) <= _TITLE_MAX_CHARS and any(char.isalpha() for char in text)


def _group_pdf_lines(lines: list[_PdfLine], levels: dict[float, int]) -> Iterator[tuple[int, str]]:
    """Yield (level, text); consecutive heading lines of one size are one wrapped heading."""
    pending: tuple[int, str] | None = None
    for line in lines:
        level = levels.get(line.size, 0) if _could_be_heading(line.text) else 0
        if pending and level == pending[0]:
            pending = (level, f"{pending[1]} {line.text}")
            continue
        if pending:
            yield pending
            pending = None
        if level:
            pending = (level, line.text)
        else:
            yield 0, line.text
    if pending:
        yield pending


# --------------------------------------------------------------------------------------------
# DOCX
# --------------------------------------------------------------------------------------------

_ZIP_RATIO_MIN_BYTES = 1024 * 1024  # small members compress extremely well legitimately (empty XML parts)
_HEADING_STYLE = re.compile(r"heading ([1-9])", re.IGNORECASE)
# What zipfile raises on broken or exotic archives (encrypted members, unknown compression, bad streams).
_BAD_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
    EOFError,
)


def _parse_docx(path: Path, stem: str, limits: ParseLimits) -> ParsedDocument:
    _inspect_docx_package(path, limits)
    document = docx.Document(str(path))
    builder = _SectionBuilder()
    for item in document.iter_inner_content():
        if isinstance(item, Table):
            builder.block(_clean(_docx_table_text(item)))
        elif level := _docx_heading_level(item):
            builder.heading(item.text, level)
        else:
            builder.block(_clean(item.text))
    sections = builder.finish()
    title = _choose_title(sections, stem, document.core_properties.title)
    return ParsedDocument("docx", title, sections, None)


def _malformed_docx(reason: str) -> ParseError:
    return ParseError(
        f"This Word file looks malformed or malicious ({reason}). It was not opened. "
        "If it is a genuine document, open it in Word, save it again as .docx and upload the new copy."
    )


def _inspect_docx_package(path: Path, limits: ParseLimits) -> None:
    """Refuse zip bombs and XML entity tricks from the zip directory and XML prologs, before unpacking."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            _check_docx_members(members, limits)
            for member in members:
                if member.filename.endswith((".xml", ".rels")):
                    _check_xml_prolog(archive, member)
    except _BAD_ZIP_ERRORS as exc:
        raise _malformed_docx("it is not a valid Word package") from exc


def _check_docx_members(members: list[zipfile.ZipInfo], limits: ParseLimits) -> None:
    if len(members) > limits.max_zip_members:
        raise _malformed_docx(
            f"it has {len(members):,} parts, more than the {limits.max_zip_members:,} allowed"
        )
    if sum(member.file_size for member in members) > limits.max_unpacked_bytes:
        megabytes = limits.max_unpacked_bytes // (1024 * 1024)
        raise _malformed_docx(f"it would unpack to more than {megabytes:,} MB")
    for member in members:
        if member.file_size > _ZIP_RATIO_MIN_BYTES and member.file_size > limits.max_compression_ratio * max(
            member.compress_size, 1
        ):
            raise _malformed_docx(
                "one of its parts is compressed far more than real documents are, like a zip bomb"
            )
    if "word/document.xml" not in {member.filename for member in members}:
        raise ParseError(
            "This file is not a Word document: it has no document body. If it is an Excel or "
            "PowerPoint file, save its content as .docx, PDF or text and upload that instead."
        )


def _check_xml_prolog(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    with archive.open(member) as stream:
        try:
            # A DTD can only come before the root element, so the first start tag ends the check and
            # only the first chunk of each part is ever inflated.
            for _ in SafeElementTree.iterparse(stream, events=("start",), forbid_dtd=True):
                return
        except DefusedXmlException as exc:
            raise _malformed_docx(
                "it contains XML entity or DTD declarations, which Word never writes"
            ) from exc
        except XmlSyntaxError as exc:
            raise _malformed_docx("it contains broken XML") from exc


def _docx_heading_level(paragraph: Paragraph) -> int:
    name = paragraph.style.name if paragraph.style is not None and paragraph.style.name else ""
    if name == "Title":
        return 1
    match = _HEADING_STYLE.fullmatch(name)
    return min(int(match.group(1)), 6) if match else 0


def _docx_table_text(table: Table) -> str:
    rows: list[str] = []
    for row in table.rows:
        cells: list[str] = []
        previous = None
        for cell in row.cells:
            # python-docx repeats the same cell object for each grid column a merged cell spans.
            if cell is not previous:
                cells.append(_one_line(cell.text))
            previous = cell
        if any(cells):
            rows.append(" | ".join(cells))
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_HTML_DROP = (
    "script",
    "style",
    "noscript",
    "template",
    "nav",
    "footer",
    "header",
    "aside",
    "form",
    "iframe",
    "svg",
)
_HTML_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
# Elements that end the running paragraph before and after them.
_HTML_BLOCKS = frozenset(
    [
        "address",
        "article",
        "blockquote",
        "body",
        "caption",
        "dd",
        "details",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "hr",
        "li",
        "main",
        "ol",
        "p",
        "section",
        "summary",
        "ul",
    ]
)
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


def _parse_html(path: Path, stem: str, limits: ParseLimits) -> ParsedDocument:
    markup = _decode_html(_read_bytes(path, limits))
    _refuse_binary(markup)
    soup = BeautifulSoup(markup, "lxml")
    page_title = soup.title.get_text() if soup.title else None
    _drop_boilerplate(soup)
    builder = _SectionBuilder()
    for level, text, preformatted in _html_blocks(soup.body or soup):
        if level:
            builder.heading(text, level)
        else:
            builder.block(_clean(text, keep_layout=preformatted))
    sections = builder.finish()
    return ParsedDocument("html", _choose_title(sections, stem, page_title), sections, None)


def _decode_html(data: bytes) -> str:
    """Decode by BOM, then a declared <meta> charset, then the same guessing as plain text."""
    if not data.startswith(tuple(bom for bom, _ in _BOMS)):
        declared = _META_CHARSET.search(data[:4096])
        if declared:
            try:
                return data.decode(declared.group(1).decode("ascii"), errors="replace")
            except LookupError:
                pass  # an unknown charset name: fall back to guessing
    return _decode(data)


def _drop_boilerplate(soup: BeautifulSoup) -> None:
    for tag in soup.find_all(_HTML_DROP):
        if tag.decomposed:
            continue  # nested inside a tag dropped earlier in this loop
        # An <article>'s own <header> holds its title, unlike the site-wide one.
        if tag.name == "header" and tag.find_parent(["article", "main", "section"]):
            continue
        tag.decompose()
    for tag in soup.find_all(hidden=True):
        tag.decompose()


def _html_blocks(root: Tag) -> Iterator[tuple[int, str, bool]]:
    """Yield (heading level or 0, text, preformatted) in reading order.

    Walks with an explicit stack (a None entry marks the end of a block element) because
    pathological nesting would exhaust Python's recursion limit.
    """
    inline: list[str] = []
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if node is None or (isinstance(node, Tag) and node.name in _HTML_BLOCKS):
            if "".join(inline).strip():
                yield 0, "".join(inline), False
            inline = []
        if node is None:
            continue
        if isinstance(node, NavigableString):
            # Comments, doctypes and processing instructions are NavigableString subclasses too.
            if type(node) in (NavigableString, CData):
                inline.append(_ANY_WHITESPACE.sub(" ", str(node)))
        elif node.name in _HTML_HEADINGS:
            yield int(node.name[1]), node.get_text(), False
        elif node.name == "pre":
            yield 0, node.get_text(), True
        elif node.name == "table":
            yield 0, _html_table_text(node), False
        elif node.name == "br":
            inline.append("\n")
        else:
            if node.name in _HTML_BLOCKS:
                stack.append(None)
            stack.extend(reversed(node.contents))


def _html_table_text(table: Tag) -> str:
    rows: list[str] = []
    for row in table.find_all("tr"):
        if row.find_parent("table") is not table:
            continue  # a nested table's rows are already part of its cell's text
        cells = [_one_line(cell.get_text(" ")) for cell in row.find_all(["td", "th"], recursive=False)]
        if any(cells):
            rows.append(" | ".join(cells))
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n(?:---|\.\.\.)\n", re.DOTALL)
_FRONT_MATTER_TITLE = re.compile(r"^title:\s*(.+?)\s*$", re.MULTILINE)


def _parse_markdown(path: Path, stem: str, limits: ParseLimits) -> ParsedDocument:
    source = _clean(_read_text(path, limits), keep_layout=True) + "\n"
    front_title, source = _split_front_matter(source)
    lines = source.split("\n")
    builder = _SectionBuilder()
    cursor = 0
    tokens = MarkdownIt("commonmark").parse(source)
    for index, token in enumerate(tokens):
        # Only top-level headings: a "#" line inside a quote or list item belongs to that block.
        if token.type != "heading_open" or token.level != 0 or token.map is None:
            continue
        start, end = token.map
        builder.block(_clean("\n".join(lines[cursor:start]), keep_layout=True))
        builder.heading(_inline_text(tokens[index + 1]), int(token.tag[1]))
        cursor = end
    builder.block(_clean("\n".join(lines[cursor:]), keep_layout=True))
    sections = builder.finish()
    return ParsedDocument("markdown", _choose_title(sections, stem, front_title), sections, None)


def _split_front_matter(source: str) -> tuple[str | None, str]:
    """Strip YAML front matter, which CommonMark would otherwise read as a rule and a setext heading."""
    match = _FRONT_MATTER.match(source)
    if not match:
        return None, source
    title = _FRONT_MATTER_TITLE.search(match.group(1))
    return (title.group(1).strip("\"'") if title else None), source[match.end() :]


def _inline_text(inline: Token) -> str:
    parts: list[str] = []
    for child in inline.children or []:
        if child.type in ("text", "code_inline", "image"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# Plain text and CSV
# --------------------------------------------------------------------------------------------

# CSV rows are split into sections of this many rows (no headings) so that downstream chunking
# gets natural boundaries; every row repeats its column names, so each section stands alone.
_CSV_ROWS_PER_SECTION = 100
_CSV_DELIMITERS = ",;\t|"


def _parse_text(path: Path, stem: str, limits: ParseLimits) -> ParsedDocument:
    text = _clean(_read_text(path, limits))
    return ParsedDocument("text", _first_line(text) or stem, [Section(None, 0, [], text)], None)


def _parse_csv(path: Path, stem: str, limits: ParseLimits) -> ParsedDocument:
    text = _read_text(path, limits)
    rows = csv.reader(io.StringIO(text, newline=""), _sniff_dialect(text))
    try:
        lines = list(_csv_lines(rows))
    except csv.Error as exc:
        if "field limit" in str(exc):
            raise ParseError(
                f"A row of this CSV file is larger than {csv.field_size_limit():,} characters (at line "
                f"{rows.line_num:,}). Usually a quote left open swallows the rest of the file: check that "
                "row in a spreadsheet, save the file again as CSV and upload the new copy."
            ) from exc
        raise ParseError(
            f"This CSV file is malformed (line {rows.line_num:,}: {exc}). Check that it opens correctly "
            "in a spreadsheet, save it again as CSV and upload the new copy."
        ) from exc
    if not lines:
        raise ParseError("This CSV file has no data rows under its header row.")
    sections = [
        Section(None, 0, [], "\n".join(lines[start : start + _CSV_ROWS_PER_SECTION]))
        for start in range(0, len(lines), _CSV_ROWS_PER_SECTION)
    ]
    return ParsedDocument("csv", stem or "Untitled table", sections, None)


def _csv_lines(rows: Iterator[list[str]]) -> Iterator[str]:
    """Render each data row as "column: value; column: value", skipping empty cells."""
    header: list[str] | None = None
    for row in rows:
        cells = [_one_line(cell) for cell in row]
        if not any(cells):
            continue
        if header is None:
            header = [name or f"column {number}" for number, name in enumerate(cells, start=1)]
            continue
        pairs = [
            f"{header[number] if number < len(header) else f'column {number + 1}'}: {value}"
            for number, value in enumerate(cells)
            if value
        ]
        yield "; ".join(pairs)


# The Sniffer's quote regex is quadratic in the sample: 64 KB of `,"` took 27 s, 8 KB takes 0.4 s.
_CSV_SNIFF_CHARS = 8192


def _sniff_dialect(text: str) -> type[csv.Dialect]:
    # Sniff whole lines only: a row cut in the middle misleads the quote detection.
    sample = text[:_CSV_SNIFF_CHARS]
    if len(text) > len(sample) and "\n" in sample:
        sample = sample[: sample.rindex("\n")]
    try:
        return csv.Sniffer().sniff(sample, delimiters=_CSV_DELIMITERS)
    except csv.Error:
        return csv.excel


_PARSERS: dict[str, Callable[[Path, str, ParseLimits], ParsedDocument]] = {
    "pdf": _parse_pdf,
    "docx": _parse_docx,
    "html": _parse_html,
    "markdown": _parse_markdown,
    "text": _parse_text,
    "csv": _parse_csv,
}
