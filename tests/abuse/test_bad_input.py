"""Bad input (issue 9): each refused with a clear message, nothing stored, nothing lost.

Hostile files are built here, byte by byte (no downloads, nothing checked in): malicious PDFs,
zip bombs, polyglots, hostile names, broken encodings, giant rows, real pickle payloads and
malformed GGUF headers. Then a deterministic hypothesis pass fuzzes the parsers and importers.
A hang guard (SIGALRM) turns "never returns" into a failure; it is a bound, not a speed goal.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projects import pairformats
from projects import services as project_services
from projects.models import Document
from projects.parsing import (
    SUPPORTED_EXTENSIONS,
    ParsedDocument,
    ParseError,
    ParseTimeout,
    parse_file,
    parse_file_isolated,
)
from tests.projects import fixtures_docs as fx
from training.ml.base_models import (
    MalformedModelFile,
    ModelUnavailable,
    UnsafeModelFile,
    inspect_model,
    load_causal_lm,
    read_gguf_header,
    refuse_pickles,
)

ROOT = Path(__file__).resolve().parents[2]


class Hang(Exception):
    pass


@contextmanager
def hang_guard(seconds: float) -> Iterator[None]:
    """Fail instead of waiting forever: raises Hang in the main thread after `seconds`."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _upload(client, project, *files, scripted: bool = True):  # type: ignore[no-untyped-def]
    headers = {"HTTP_X_UPLOAD": "rows"} if scripted else {}
    return client.post(
        reverse("projects-documents-upload", args=[project.slug]), {"files": list(files)}, **headers
    )


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


# --- Malicious PDFs ---------------------------------------------------------------------------

FONT = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
HELLO = b"BT /F1 12 Tf 72 700 Td (Hello from the page) Tj ET"
PAGE = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >> /Contents %d 0 R >>"


def _pdf(objects: list[tuple[int, bytes]], *, trailer: bytes = b"") -> bytes:
    """A PDF from numbered object bodies, with a correct classic xref table (Root is object 1)."""
    out = bytearray(b"%PDF-1.7\n")
    offsets = {}
    for number, body in objects:
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    size = max(offsets) + 1
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for number in range(1, size):
        out += b"%010d 00000 n \n" % offsets[number] if number in offsets else b"0000000000 65535 f \n"
    out += b"trailer\n<< /Size %d /Root 1 0 R %s>>\nstartxref\n%d\n%%%%EOF\n" % (size, trailer, xref)
    return bytes(out)


def _stream(data: bytes, extra: bytes = b"") -> bytes:
    return b"<< /Length %d %s>>\nstream\n%s\nendstream" % (len(data), extra, data)


