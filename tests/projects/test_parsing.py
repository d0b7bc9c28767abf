from __future__ import annotations

import ast
import json
import time
import zipfile
from pathlib import Path

import pytest

from projects import parsing
from projects.parsing import (
    SUPPORTED_EXTENSIONS,
    ParsedDocument,
    ParseError,
    ParseLimits,
    Section,
    detect_kind,
    parse_file,
)
from tests.projects import fixtures_docs as fx


def headings(document: ParsedDocument) -> list[tuple[str | None, int, list[str], int | None]]:
    return [(s.heading, s.level, s.path, s.page) for s in document.sections]


def refusal(path: Path, filename: str | None = None, **limits: int) -> str:
    with pytest.raises(ParseError) as info:
        parse_file(path, filename or path.name, limits=ParseLimits(**limits))
    return str(info.value)


# --- PDF ------------------------------------------------------------------------------------


def test_pdf_pages_headings_and_metadata_title(tmp_path: Path) -> None:
    document = parse_file(fx.make_pdf(tmp_path), "Field guide.pdf")

    assert document.kind == "pdf"
    assert document.title == fx.PDF_TITLE
    assert document.page_count == 2
    assert headings(document) == [
        ("Installation", 1, ["Installation"], 1),
        ("On Debian", 2, ["Installation", "On Debian"], 1),
        # The section runs onto page 2: same path, no repeated heading.
        (None, 0, ["Installation", "On Debian"], 2),
        ("Maintenance", 1, ["Maintenance"], 2),
    ]
    assert document.sections[0].text == (
        "Unpack the pump and check every part against the list.\nKeep the manual next to the machine."
    )
    assert document.sections[2].text == "Restart the service after the driver is installed."
    assert document.text.startswith("# Installation\n\nUnpack the pump")
    assert "\n\n## On Debian\n\n" in document.text


@pytest.mark.parametrize("metadata_title", [None, "Microsoft Word - guide.docx", "Untitled-1", "guide.pdf"])
def test_pdf_without_a_real_metadata_title_uses_first_heading(tmp_path: Path, metadata_title: str | None) -> None:
    document = parse_file(fx.make_pdf(tmp_path, title=metadata_title), "guide.pdf")
    assert document.title == "Installation"


def test_pdf_encrypted_with_empty_user_password_is_opened(tmp_path: Path) -> None:
    document = parse_file(fx.make_encrypted_pdf(tmp_path, user_password=""), "guide.pdf")
    assert document.page_count == 2
    assert "Clean the filter every month" in document.text


def test_password_protected_pdf_is_refused(tmp_path: Path) -> None:
    assert refusal(fx.make_encrypted_pdf(tmp_path)).startswith("This PDF is password-protected.")


def test_scanned_pdf_is_refused(tmp_path: Path) -> None:
    message = refusal(fx.make_image_only_pdf(tmp_path))
    assert "no text layer" in message
    assert "OCR" in message


def test_corrupt_pdf_is_refused_readably(tmp_path: Path) -> None:
    assert "damaged" in refusal(fx.make_corrupt_pdf(tmp_path))


def test_truncated_pdf_is_refused_readably(tmp_path: Path) -> None:
    path = fx.make_pdf(tmp_path)
    path.write_bytes(path.read_bytes()[:-200])
    assert "damaged" in refusal(path)


def test_pdf_over_page_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "long.pdf"
    path.write_bytes(fx.pdf_bytes_with_pages(5))
    assert "5 pages; the limit is 3" in refusal(path, max_pdf_pages=3)


def test_exe_renamed_pdf_is_refused(tmp_path: Path) -> None:
    assert refusal(fx.make_exe_renamed_pdf(tmp_path)).startswith(
        "This file is not a PDF: it looks like a Windows program."
    )


# --- DOCX -----------------------------------------------------------------------------------


def test_docx_headings_paragraphs_and_table(tmp_path: Path) -> None:
    document = parse_file(fx.make_docx(tmp_path), "guide.docx")

    assert document.kind == "docx"
    assert document.title == "Installation"
    assert document.page_count is None
    assert headings(document) == [
        (None, 0, [], None),
        ("Installation", 1, ["Installation"], None),
        ("On Debian", 2, ["Installation", "On Debian"], None),
        ("Maintenance", 1, ["Maintenance"], None),
    ]
    assert document.sections[0].text == "Read this first."
    assert document.sections[1].text == "Unpack the pump and check every part."
    assert document.sections[2].text == "Install the driver package.\n\nPart | Quantity\nFilter | 2"


