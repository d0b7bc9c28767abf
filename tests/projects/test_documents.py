from __future__ import annotations

from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from projects.models import Document
from projects.services import document_add, document_parse
from tests.projects import fixtures_docs as fx

pytestmark = pytest.mark.django_db


def _upload(client, project, *paths_or_files, scripted: bool = False):  # type: ignore[no-untyped-def]
    files = [
        f if isinstance(f, SimpleUploadedFile) else SimpleUploadedFile(f.name, f.read_bytes())
        for f in paths_or_files
    ]
    headers = {"HTTP_X_UPLOAD": "rows"} if scripted else {}
    return client.post(reverse("projects-documents-upload", args=[project.slug]), {"files": files}, **headers)


def test_it_stores_and_parses_several_files_at_once(owner_client, project, tmp_path, settings):
    response = _upload(
        owner_client, project, fx.make_pdf(tmp_path), fx.make_docx(tmp_path), fx.make_markdown(tmp_path)
    )
    assert response.status_code == 302
    docs = {d.original_name: d for d in project.documents.all()}
    assert set(docs) == {"guide.pdf", "guide.docx", "guide.md"}
    assert all(d.status == Document.Status.PARSED for d in docs.values())
    assert docs["guide.pdf"].page_count == 2
    assert docs["guide.docx"].section_count >= 2
    for doc in docs.values():
        # Stored under a generated name inside DATA_DIR, never the user's file name.
        assert doc.file_path.name == str(doc.uid)
        assert doc.file_path.is_relative_to(Path(settings.DATA_DIR))
        assert doc.file_path.read_bytes()[:4] in (b"%PDF", b"PK\x03\x04") or doc.kind == "markdown"
        assert doc.parsed_path.exists()


def test_it_lists_documents_with_status_size_and_length(owner_client, project, tmp_path):
    _upload(owner_client, project, fx.make_pdf(tmp_path), fx.make_exe_renamed_pdf(tmp_path))
    page = owner_client.get(reverse("projects-documents", args=[project.slug])).content.decode()
    assert "guide.pdf" in page and "2 pages" in page and "Ready" in page
    assert "invoice.pdf" in page and "Failed" in page and "looks like a Windows program" in page


def test_it_deduplicates_by_content(owner_client, project, tmp_path):
    pdf = fx.make_pdf(tmp_path)
    _upload(owner_client, project, pdf)
    copy = tmp_path / "copy-of-guide.pdf"
    copy.write_bytes(pdf.read_bytes())
    response = _upload(owner_client, project, copy, scripted=True)
    assert response.status_code == 200
    assert "already in this project" in response.content.decode()
    assert project.documents.count() == 1
    assert len(list((project.data_dir / "docs").iterdir())) == 2  # the file and its parsed text


@pytest.mark.parametrize(
    "make, message",
    [
        (fx.make_encrypted_pdf, "password"),
        (lambda d: fx.make_empty_file(d), "empty"),
        (fx.make_exe_renamed_pdf, "Windows program"),
        (fx.make_zip_bomb_docx, "malformed or malicious"),
        (fx.make_binary_txt, "not text"),
    ],
)
def test_it_shows_a_readable_error_for_a_bad_file(owner_client, project, tmp_path, make, message):
    _upload(owner_client, project, make(tmp_path))
    doc = project.documents.get()
    assert doc.status == Document.Status.FAILED
    assert message in doc.error
    detail = owner_client.get(doc.get_absolute_url()).content.decode()
    assert message in detail


def test_it_refuses_an_oversized_file_before_storing_it(owner_client, project, tmp_path, settings):
    settings.MAX_UPLOAD_BYTES = 10_000
    big = SimpleUploadedFile("big.txt", b"word " * 5_000)
    response = _upload(owner_client, project, big, scripted=True)
    assert response.status_code == 400
    assert "larger than" in response.content.decode()
    assert not project.documents.exists()
    assert not (project.data_dir / "docs").exists() or not any((project.data_dir / "docs").iterdir())
    # Nothing of it was left in the upload temp folder either.
    assert not any(Path(settings.FILE_UPLOAD_TEMP_DIR).glob("*.upload*"))


def test_it_refuses_an_unsupported_type(owner_client, project):
    response = _upload(owner_client, project, SimpleUploadedFile("tool.exe", b"MZ\x90\x00"), scripted=True)
    assert response.status_code == 400
    assert "not supported" in response.content.decode()
    assert not project.documents.exists()