def _one_page_pdf(content: bytes, extra: bytes = b"") -> bytes:
    return _pdf(
        [
            (1, b"<< /Type /Catalog /Pages 2 0 R >>"),
            (2, b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>"),
            (3, PAGE % 4),
            (4, _stream(content, extra)),
            (5, FONT),
        ]
    )


def _deflate_bomb(megabytes: int, prefix: bytes = b"") -> bytes:
    """Spaces deflated twice: `megabytes` MB of content from a stream of a few hundred bytes."""
    packer = zlib.compressobj(9)
    chunk = b" " * (1024 * 1024)
    inner = (
        packer.compress(prefix) + b"".join(packer.compress(chunk) for _ in range(megabytes)) + packer.flush()
    )
    return zlib.compress(inner, 9)


TWICE_DEFLATED = b"/Filter [/FlateDecode /FlateDecode] "


def circular_prev_pdf() -> bytes:
    """Two xref sections whose trailers' /Prev point at each other."""
    body = _one_page_pdf(HELLO)
    first_xref = body.rindex(b"xref\n")
    out = bytearray(body[: body.rindex(b"trailer")])
    placeholder = b"trailer\n<< /Size 6 /Root 1 0 R /Prev %010d >>\n"
    at = len(out)
    out += placeholder % 0
    second_xref = len(out)
    out += b"xref\n0 0\ntrailer\n<< /Size 6 /Root 1 0 R /Prev %d >>\nstartxref\n%d\n%%%%EOF\n" % (
        first_xref,
        second_xref,
    )
    out[at : at + len(placeholder % 0)] = placeholder % second_xref
    return bytes(out)


def self_referencing_object_stream_pdf() -> bytes:
    """An xref stream saying the object stream 6 (holding the page's content) lives inside itself."""
    out = bytearray(b"%PDF-1.7\n")
    offsets = {}
    for number, body in (
        (1, b"<< /Type /Catalog /Pages 2 0 R >>"),
        (2, b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>"),
        (3, PAGE % 4),
    ):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    length = b"<< /Length %d >>" % len(HELLO)
    index = b"4 0 5 %d " % (len(length) + 1)
    offsets[6] = len(out)
    out += b"6 0 obj\n%s\nendobj\n" % _stream(
        index + length + b" " + FONT, b"/Type /ObjStm /N 2 /First %d /Extends 6 0 R " % len(index)
    )
    xref = len(out)
    rows = [struct.pack(">BIH", 0, 0, 65535)]
    for number in range(1, 8):
        if number in (4, 5, 6):  # 6 itself "compressed in" object stream 6
            rows.append(struct.pack(">BIH", 2, 6, 0 if number == 6 else number - 4))
        elif number == 7:
            rows.append(struct.pack(">BIH", 1, xref, 0))
        else:
            rows.append(struct.pack(">BIH", 1, offsets[number], 0))
    out += b"7 0 obj\n%s\nendobj\n" % _stream(b"".join(rows), b"/Type /XRef /Size 8 /W [1 4 2] /Root 1 0 R ")
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def inline_image_without_ei_pdf() -> bytes:
    return _one_page_pdf(HELLO + b"\nBI /W 100 /H 100 /BPC 8 /CS /G ID " + bytes(range(256)) * 200)


def huge_count_pdf() -> bytes:
    """One real page under a page tree that claims 2**31 - 1."""
    return _pdf(
        [
            (1, b"<< /Type /Catalog /Pages 2 0 R >>"),
            (2, b"<< /Type /Pages /Kids [3 0 R] /Count 2147483647 >>"),
            (3, PAGE % 4),
            (4, _stream(HELLO)),
            (5, FONT),
        ]
    )


def page_tree_of_a_billion_pdf() -> bytes:
    """Three levels of Kids arrays repeating one reference 1000 times: 10**9 pages from 19 KB."""
    kids = lambda number: b"[" + b" ".join([b"%d 0 R" % number] * 1000) + b"]"  # noqa: E731
    return _pdf(
        [
            (1, b"<< /Type /Catalog /Pages 2 0 R >>"),
            (2, b"<< /Type /Pages /Kids " + kids(6) + b" /Count 1000000000 >>"),
            (3, b"<< /Type /Page /Parent 7 0 R /Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>"),
            (4, _stream(HELLO)),
            (5, FONT),
            (6, b"<< /Type /Pages /Parent 2 0 R /Kids " + kids(7) + b" /Count 1000000 >>"),
            (7, b"<< /Type /Pages /Parent 6 0 R /Kids " + kids(3) + b" /Count 1000 >>"),
        ]
    )


def cyclic_page_tree_pdf() -> bytes:
    return _pdf(
        [
            (1, b"<< /Type /Catalog /Pages 2 0 R >>"),
            (2, b"<< /Type /Pages /Kids [2 0 R 3 0 R] /Count 1 >>"),
            (3, b"<< /Type /Pages /Parent 2 0 R /Kids [2 0 R 3 0 R] /Count 1 >>"),
        ]
    )


def many_pages_of_bombs_pdf(pages: int = 20, megabytes: int = 60) -> bytes:
    """10 KB; each page's content inflates to 60 MB, under pypdf's 75 MB cap. Read in-process,
    this file kept pypdf busy for two minutes and 1.3 GB."""
    objects = [
        (1, b"<< /Type /Catalog /Pages 2 0 R >>"),
        (
            2,
            b"<< /Type /Pages /Kids [%s] /Count %d >>"
            % (b" ".join(b"%d 0 R" % (10 + 2 * i) for i in range(pages)), pages),
        ),
        (5, FONT),
    ]
    for i in range(pages):
        objects.append((10 + 2 * i, PAGE % (11 + 2 * i)))
        objects.append((11 + 2 * i, _stream(_deflate_bomb(megabytes, prefix=b"%d " % i), TWICE_DEFLATED)))
    return _pdf(objects)


@pytest.mark.parametrize(
    "make, outcome",
    [
        (circular_prev_pdf, "Hello from the page"),
        (huge_count_pdf, "Hello from the page"),
        (self_referencing_object_stream_pdf, "This PDF is damaged and its text could not be read"),
        (inline_image_without_ei_pdf, "This PDF is damaged and its text could not be read"),
        (cyclic_page_tree_pdf, "We could not read this PDF; it may be damaged"),
        (page_tree_of_a_billion_pdf, "looks malformed or malicious (Maximum page tree entry limit reached"),
        (
            lambda: _one_page_pdf(_deflate_bomb(300), TWICE_DEFLATED),
            "looks malformed or malicious (Limit reached while decompressing",
        ),
    ],
    ids=[
        "circular-prev",
        "huge-count",
        "objstm-self",
        "inline-image-no-EI",
        "cyclic-kids",
        "billion-pages",
        "deflate-bomb",
    ],
)
def test_malicious_pdfs_are_read_or_refused_readably_in_bounded_time(
    tmp_path: Path, make, outcome: str
) -> None:
    path = tmp_path / "hostile.pdf"
    path.write_bytes(make())
    with hang_guard(60):
        try:
            document = parse_file_isolated(path, "hostile.pdf", timeout_seconds=30)
        except ParseError as exc:
            assert not isinstance(exc, ParseTimeout)
            assert outcome in str(exc)
        else:
            assert outcome in document.text and document.page_count == 1


def test_a_pdf_that_would_take_minutes_is_stopped_at_its_time_limit(tmp_path: Path) -> None:
    path = tmp_path / "slow.pdf"
    path.write_bytes(many_pages_of_bombs_pdf())
    with hang_guard(60), pytest.raises(ParseTimeout, match=r"took longer than 3 seconds, so it was stopped"):
        parse_file_isolated(path, "slow.pdf", timeout_seconds=3)


def test_a_pdf_that_needs_too_much_memory_is_stopped_at_its_memory_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.pdf"
    path.write_bytes(_one_page_pdf(_deflate_bomb(70), TWICE_DEFLATED))  # 70 MB: under pypdf's own cap
    with (
        hang_guard(60),
        pytest.raises(ParseError, match=r"needed more than 200 MB of memory, so it was stopped"),
    ):
        parse_file_isolated(path, "big.pdf", timeout_seconds=30, memory_bytes=200 * 1024 * 1024)


def test_the_child_parse_gives_the_same_document_as_in_process(tmp_path: Path) -> None:
    pdf = fx.make_pdf(tmp_path)
    assert parse_file_isolated(pdf, "guide.pdf").to_dict() == parse_file(pdf, "guide.pdf").to_dict()
    markdown = fx.make_markdown(tmp_path)  # not isolated: read in-process
    assert parse_file_isolated(markdown, "guide.md").to_dict() == parse_file(markdown, "guide.md").to_dict()


@pytest.mark.django_db
def test_a_slow_pdf_uploaded_is_handed_to_a_worker_then_failed_with_the_reason(
    owner_client, project, monkeypatch, django_capture_on_commit_callbacks
):  # type: ignore[no-untyped-def]
    # Shorter budgets than in production, so the test takes seconds rather than minutes.
    monkeypatch.setattr(project_services, "PARSE_INLINE_SECONDS", 1)
    monkeypatch.setattr(project_services, "PARSE_SECONDS", 2)
    upload = SimpleUploadedFile("slow.pdf", many_pages_of_bombs_pdf())
    with hang_guard(60), django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = _upload(owner_client, project, upload)
    assert response.status_code == 200
    document = project.documents.get()
    assert document.status == Document.Status.PENDING  # the request let go after its inline budget
    assert len(callbacks) == 1
    with hang_guard(60):
        callbacks[0]()  # the (eager) worker task
    document.refresh_from_db()
    assert document.status == Document.Status.FAILED
    assert "took longer than 2 seconds" in document.error
    assert document.file_path.exists()  # the upload itself is kept, with its error shown


# --- Office files, polyglots, names ----------------------------------------------------------


def _xlsx_bomb(megabytes: int = 120) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        archive.writestr("xl/workbook.xml", '<?xml version="1.0"?><workbook/>')
        with archive.open("xl/worksheets/sheet1.xml", "w", force_zip64=True) as member:
            chunk = b"\0" * (1024 * 1024)
            for _ in range(megabytes):
                member.write(chunk)
    return buffer.getvalue()


@pytest.mark.django_db
def test_an_xlsx_zip_bomb_is_refused_by_type_and_stores_nothing(owner_client, project, settings):  # type: ignore[no-untyped-def]
    response = _upload(owner_client, project, SimpleUploadedFile("budget.xlsx", _xlsx_bomb()))
    assert response.status_code == 400
    assert "budget.xlsx: this type of file is not supported" in response.content.decode()
    assert not project.documents.exists()
    assert _files_under(settings.DATA_DIR) == []


def test_an_xlsx_bomb_renamed_docx_is_refused_without_unpacking(tmp_path: Path) -> None:
    path = tmp_path / "budget.docx"
    path.write_bytes(_xlsx_bomb())
    tracemalloc.start()
    try:
        with pytest.raises(ParseError, match="compressed far more than real documents are, like a zip bomb"):
            parse_file(path, "budget.docx")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 1024 * 1024  # the 120 MB member was never inflated


@pytest.mark.parametrize(
    "name, data, message",
    [
        (
            "page.html",
            b"%PDF-1.4\n<html><body><p>Hi</p><script>alert(1)</script></body></html>",
            "it looks like a PDF document",
        ),
        (
            "notes.txt",
            b"GIF89a/*\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00*/=1;alert(1);/*\x21\xf9\x04\x01\x00\x00\x00\x00*/",
            "This file is not text: it looks like binary data",
        ),
    ],
    ids=["html-starting-with-pdf-magic", "gif-js-polyglot"],
)
def test_polyglots_are_refused_by_content(tmp_path: Path, name: str, data: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ParseError, match=message):
        parse_file(path, name)


def test_a_pdf_with_html_appended_is_read_as_the_pdf_alone(tmp_path: Path) -> None:
    clean = parse_file(fx.make_pdf(tmp_path), "guide.pdf")
    path = tmp_path / "polyglot.pdf"
    path.write_bytes(
        (tmp_path / "guide.pdf").read_bytes() + b"\n<html><script>alert(1)</script>Hi</html>\n" * 50
    )
    assert parse_file_isolated(path, "polyglot.pdf").to_dict() == clean.to_dict()


@pytest.mark.django_db
def test_a_textual_gif_js_polyglot_is_only_ever_shown_as_escaped_text(owner_client, project):  # type: ignore[no-untyped-def]
    payload = b"GIF89a=1;/*<script>alert(document.domain)</script>*/ plain words after it"
    _upload(owner_client, project, SimpleUploadedFile("notes.txt", payload))
    document = project.documents.get()
    assert document.status == Document.Status.PARSED and document.kind == "text"
    page = owner_client.get(document.get_absolute_url()).content.decode()
    assert "&lt;script&gt;alert(document.domain)&lt;/script&gt;" in page
    assert "<script>alert(document.domain)" not in page


@pytest.mark.django_db
@pytest.mark.parametrize(
    "name, shown",
    [
        ("a" * 296 + ".txt", "a" * 195 + "….txt"),
        ("NUL.txt", "NUL.txt"),
        ("COM1.md", "COM1.md"),
        ("..\\..\\..\\Windows\\System32\\CON.txt", "CON.txt"),
        ("\u202egnp.txt", "gnp.txt"),
    ],
    ids=["300-characters", "reserved-NUL", "reserved-COM1", "windows-traversal-to-CON", "rtl-override"],
)
def test_long_and_reserved_names_are_only_ever_displayed(
    owner_client, project, settings, name: str, shown: str
):  # type: ignore[no-untyped-def]
    _upload(owner_client, project, SimpleUploadedFile(name, b"# Notes\n\nHello there.\n"))
    document = project.documents.get()
    assert document.original_name == shown and len(document.original_name) <= 200
    assert [p.name for p in _files_under(settings.DATA_DIR)] == sorted(
        [str(document.uid), f"{document.uid}.parsed.json"]
    )


@pytest.mark.django_db
def test_a_reserved_name_without_extension_is_refused_and_stores_nothing(owner_client, project, settings):  # type: ignore[no-untyped-def]
    response = _upload(owner_client, project, SimpleUploadedFile("CON", b"hello"))
    assert (
        response.status_code == 400 and "CON: this type of file is not supported" in response.content.decode()
    )
    assert _files_under(settings.DATA_DIR) == []


# --- CSV, JSONL and encodings ----------------------------------------------------------------


def test_a_document_csv_with_a_giant_cell_names_the_limit_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text('name,notes\nfirst,short\nsecond,"' + "x" * 200_000 + '"\n')
    with pytest.raises(
        ParseError, match=r"A row of this CSV file is larger than 131,072 characters \(at line 3\)"
    ):
        parse_file(path, "table.csv")


def test_a_csv_built_to_make_the_sniffer_quadratic_is_read_in_bounded_time(tmp_path: Path) -> None:
    # 64 KB of `,"` took the csv Sniffer 27 s when it was given the first 64 KB to sniff.
    path = tmp_path / "table.csv"
    path.write_text(',"' * 32768)
    with hang_guard(10), suppress(ParseError):
        parse_file(path, "table.csv")


@pytest.mark.parametrize(
    "data, message",
    [
        (
            "Hello there, plain text\nsecond line\n".encode("utf-16-le"),
            "UTF-16 text without a byte-order mark",
        ),
        (
            "Première ligne: café\n".encode()
            + "Deuxième ligne: été\n".encode("latin-1")
            + "Troisième: naïve\n".encode(),
            "Line 2 of this file is not UTF-8 text, while the rest of it is",
        ),
    ],
    ids=["utf16-without-bom", "utf8-mixed-with-latin1"],
)
def test_documents_in_broken_encodings_are_refused_by_name(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(data)
    with pytest.raises(ParseError, match=message):
        parse_file(path, "notes.txt")


def test_a_document_in_one_legacy_encoding_is_still_read(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes("Café, crème brûlée — “à la carte” €5\n".encode("cp1252") * 3)
    assert parse_file(path, "notes.txt").text.startswith("Café, crème brûlée — “à la carte” €5")


@pytest.mark.parametrize(
    "data, message",
    [
        (
            '{"instruction": "Café?", "response": "Oui"}\n'.encode("latin-1"),
            "Line 1 is not UTF-8 text (byte 0xE9)",
        ),
        ('{"instruction": "Q", "response": "A"}\n'.encode("utf-16-le"), "The file is UTF-16 text"),
        (
            b'{"instruction": "Q1", "response": "caf\xc3\xa9"}\n{"instruction": "Q2", "response": "A2"}\n'
            b'{"instruction": "Q3", "response": "caf\xe9"}\n',
            "Line 3 is not UTF-8 text (byte 0xE9)",
        ),
    ],
    ids=["latin1", "utf16-without-bom", "mixed"],
)
@pytest.mark.django_db
def test_pairs_in_broken_encodings_are_refused_naming_the_line_and_nothing_is_stored(project, data, message):  # type: ignore[no-untyped-def]
    report = project_services.pairs_import(project=project, data=data, filename="pairs.jsonl")
    assert report.file_error is not None and message in report.file_error
    assert not project.pairs.exists()


@pytest.mark.django_db
def test_a_50_mb_jsonl_line_is_refused_without_being_parsed(project) -> None:  # type: ignore[no-untyped-def]
    giant = '{"instruction": [' + "1," * 26_214_399 + "1]}"  # 50 MB; json.loads would build 26M ints
    data = ('{"instruction": "Q", "response": "A"}\n' + giant + "\n").encode()
    tracemalloc.start()
    try:
        report = project_services.pairs_import(project=project, data=data, filename="pairs.jsonl")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.added == 1
    assert [(r.line, r.error) for r in report.rejected] == [
        (2, f"line is {len(giant):,} characters long; the limit is 1,000,000")
    ]
    assert peak < 4 * len(data)  # the bytes, their text and the split lines; no parse tree


def test_deeply_nested_json_is_a_rejected_row_not_a_crash() -> None:
    report = pairformats.read_pairs(
        b'{"instruction": "Q", "response": "A"}\n' + b"[" * 100_000 + b"\n", "p.jsonl"
    )
    assert [(r.line, r.error) for r in report.rejected] == [(2, "nested too deeply to be a pair")]
    array = pairformats.read_pairs(b"[" * 100_000, "p.json")
    assert array.file_error == "This JSON is nested too deeply to be a list of pairs."


def test_a_pairs_csv_with_a_giant_cell_names_the_limit_and_the_line() -> None:
    data = ('instruction,response\nQ,"' + "x" * 200_000 + '"\n').encode()
    assert pairformats.read_pairs(data, "pairs.csv").file_error == (
        "A row of the CSV file is larger than 131,072 characters (at line 2); usually a quote left open "
        "swallows the rest of the file. Check that row, save the file again and import it."
    )
    header_only = ("instruction," + "x" * 200_000 + "\n").encode()  # the delimiter probe reads it too
    assert (
        "larger than 131,072 characters (at line 1)"
        in pairformats.read_pairs(header_only, "p.csv").file_error
    )


# --- Uploads: fields and temporary files -----------------------------------------------------


@pytest.mark.django_db
def test_thousands_of_form_fields_get_a_400_and_store_nothing(owner_client, project, settings):  # type: ignore[no-untyped-def]
    fields = {f"field{i}": "x" for i in range(5000)}
    fields["files"] = SimpleUploadedFile("ok.md", b"# Fine\n\ntext")
    response = owner_client.post(reverse("projects-documents-upload", args=[project.slug]), fields)
    assert response.status_code == 400
    assert not project.documents.exists()
    assert _files_under(settings.DATA_DIR) == []


@pytest.mark.django_db
def test_a_refused_oversized_upload_leaves_no_temporary_file(owner_client, project, settings, tmp_path):  # type: ignore[no-untyped-def]
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path / "upload-tmp")
    Path(settings.FILE_UPLOAD_TEMP_DIR).mkdir()
    settings.MAX_UPLOAD_BYTES = 3 * 1024 * 1024
    big = SimpleUploadedFile("big.txt", b"word " * (1024 * 1024))  # 5 MB, streamed in chunks
    small = SimpleUploadedFile("small.md", b"# Small\n\nkept")
    response = _upload(owner_client, project, big, small)
    assert response.status_code == 200
    assert "big.txt is larger than the 3 MB limit" in response.content.decode()
    assert [d.original_name for d in project.documents.all()] == ["small.md"]
    assert os.listdir(settings.FILE_UPLOAD_TEMP_DIR) == []
    document = project.documents.get()
    assert {p.name for p in _files_under(settings.DATA_DIR)} == {
        str(document.uid),
        f"{document.uid}.parsed.json",
    }


# --- Pickles offered as models ---------------------------------------------------------------


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): the marker file proves the payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


@pytest.fixture
def payload(tmp_path: Path) -> tuple[bytes, Path]:
    marker = tmp_path / "PAYLOAD-RAN"
    data = pickle.dumps(_WritesMarker(marker))
    pickle.loads(data).close()  # the payload is live: unpickling it does write the marker
    assert marker.exists()
    marker.unlink()
    return data, marker


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "weights.ckpt", "model.pkl"])
def test_a_pickle_file_is_refused_by_every_in_process_entry_point(tmp_path: Path, payload, name: str) -> None:
    data, marker = payload
    checkpoint = tmp_path / name
    checkpoint.write_bytes(data)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    (folder / name).write_bytes(data)
    for call in (
        lambda: inspect_model(checkpoint),
        lambda: inspect_model(folder),
        lambda: refuse_pickles(folder),
        lambda: load_causal_lm(folder),
    ):
        with pytest.raises(UnsafeModelFile, match="pickle"):
            call()
    assert not marker.exists()