def test_docx_title_comes_from_core_properties(tmp_path: Path) -> None:
    assert parse_file(fx.make_docx(tmp_path, core_title="Pump Manual"), "x.docx").title == "Pump Manual"


def test_zip_bomb_docx_is_refused_without_unpacking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = fx.make_zip_bomb_docx(tmp_path, unpacked_mb=300)
    assert path.stat().st_size < 2 * 1024 * 1024

    def no_inflating(*args: object, **kwargs: object) -> None:
        raise AssertionError("a zip member was opened")

    monkeypatch.setattr(zipfile.ZipFile, "open", no_inflating)
    started = time.perf_counter()
    message = refusal(path)
    assert time.perf_counter() - started < 0.5
    assert message.startswith("This Word file looks malformed or malicious (it would unpack to more than 200 MB).")
    assert "It was not opened." in message


def test_highly_compressed_docx_member_is_refused(tmp_path: Path) -> None:
    message = refusal(fx.make_zip_bomb_docx(tmp_path, unpacked_mb=20))
    assert "malformed or malicious" in message
    assert "zip bomb" in message


def test_docx_with_too_many_members_is_refused(tmp_path: Path) -> None:
    assert "more than the 2,000 allowed" in refusal(fx.make_many_members_docx(tmp_path))


def test_billion_laughs_docx_is_refused(tmp_path: Path) -> None:
    message = refusal(fx.make_billion_laughs_docx(tmp_path))
    assert message.startswith("This Word file looks malformed or malicious (it contains XML entity or DTD")


def test_docx_that_is_not_a_valid_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cut.docx"
    path.write_bytes(fx.make_docx(tmp_path).read_bytes()[:1000])
    assert "malformed or malicious (it is not a valid Word package)" in refusal(path)


def test_old_or_password_protected_word_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.docx"
    path.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504))
    assert "old-format (.doc) or password-protected" in refusal(path)


# --- HTML -----------------------------------------------------------------------------------


def test_html_sections_title_and_dropped_boilerplate(tmp_path: Path) -> None:
    document = parse_file(fx.make_html(tmp_path), "handbook.html")

    assert document.kind == "html"
    assert document.title == "Pump Handbook & FAQ"
    assert headings(document) == [
        (None, 0, [], None),
        ("Installation", 1, ["Installation"], None),
        ("On Debian", 2, ["Installation", "On Debian"], None),
        ("Maintenance", 1, ["Maintenance"], None),
    ]
    assert document.sections[1].text == "Unpack the pump carefully."
    assert document.sections[2].text == (
        "Install the driver.\n\nRestart the café service.\n\nsudo apt install pump-driver\n\nPart | Quantity\nFilter | 2"
    )
    assert document.sections[3].text == "Clean the filter\nevery month."
    for dropped in ("tracking", "color: red", "Site header", "Menu entry", "JavaScript", "Search the site",
                    "comment", "Copyright"):  # fmt: skip
        assert dropped not in document.text


def test_html_charset_from_meta_tag(tmp_path: Path) -> None:
    document = parse_file(fx.make_latin1_html(tmp_path), "legacy.htm")
    assert document.title == "Café menu"
    assert document.sections[0].text == "Crème brûlée – 5 €"


# --- Markdown -------------------------------------------------------------------------------


def test_markdown_atx_and_setext_headings_ignore_code_fences(tmp_path: Path) -> None:
    document = parse_file(fx.make_markdown(tmp_path), "guide.md")

    assert document.kind == "markdown"
    assert document.title == "Installation"
    assert headings(document) == [
        (None, 0, [], None),
        ("Installation", 1, ["Installation"], None),
        ("On Debian", 2, ["Installation", "On Debian"], None),
        ("Troubleshooting", 2, ["Installation", "Troubleshooting"], None),
        ("Pump is loud", 3, ["Installation", "Troubleshooting", "Pump is loud"], None),
        ("Maintenance", 1, ["Maintenance"], None),
    ]
    # The body keeps its Markdown, code indentation included.
    assert document.sections[1].text == (
        "Unpack the pump.\n\n```bash\n# not a heading: a shell comment in a fenced block\n"
        "    indented line kept as is\n```"
    )


