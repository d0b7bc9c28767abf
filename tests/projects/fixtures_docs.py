"""Generate small, real documents for the parsing tests.

Each helper writes one file under the given directory and returns its path. Files are built in
code (never checked in) so that the tests exercise the real libraries end to end.
"""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path

import docx
from pypdf import PdfReader, PdfWriter
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen import canvas

PDF_TITLE = "Field Guide to Pumps"

# Per page: (font size, text). Sizes above the 11 pt body size are headings.
PDF_LINES: list[list[tuple[int, str]]] = [
    [
        (20, "Installation"),
        (11, "Unpack the pump and check every part against the list."),
        (11, "Keep the manual next to the machine."),
        (15, "On Debian"),
        (11, "Install the driver package before connecting the pump."),
    ],
    [
        (11, "Restart the service after the driver is installed."),
        (20, "Maintenance"),
        (11, "Clean the filter every month with warm water."),
    ],
]


def make_pdf(directory: Path, *, title: str | None = PDF_TITLE, name: str = "guide.pdf") -> Path:
    path = directory / name
    pdf = canvas.Canvas(str(path), pagesize=A4)
    if title:
        pdf.setTitle(title)
    for page_lines in PDF_LINES:
        y = 780.0
        for size, line in page_lines:
            pdf.setFont("Helvetica-Bold" if size > 11 else "Helvetica", size)
            pdf.drawString(72, y, line)
            y -= size * 2
        pdf.showPage()
    pdf.save()
    return path


def make_encrypted_pdf(directory: Path, *, user_password: str = "secret") -> Path:
    """An RC4-encrypted copy of make_pdf (RC4 needs no extra crypto dependency in pypdf)."""
    source = make_pdf(directory, name="plain-source.pdf")
    writer = PdfWriter(clone_from=PdfReader(source))
    writer.encrypt(user_password, owner_password="owner-only", algorithm="RC4-128")
    path = directory / ("locked.pdf" if user_password else "owner-locked.pdf")
    with path.open("wb") as out:
        writer.write(out)
    return path


def make_image_only_pdf(directory: Path) -> Path:
    """A PDF whose pages carry only drawings, like a scan: no text layer."""
    path = directory / "scan.pdf"
    pdf = canvas.Canvas(str(path), pagesize=A4)
    for _ in range(2):
        pdf.rect(72, 500, 300, 200, fill=1)
        pdf.showPage()
    pdf.save()
    return path


def make_corrupt_pdf(directory: Path) -> Path:
    path = directory / "broken.pdf"
    path.write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >>\n" + bytes(range(256)) * 4)
    return path


def make_docx(directory: Path, *, core_title: str = "") -> Path:
    document = docx.Document()
    document.core_properties.title = core_title
    document.add_paragraph("Read this first.")
    document.add_heading("Installation", level=1)
    document.add_paragraph("Unpack the   pump and check every part.")
    document.add_heading("On Debian", level=2)
    document.add_paragraph("Install the driver package.")
    table = document.add_table(rows=2, cols=2)
    for row, values in zip(table.rows, [("Part", "Quantity"), ("Filter", "2")], strict=False):
        for cell, value in zip(row.cells, values, strict=False):
            cell.text = value
    document.add_heading("Maintenance", level=1)
    document.add_paragraph("Clean the filter every month.")
    path = directory / "guide.docx"
    document.save(str(path))
    return path