def test_a_pickle_beside_safetensors_is_never_loaded(tmp_path: Path, payload) -> None:
    from tests.tinymodels import make_tiny_llama

    data, marker = payload
    folder = make_tiny_llama(tmp_path / "tiny")
    (folder / "pytorch_model.bin").write_bytes(data)
    (folder / "training_args.bin").write_bytes(data)
    model, _ = load_causal_lm(folder)  # the safetensors weights
    assert model is not None and not marker.exists()


def _safetensors(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize(
    "config, weights, message",
    [
        (b"{not json", _safetensors(b"{}"), "model/config.json is not a valid JSON object"),
        (b"[1, 2]", _safetensors(b"{}"), "model/config.json is not a valid JSON object"),
        (b"{}", None, "model.safetensors is not a valid safetensors file (no header of that size)"),
        (b"{}", b"\x01\x02", "model.safetensors is not a valid safetensors file (no header of that size)"),
        (b"{}", _safetensors(b"[]"), "model.safetensors is not a valid JSON object"),
        (b"{}", _safetensors(b'{"w": {"shape": "huge"}}'), "('w' has no valid shape)"),
    ],
    ids=[
        "config-not-json",
        "config-a-list",
        "pickle-named-safetensors",
        "two-bytes",
        "header-a-list",
        "bad-shape",
    ],
)
@pytest.mark.django_db
def test_malformed_model_folders_are_refused_with_a_message(
    tmp_path: Path, payload, config, weights, message
) -> None:  # type: ignore[no-untyped-def]
    from django.core.exceptions import ValidationError

    from training.registry import base_model_register

    data, marker = payload
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes(config)
    (folder / "model.safetensors").write_bytes(data if weights is None else weights)
    with pytest.raises(MalformedModelFile) as refused:
        inspect_model(folder)
    assert message in str(refused.value)
    with pytest.raises(ValidationError, match=re.escape(message)):
        base_model_register(source=str(folder))
    assert not marker.exists()


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """`manage.py` as a real subprocess, on its own DATA_DIR and SQLite file, with a project."""
    home = tmp_path_factory.mktemp("cli")
    env = {k: v for k, v in os.environ.items() if k not in ("SLMSTUDIO_TEST_DATA_DIR", "DATABASE_URL")}
    env |= {"DATA_DIR": str(home / "data"), "HF_HUB_OFFLINE": "1"}

    def manage(*args: str) -> tuple[int, dict]:
        out = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = out.stdout.strip().splitlines()
        return out.returncode, (
            json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"stderr": out.stderr}
        )

    setup = (
        "from django.core.management import call_command; call_command('migrate', verbosity=0); "
        "from django.contrib.auth.models import User; from projects.services import project_create; "
        "project_create(name='Abuse', owner=User.objects.create_user('abuser'))"
    )
    assert manage("shell", "-c", setup)[0] == 0
    manage.db = home / "data" / "db.sqlite3"  # type: ignore[attr-defined]
    manage.home = home  # type: ignore[attr-defined]
    return manage