@pytest.mark.parametrize(
    "name, shown",
    [
        ("../../etc/passwd.txt", "passwd.txt"),
        ("..\\..\\boot.ini.txt", "boot.ini.txt"),
        ("note\x00.exe.txt", "note.exe.txt"),
        ("invoice\u202etxt.exe.md", "invoicetxt.exe.md"),
    ],
)
def test_it_keeps_hostile_file_names_harmless(owner_client, project, settings, name, shown):
    _upload(owner_client, project, SimpleUploadedFile(name, b"# Notes\n\nHello there.\n"))
    doc = project.documents.get()
    assert doc.original_name == shown
    assert doc.file_path.parent == project.data_dir / "docs"
    stored = {p.name for p in Path(settings.DATA_DIR).rglob("*") if p.is_file()}
    assert not any("passwd" in n or "boot" in n or "\x00" in n for n in stored)


def test_the_document_page_shows_the_extracted_text_with_pages(owner_client, project, tmp_path):
    _upload(owner_client, project, fx.make_pdf(tmp_path))
    doc = project.documents.get()
    page = owner_client.get(doc.get_absolute_url()).content.decode()
    assert 'id="page-1"' in page and 'id="page-2"' in page
    assert fx.PDF_TITLE in page


def test_deleting_a_document_removes_its_files(owner_client, project, tmp_path):
    _upload(owner_client, project, fx.make_pdf(tmp_path))
    doc = project.documents.get()
    files = [doc.file_path, doc.parsed_path]
    assert all(f.exists() for f in files)
    response = owner_client.post(reverse("projects-document-delete", args=[project.slug, doc.pk]))
    assert response.status_code == 302
    assert not project.documents.exists()
    assert not any(f.exists() for f in files)


def test_large_files_are_parsed_by_a_worker(
    owner_client, project, tmp_path, settings, django_capture_on_commit_callbacks
):
    settings.PARSE_INLINE_MAX_BYTES = 10
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        _upload(owner_client, project, fx.make_markdown(tmp_path))
    # The upload itself left it waiting; the (eager) task on commit parsed it, and the parse
    # asked for a fresh data quality report.
    assert [c.__qualname__.split(".")[0] for c in callbacks] == ["document_schedule_parse", "data_changed"]
    assert project.documents.get().status == Document.Status.PARSED


def test_the_row_partial_stops_polling_once_settled(owner_client, project, tmp_path, settings):
    settings.PARSE_INLINE_MAX_BYTES = 10
    _upload(owner_client, project, fx.make_markdown(tmp_path))
    doc = project.documents.get()
    url = reverse("projects-document-row", args=[project.slug, doc.pk])
    waiting = owner_client.get(url, HTTP_HX_REQUEST="true")
    assert waiting.status_code == 200 and 'hx-trigger="every 2s"' in waiting.content.decode()
    document_parse(document_id=doc.pk)
    settled = owner_client.get(url, HTTP_HX_REQUEST="true")
    assert settled.status_code == 286 and "hx-trigger" not in settled.content.decode()


def test_a_parse_delivered_twice_runs_once(project, tmp_path):
    with fx.make_markdown(tmp_path).open("rb") as fh:
        doc = document_add(project=project, stream=fh, name="guide.md", size=None).document
    assert document_parse(document_id=doc.pk) is not None
    assert document_parse(document_id=doc.pk) is None


def test_lost_parses_are_sent_again_unless_their_messages_still_wait(project, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    from projects import services

    for i in range(3):
        document_add(
            project=project,
            stream=SimpleUploadedFile(f"d{i}.txt", f"text {i}".encode()),
            name=f"d{i}.txt",
            size=None,
        )
    Document.objects.update(status=Document.Status.PENDING, created_at=timezone.now() - timedelta(hours=1))
    sent = []
    monkeypatch.setattr(services.queues, "send", lambda task, pk: sent.append(pk))
    # Three messages wait in the broker (behind a long build): nothing is sent again.
    monkeypatch.setattr(services, "_messages_waiting", lambda: 3)
    assert services.documents_requeue_stale(stale_after=timedelta(seconds=60)) == [] and sent == []
    # The broker holds nothing (the messages were lost with a killed worker): all three go again.
    monkeypatch.setattr(services, "_messages_waiting", lambda: 0)
    assert len(services.documents_requeue_stale(stale_after=timedelta(seconds=60))) == 3 and len(sent) == 3


def test_the_broker_is_asked_how_many_messages_wait(settings):
    from projects.services import _messages_waiting

    # The tests' embedded broker: an empty folder, reachable.
    assert _messages_waiting() == 0