def test_markdown_front_matter_gives_the_title(tmp_path: Path) -> None:
    path = tmp_path / "page.markdown"
    path.write_text("---\ntitle: 'Pump FAQ'\nauthor: Ops\n---\nIntro.\n\n# Question\n\nAnswer.\n", encoding="utf-8")
    document = parse_file(path, path.name)
    assert document.title == "Pump FAQ"
    assert headings(document) == [(None, 0, [], None), ("Question", 1, ["Question"], None)]
    assert document.sections[0].text == "Intro."


# --- Plain text and CSV ---------------------------------------------------------------------


def test_utf8_text_with_bom(tmp_path: Path) -> None:
    document = parse_file(fx.make_utf8_text(tmp_path), "notes.txt")

    assert document.kind == "text"
    assert document.title == "Pump maintenance notes"
    assert headings(document) == [(None, 0, [], None)]
    assert document.sections[0].text == (
        "Pump maintenance notes\n\n"
        "The pump must be cleaned every month. Use warm water.\nNever use solvents.\n\n"
        "Café owners: the espresso machine filter follows the same rules."
    )


def test_cp1252_text_is_decoded(tmp_path: Path) -> None:
    document = parse_file(fx.make_cp1252_text(tmp_path), "notes-fr.txt")
    assert document.title == "Notes de maintenance"
    assert document.sections[0].text == fx.LEGACY_TEXT.strip()


def test_utf16_text_is_decoded(tmp_path: Path) -> None:
    path = tmp_path / "unicode.txt"
    path.write_bytes("Größe\n\nÜbersicht der Pumpen".encode("utf-16"))
    assert parse_file(path, path.name).text == "Größe\n\nÜbersicht der Pumpen"