def _rows(db: Path, table: str) -> int:
    with sqlite3.connect(db) as connection:
        return connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_the_cli_refuses_pickles_as_base_models_and_teachers_and_the_payload_never_runs(cli, payload) -> None:  # type: ignore[no-untyped-def]
    data, marker = payload
    checkpoint = cli.home / "model.pt"
    checkpoint.write_bytes(data)
    folder = cli.home / "pickled"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(data)

    code, out = cli("basemodels", "--add", str(checkpoint))
    assert code == 1 and "model.pt is a PyTorch pickle file" in out["error"]
    code, out = cli("addteacher", "abuse", "Pickled", "--path", str(folder))
    assert code == 1 and "holds pickle weights (pytorch_model.bin) and no safetensors" in out["error"]
    code, out = cli("addteacher", "abuse", "Pickled file", "--path", str(checkpoint))
    assert code == 1 and "model.pt is a PyTorch pickle file" in out["error"]
    assert not marker.exists()
    assert _rows(cli.db, "training_basemodel") == 0 and _rows(cli.db, "training_teacher") == 0


# --- Malformed GGUF --------------------------------------------------------------------------

_STRING, _ARRAY, _UINT8, _UINT32, _F32 = 8, 9, 0, 4, 0


def _gguf_str(text: bytes, declared: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if declared is None else declared) + text