def _rewrite_docx(source: Path, target: Path, replace: dict[str, bytes]) -> Path:
    """Copy a DOCX, swapping the bytes of some members, so the result is otherwise a valid Word file."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            zout.writestr(item.filename, replace.get(item.filename, zin.read(item.filename)))
    return target


def make_zip_bomb_docx(directory: Path, *, unpacked_mb: int = 300) -> Path:
    """A DOCX whose document.xml inflates to `unpacked_mb` MB of spaces (a few hundred KB on disk).

    The member is streamed in so the test never holds the inflated bytes in memory.
    """
    source = make_docx(directory)
    target = directory / "bomb.docx"
    chunk = b" " * (1024 * 1024)
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if item.filename != "word/document.xml":
                zout.writestr(item.filename, zin.read(item.filename))
                continue
            original = zin.read(item.filename)
            info = zipfile.ZipInfo(item.filename)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zout.open(info, "w", force_zip64=True) as member:
                member.write(original)
                for _ in range(unpacked_mb):
                    member.write(chunk)
    return target


def make_many_members_docx(directory: Path, *, members: int = 2100) -> Path:
    source = make_docx(directory)
    target = directory / "crowded.docx"
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            zout.writestr(item.filename, zin.read(item.filename))
        for index in range(members):
            zout.writestr(f"extra/item{index}.xml", b"<a/>")
    return target


BILLION_LAUGHS = b"""<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<!DOCTYPE lolz [
  <!ENTITY lol "lol">
  <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
  <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
  <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
  <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
  <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
  <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">
<w:body><w:p><w:r><w:t>&lol9;</w:t></w:r></w:p></w:body></w:document>
"""


def make_billion_laughs_docx(directory: Path) -> Path:
    source = make_docx(directory)
    return _rewrite_docx(source, directory / "laughs.docx", {"word/document.xml": BILLION_LAUGHS})


HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Pump Handbook &amp; FAQ</title>
  <style>body { color: red; }</style>
  <script>var tracking = "do not index me";</script>
</head>
<body>
  <header><a href="/">Site header link</a></header>
  <nav><ul><li>Menu entry</li></ul></nav>
  <p>Welcome to the handbook.</p>
  <h1>Installation</h1>
  <p>Unpack the
     pump carefully.</p>
  <h2>On Debian</h2>
  <ul><li>Install the driver.</li><li>Restart the café service.</li></ul>
  <pre>sudo apt install pump-driver</pre>
  <table><tr><th>Part</th><th>Quantity</th></tr><tr><td>Filter</td><td>2</td></tr></table>
  <noscript>Enable JavaScript</noscript>
  <form><label>Search the site</label></form>
  <!-- a comment that must not appear -->
  <h1>Maintenance</h1>
  <p>Clean the filter<br>every month.</p>
  <footer>Copyright footer</footer>
</body>
</html>
"""


def make_html(directory: Path) -> Path:
    path = directory / "handbook.html"
    path.write_text(HTML_PAGE, encoding="utf-8")
    return path


def make_latin1_html(directory: Path) -> Path:
    """Declared charset only in a meta tag, bytes in cp1252."""
    path = directory / "legacy.htm"
    page = '<html><head><meta http-equiv="Content-Type" content="text/html; charset=windows-1252">'
    page += "</head><body><h1>Café menu</h1><p>Crème brûlée – 5 €</p></body></html>"
    path.write_bytes(page.encode("cp1252"))
    return path


MARKDOWN = """Intro line before any heading.

# Installation

Unpack the pump.

```bash
# not a heading: a shell comment in a fenced block
    indented line kept as is
```

On Debian
---------

Install the driver.

## Troubleshooting

### Pump is loud

Check the filter.

# Maintenance

Clean the filter.
"""


def make_markdown(directory: Path) -> Path:
    path = directory / "guide.md"
    path.write_text(MARKDOWN, encoding="utf-8")
    return path


PLAIN_TEXT = """Pump maintenance notes

The pump must be cleaned every month.   Use warm water.
Never use solvents.


Café owners: the espresso machine filter follows the same rules.
"""


def make_utf8_text(directory: Path) -> Path:
    path = directory / "notes.txt"
    path.write_bytes("\ufeff".encode() + PLAIN_TEXT.encode("utf-8"))
    return path


LEGACY_TEXT = (
    "Notes de maintenance\n\n"
    "La pompe doit être nettoyée chaque mois à l'eau tiède. "
    "N'utilisez jamais de solvants. Les propriétaires de café français "
    "appliquent les mêmes règles à la machine à expresso : déjà vérifiée, "
    "elle reste fiable été comme hiver – coût : 5 €.\n"
)


def make_cp1252_text(directory: Path) -> Path:
    path = directory / "notes-fr.txt"
    path.write_bytes(LEGACY_TEXT.encode("cp1252"))
    return path


def make_csv(directory: Path, *, rows: int = 3) -> Path:
    path = directory / "parts.csv"
    lines = ["part;quantity;note"]
    lines += [f"Filter {i};{i};" if i % 2 else f"Valve {i};{i};spare" for i in range(1, rows + 1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_exe_renamed_pdf(directory: Path) -> Path:
    path = directory / "invoice.pdf"
    path.write_bytes(b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff" + bytes(512))
    return path


def make_empty_file(directory: Path, *, name: str = "empty.txt", content: bytes = b"") -> Path:
    path = directory / name
    path.write_bytes(content)
    return path


def make_binary_txt(directory: Path) -> Path:
    path = directory / "data.txt"
    path.write_bytes(random.Random(7).randbytes(4096))
    return path


def pdf_bytes_with_pages(pages: int) -> bytes:
    """A minimal text-less PDF with many pages, for the page limit."""
    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(width=200, height=200)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()