def test_control_characters_and_space_runs_are_cleaned(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_text("Pump alarm\x07 raised\r\n\r\n\r\n\r\nThe pump\u00a0\u00a0 has stopped\x1b.\n", encoding="utf-8")
    assert parse_file(path, path.name).text == "Pump alarm raised\n\nThe pump has stopped."


def test_long_first_line_title_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "long.txt"
    path.write_text("word " * 100, encoding="utf-8")
    assert len(parse_file(path, path.name).title) <= 120


def test_csv_rows_become_labelled_lines(tmp_path: Path) -> None:
    document = parse_file(fx.make_csv(tmp_path), "parts.csv")

    assert document.kind == "csv"
    assert document.title == "parts"
    assert headings(document) == [(None, 0, [], None)]
    assert document.sections[0].text == (
        "part: Filter 1; quantity: 1\npart: Valve 2; quantity: 2; note: spare\npart: Filter 3; quantity: 3"
    )


def test_csv_is_split_into_sections_of_100_rows(tmp_path: Path) -> None:
    document = parse_file(fx.make_csv(tmp_path, rows=250), "parts.csv")
    assert [len(s.text.split("\n")) for s in document.sections] == [100, 100, 50]


def test_csv_with_header_only_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("a,b,c\n", encoding="utf-8")
    assert "no data rows" in refusal(path)


# --- Bad input in general -------------------------------------------------------------------


@pytest.mark.parametrize(("name", "content"), [
    ("empty.txt", b""),
    ("blank.md", b"  \n\t\r\n  "),
    ("empty.pdf", b""),
    ("blank.docx", b"\n\n"),
    ("bom.txt", b"\xef\xbb\xbf \n"),
])  # fmt: skip
def test_empty_file_is_refused(tmp_path: Path, name: str, content: bytes) -> None:
    assert refusal(fx.make_empty_file(tmp_path, name=name, content=content)) == "The file is empty."


def test_binary_file_renamed_txt_is_refused(tmp_path: Path) -> None:
    assert refusal(fx.make_binary_txt(tmp_path)).startswith("This file is not text")


def test_pdf_renamed_csv_is_refused(tmp_path: Path) -> None:
    message = refusal(fx.make_pdf(tmp_path), "table.csv")
    assert message.startswith("This file is not text: it looks like a PDF document.")


@pytest.mark.parametrize(("filename", "expected"), [
    ("setup.exe", "Files of type “.exe” are not supported."),
    ("letter.doc", "Old Word files (.doc) are not supported."),
    ("README", "This file has no extension"),
])  # fmt: skip
def test_unsupported_extension_is_refused(tmp_path: Path, filename: str, expected: str) -> None:
    assert refusal(fx.make_utf8_text(tmp_path), filename).startswith(expected)


def test_text_over_the_character_limit_is_refused(tmp_path: Path) -> None:
    assert "too much text" in refusal(fx.make_utf8_text(tmp_path), max_chars=50)
    assert "too much text" in refusal(fx.make_pdf(tmp_path), max_chars=50)


def test_filename_is_never_used_as_a_path(tmp_path: Path) -> None:
    document = parse_file(fx.make_utf8_text(tmp_path), "../../etc/passwd.TXT")
    assert document.title == "Pump maintenance notes"


def test_title_falls_back_to_first_line_and_stem_of_a_windows_path(tmp_path: Path) -> None:
    path = tmp_path / "upload.bin"
    path.write_text("<html><body><script>x()</script><p>Only a paragraph.</p></body></html>", encoding="utf-8")
    assert parse_file(path, "C:\\Users\\me\\FAQ page.HTML").title == "Only a paragraph."
    assert parse_file(fx.make_csv(tmp_path), "C:\\Users\\me\\stock list.csv").title == "stock list"


def test_html_without_text_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "app.html"
    path.write_text("<html><body><script>render()</script></body></html>", encoding="utf-8")
    assert "contains no text we can use" in refusal(path)


# --- detect_kind ----------------------------------------------------------------------------


@pytest.mark.parametrize(("filename", "head", "kind"), [
    ("a.pdf", b"%PDF-1.7\n", "pdf"),
    ("a.PDF", b"\xef\xbb\xbf%PDF-1.4", "pdf"),
    ("a.docx", b"PK\x03\x04\x14\x00", "docx"),
    ("a.html", b"<!doctype html><p>hi", "html"),
    ("a.htm", b"<p>hi", "html"),
    ("a.md", b"# Title", "markdown"),
    ("a.markdown", b"Title\n===", "markdown"),
    ("a.txt", b"MZ is a region code, not a program", "text"),
    ("a.text", "caf\u00e9".encode()[:4], "text"),  # a character cut by the end of the head
    ("a.csv", b"a;b\n1;2", "csv"),
])  # fmt: skip
def test_detect_kind(filename: str, head: bytes, kind: str) -> None:
    assert detect_kind(head, filename) == kind


def test_supported_extensions_match_detect_kind() -> None:
    assert SUPPORTED_EXTENSIONS == {".pdf", ".docx", ".html", ".htm", ".md", ".markdown", ".txt", ".text", ".csv"}


@pytest.mark.parametrize(("filename", "head", "message"), [
    ("a.pdf", b"MZ\x90\x00", "This file is not a PDF: it looks like a Windows program."),
    ("a.pdf", b"PK\x03\x04", "This file is not a PDF: it looks like a ZIP archive"),
    ("a.pdf", b"hello", "This file is not a PDF: its content does not match its extension."),
    ("a.docx", b"%PDF-1.7", "This file is not a Word document (.docx): it looks like a PDF document."),
    ("a.txt", b"\x89PNG\r\n\x1a\n\x00\x00", "This file is not text: it looks like a PNG image."),
    ("a.md", b"abc\x00def", "This file is not text: it looks like binary data."),
    ("a.txt", b"", "The file is empty."),
])  # fmt: skip
def test_detect_kind_refuses_mismatched_content(filename: str, head: bytes, message: str) -> None:
    with pytest.raises(ParseError) as info:
        detect_kind(head, filename)
    assert str(info.value).startswith(message)


# --- Serialisation --------------------------------------------------------------------------


def test_to_dict_round_trips_through_json(tmp_path: Path) -> None:
    document = parse_file(fx.make_pdf(tmp_path), "guide.pdf")
    restored = ParsedDocument.from_dict(json.loads(json.dumps(document.to_dict())))
    assert restored == document
    assert restored.text == document.text
    assert restored.char_count == len(document.text) > 0


def test_from_dict_accepts_sections_without_page() -> None:
    data = {"kind": "text", "title": "T", "page_count": None,
            "sections": [{"heading": None, "level": 0, "path": [], "text": "Body"}]}  # fmt: skip
    assert ParsedDocument.from_dict(data).sections == [Section(None, 0, [], "Body", None)]


def test_module_imports_nothing_from_django_or_the_project() -> None:
    tree = ast.parse(Path(parsing.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.split(".")[0] in {"django", "projects", "slmstudio", "training"}}