def _kv(key: bytes, value_type: int, value: bytes) -> bytes:
    return _gguf_str(key) + struct.pack("<I", value_type) + value


def _tensor(name: bytes, dims: tuple[int, ...], ggml_type: int = _F32, offset: int = 0) -> bytes:
    return _gguf_str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def gguf_file(
    *,
    version: int = 3,
    kvs: list[bytes] | None = None,
    tensors: list[bytes] | None = None,
    n_kv: int | None = None,
    n_tensors: int | None = None,
) -> bytes:
    """A GGUF written by hand: header, metadata, tensor table, padding to 32, one 32x3 f32 tensor."""
    kvs = [_kv(b"general.architecture", _STRING, _gguf_str(b"llama"))] if kvs is None else kvs
    tensors = [_tensor(b"token_embd.weight", (32, 3))] if tensors is None else tensors
    head = b"GGUF" + struct.pack(
        "<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % 32) + b"\0" * (32 * 3 * 4)


MALFORMED_GGUF = {
    "truncated": (
        gguf_file()[:-200],
        "the tensor 'token_embd.weight' (384 bytes at 0) ends past the end of the file",
    ),
    "truncated-header": (gguf_file()[:10], "the tensor count needs 8 bytes but only 2 are left"),
    "bad-magic": (b"GGML" + gguf_file()[4:], "it does not start with the GGUF signature"),
    "version-1": (gguf_file(version=1), "version 1 is not supported"),
    "big-endian": (gguf_file(version=3 << 24), "big-endian"),
    "n_kv-2**60": (gguf_file(n_kv=2**60), "it claims 1,152,921,504,606,846,976 metadata entries"),
    "n_tensors-2**60": (gguf_file(n_tensors=2**60), "it claims 1,152,921,504,606,846,976 tensors"),
    "string-2**62": (
        gguf_file(kvs=[_kv(b"general.name", _STRING, _gguf_str(b"tiny", declared=2**62))]),
        "the value of 'general.name' needs 4,611,686,018,427,387,904 bytes",
    ),
    "array-2**60": (
        gguf_file(
            kvs=[_kv(b"tokenizer.ggml.scores", _ARRAY, struct.pack("<IQ", _UINT8, 2**60) + b"\1" * 16)]
        ),
        "its arrays hold more than 4,000,000 items in all",
    ),
    "array-past-end": (
        gguf_file(kvs=[_kv(b"tokenizer.ggml.token_type", _ARRAY, struct.pack("<IQ", _UINT32, 1_000_000))]),
        "the items of 'tokenizer.ggml.token_type' needs 4,000,000 bytes",
    ),
    "strings-past-end": (
        gguf_file(kvs=[_kv(b"tokenizer.ggml.tokens", _ARRAY, struct.pack("<IQ", _STRING, 3_000_000))]),
        "'tokenizer.ggml.tokens' claims 3,000,000 strings",
    ),
    "nested-array": (
        gguf_file(kvs=[_kv(b"x", _ARRAY, struct.pack("<IQ", _ARRAY, 1) + struct.pack("<IQ", _UINT8, 0))]),
        "'x' is an array of the unsupported type 9",
    ),
    "unknown-value-type": (gguf_file(kvs=[_kv(b"x", 77, b"\0" * 8)]), "'x' has the unknown value type 77"),
    "duplicate-key": (
        gguf_file(kvs=[_kv(b"general.architecture", _STRING, _gguf_str(b"llama"))] * 2),
        "the metadata key 'general.architecture' appears twice",
    ),
    "key-not-utf8": (
        gguf_file(kvs=[_kv(b"\xff\xfe", _UINT32, b"\0" * 4)]),
        "metadata key 1 is not UTF-8 text",
    ),
    "giant-key": (
        gguf_file(kvs=[_gguf_str(b"k", declared=2**40)]),
        "metadata key 1 is 1,099,511,627,776 bytes long",
    ),
    "tensor-offset-past-end": (
        gguf_file(tensors=[_tensor(b"token_embd.weight", (32, 3), offset=2**40)]),
        "(384 bytes at 1,099,511,627,776) ends past the end of the file",
    ),
    "tensor-offset-misaligned": (
        gguf_file(tensors=[_tensor(b"token_embd.weight", (32, 3), offset=4)]),
        "starts at 4, not a multiple of 32",
    ),
    "tensor-absurd-shape": (
        gguf_file(tensors=[_tensor(b"token_embd.weight", (2**30, 2**30))]),
        "ends past the end of the file",
    ),
    "tensor-overflowing-shape": (
        gguf_file(tensors=[_tensor(b"token_embd.weight", (2**63, 2**63))]),
        "claims 85,070,591,730,234,615,865,843,651,857,942,052,864 elements",
    ),
    "tensor-5-dims": (
        gguf_file(tensors=[_tensor(b"t", (1, 1, 1, 1, 1))]),
        "has 5 dimensions (1 to 4 allowed)",
    ),
    "tensor-unknown-type": (
        gguf_file(tensors=[_tensor(b"t", (32, 3), ggml_type=999)]),
        "the unknown type 999",
    ),
    "tensor-twice": (gguf_file(tensors=[_tensor(b"t", (32, 3))] * 2), "the tensor 't' appears twice"),
    "bad-alignment": (
        gguf_file(kvs=[_kv(b"general.alignment", _UINT32, struct.pack("<I", 3))]),
        "its alignment 3 is not a power of two",
    ),
}


def test_the_hand_built_gguf_is_valid_for_us_and_for_gguf_py(tmp_path: Path) -> None:
    from gguf import GGUFReader

    path = tmp_path / "tiny.gguf"
    path.write_bytes(gguf_file())
    header = read_gguf_header(path)
    assert [(t.name, t.shape, t.n_elements) for t in header.tensors] == [("token_embd.weight", (32, 3), 96)]
    assert [(t.name, int(t.n_elements)) for t in GGUFReader(path).tensors] == [("token_embd.weight", 96)]
    assert inspect_model(path).parameters == 96


@pytest.mark.parametrize("case", sorted(MALFORMED_GGUF))
def test_malformed_gguf_is_refused_with_a_message_naming_the_problem(tmp_path: Path, case: str) -> None:
    data, message = MALFORMED_GGUF[case]
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    with hang_guard(10):
        for call in (lambda: read_gguf_header(path), lambda: inspect_model(path)):
            with pytest.raises(MalformedModelFile) as refused:
                call()
            assert message in str(refused.value)
            assert str(refused.value).startswith("model.gguf is not a valid GGUF file: ")


def test_the_chat_engine_and_gguf_teacher_refuse_a_hostile_header_before_llama_cpp(tmp_path: Path) -> None:
    from inference.engines.llama import LlamaEngine
    from training.ml.teachers import GGUFTeacher, TeacherError

    path = tmp_path / "model.gguf"
    path.write_bytes(MALFORMED_GGUF["array-2**60"][0])
    with pytest.raises(MalformedModelFile, match="its arrays hold more than"):
        LlamaEngine(path)
    with pytest.raises(TeacherError, match="its arrays hold more than"):
        GGUFTeacher(path)


def test_the_cli_refuses_malformed_gguf_as_base_model_and_teacher(cli) -> None:  # type: ignore[no-untyped-def]
    # Before the header check: gguf's reader looped forever on the first file, crashed with an
    # IndexError traceback on the second, and registered the third as a model.
    for case, command in (
        ("array-2**60", ["basemodels", "--add"]),
        ("n_kv-2**60", ["basemodels", "--add"]),
        ("string-2**62", ["addteacher", "abuse", "Hostile", "--path"]),
    ):
        data, message = MALFORMED_GGUF[case]
        path = cli.home / "model.gguf"
        path.write_bytes(data)
        code, out = cli(*command, str(path))
        assert code == 1, out
        assert (
            message in out["error"] and "It may be damaged or malicious; it was not loaded." in out["error"]
        )
    assert _rows(cli.db, "training_basemodel") == 0 and _rows(cli.db, "training_teacher") == 0


# --- Fuzzing ---------------------------------------------------------------------------------

FUZZ = settings(
    derandomize=True,  # the same examples on every run and machine
    database=None,
    deadline=None,  # hang_guard bounds each example instead: hypothesis' deadline never interrupts
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Small valid files of each kind, to be mutated."""
    folder = tmp_path_factory.mktemp("samples")
    return {
        ".pdf": fx.make_pdf(folder).read_bytes(),
        ".docx": fx.make_docx(folder).read_bytes(),
        ".html": fx.make_html(folder).read_bytes(),
        ".csv": fx.make_csv(folder).read_bytes(),
        ".md": fx.make_markdown(folder).read_bytes(),
        ".txt": fx.make_cp1252_text(folder).read_bytes(),
    }


def _parse_fuzzed(folder: Path, data: bytes, extension: str) -> None:
    path = folder / "fuzzed"
    path.write_bytes(data)
    with hang_guard(20):
        try:
            document = parse_file(path, "upload" + extension)
        except ParseError as exc:
            assert str(exc).strip()  # a message for the user, never an empty one
        else:
            assert isinstance(document, ParsedDocument) and document.sections


@st.composite
def mutations(draw: st.DrawFn, original: bytes) -> bytes:
    """Flip bits, truncate, insert and delete bytes of a valid file."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 6))):
        operation = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if operation == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif operation == "truncate":
            del data[at:]
        elif operation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:
            del data[at : at + draw(st.integers(1, 512))]
    return bytes(data)


@settings(FUZZ, max_examples=1000)
@given(data=st.binary(max_size=4096), extension=st.sampled_from(sorted(SUPPORTED_EXTENSIONS)))
def test_fuzz_parse_file_with_arbitrary_bytes(tmp_path: Path, data: bytes, extension: str) -> None:
    _parse_fuzzed(tmp_path, data, extension)


@settings(FUZZ, max_examples=1500)
@given(choice=st.data())
def test_fuzz_parse_file_with_mutated_real_files(tmp_path: Path, samples: dict[str, bytes], choice) -> None:  # type: ignore[no-untyped-def]
    extension = choice.draw(st.sampled_from(sorted(samples)))
    _parse_fuzzed(tmp_path, choice.draw(mutations(samples[extension])), extension)


_TEXT_EXTENSIONS = sorted(SUPPORTED_EXTENSIONS - {".pdf", ".docx"})


@settings(FUZZ, max_examples=800)
@given(text=st.text(max_size=3000), extension=st.sampled_from(_TEXT_EXTENSIONS))
def test_fuzz_parse_file_with_arbitrary_text(tmp_path: Path, text: str, extension: str) -> None:
    _parse_fuzzed(tmp_path, text.encode("utf-8", "surrogatepass"), extension)


_PAIR_NAMES = ["pairs.jsonl", "pairs.ndjson", "pairs.json", "pairs.csv", "pairs.tsv", "pairs.txt", "pairs"]


def _import_fuzzed(data: bytes, name: str) -> None:
    with hang_guard(20):
        report = pairformats.read_pairs(data, name)
    assert isinstance(report, pairformats.PairImport)
    if report.file_error is not None:
        assert report.file_error.strip() and not report.pairs and not report.rejected
    for row in report.rejected:
        assert row.line >= 1 and row.error.strip()


@settings(FUZZ, max_examples=1000)
@given(data=st.binary(max_size=4096), name=st.sampled_from(_PAIR_NAMES))
def test_fuzz_pair_import_with_arbitrary_bytes(data: bytes, name: str) -> None:
    _import_fuzzed(data, name)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "instruction",
                    "prompt",
                    "input",
                    "response",
                    "answer",
                    "messages",
                    "role",
                    "content",
                    "from",
                    "value",
                ]
            )
            | st.text(max_size=8),
            inner,
            max_size=4,
        )
    ),
    max_leaves=16,
)


@settings(FUZZ, max_examples=800)
@given(records=st.lists(_json_values, max_size=6), name=st.sampled_from(_PAIR_NAMES))
def test_fuzz_pair_import_with_json_shaped_records(records: list, name: str) -> None:
    if name == "pairs.json":
        text = json.dumps(records)
    else:
        text = "\n".join(json.dumps(record) for record in records)
    _import_fuzzed(text.encode(), name)


# Pieces of CSV and JSON syntax, and long runs of one piece: giant cells, deep nesting, quotes
# that never close.
_pieces = st.sampled_from(
    list(',;\t"\n\r \\{}[]:') + ["instruction", "response", "prompt", "é", "\x85", "\u2028", "\x00"]
) | st.tuples(st.sampled_from(["[", '{"a":', '"', "x", ",", "\n"]), st.integers(1, 200_000)).map(
    lambda piece: piece[0] * piece[1]
)


@settings(FUZZ, max_examples=600)
@given(text=st.lists(_pieces, max_size=40).map("".join), name=st.sampled_from(_PAIR_NAMES))
def test_fuzz_pair_import_with_csv_and_json_syntax(text: str, name: str) -> None:
    _import_fuzzed(text.encode("utf-8", "surrogatepass"), name)


@settings(FUZZ, max_examples=150)
@given(text=st.lists(_pieces, max_size=40).map("".join), extension=st.sampled_from([".csv", ".txt", ".md"]))
def test_fuzz_document_csv_and_text_with_syntax_runs(tmp_path: Path, text: str, extension: str) -> None:
    _parse_fuzzed(tmp_path, text.encode("utf-8", "surrogatepass"), extension)


@settings(FUZZ, max_examples=1000)
@given(choice=st.data())
def test_fuzz_gguf_header_with_mutated_files(tmp_path: Path, choice) -> None:  # type: ignore[no-untyped-def]
    """Mutated GGUFs are refused with MalformedModelFile, or pass and then also open in gguf-py."""
    from gguf import GGUFReader

    original = gguf_file(
        kvs=[
            _kv(b"general.architecture", _STRING, _gguf_str(b"llama")),
            _kv(
                b"tokenizer.ggml.tokens",
                _ARRAY,
                struct.pack("<IQ", _STRING, 3) + b"".join(map(_gguf_str, (b"a", b"b", b"c"))),
            ),
            _kv(b"llama.block_count", _UINT32, struct.pack("<I", 1)),
        ]
    )
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(choice.draw(mutations(original)))
    with hang_guard(20):
        try:
            read_gguf_header(path)
        except ModelUnavailable as exc:
            assert isinstance(exc, MalformedModelFile) and str(exc).startswith(
                "fuzzed.gguf is not a valid GGUF"
            )
        else:
            GGUFReader(path)  # what passed the check is safe to hand on


@pytest.mark.django_db
def test_a_slow_parse_on_a_live_worker_is_not_taken_over_before_its_time_limit(project, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from django.utils import timezone

    with fx.make_markdown(tmp_path).open("rb") as fh:
        document = project_services.document_add(
            project=project, stream=fh, name="guide.md", size=None
        ).document
    running = {"status": Document.Status.PARSING, "parsing_by": "another-host:1234"}
    stale = timedelta(seconds=60)
    Document.objects.filter(pk=document.pk).update(
        **running, parse_started_at=timezone.now() - timedelta(minutes=2)
    )
    assert project_services.documents_reset_stale(documents=project.documents.all(), stale_after=stale) == 0
    past_limit = timedelta(seconds=project_services.PARSE_SECONDS + 61)
    Document.objects.filter(pk=document.pk).update(**running, parse_started_at=timezone.now() - past_limit)
    assert project_services.documents_reset_stale(documents=project.documents.all(), stale_after=stale) == 1
