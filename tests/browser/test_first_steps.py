"""A new user's first five minutes, in real Chromium: log in, create a project, upload, see it parsed."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from playwright.sync_api import expect

from tests.projects import fixtures_docs as fx

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_log_in_create_a_project_upload_two_documents_and_see_them_parsed(live_server, page, tmp_path):
    User.objects.create_user("alice", password="pw-alice-123")
    pdf, docx = fx.make_pdf(tmp_path), fx.make_docx(tmp_path)

    page.goto(f"{live_server.url}/")
    expect(page).to_have_url(f"{live_server.url}/login/?next=/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("pw-alice-123")
    page.get_by_role("button", name="Log in").click()

    expect(page.get_by_role("heading", name="Build a language model that knows your domain")).to_be_visible()
    page.get_by_role("link", name="New project").click()
    page.get_by_label("Name").fill("Pump support")
    page.get_by_role("button", name="Create project").click()
    expect(page.get_by_role("heading", name="Pump support")).to_be_visible()

    page.get_by_role("link", name="Upload documents").click()
    expect(page.get_by_text("Drop files here")).to_be_visible()
    page.wait_for_selector("#upload-form[data-ready]", state="attached")
    page.set_input_files("#id_files", [str(pdf), str(docx)])

    rows = page.locator("#documents-body tr.doc-row")
    expect(rows).to_have_count(2)
    expect(page.locator("#documents-body .badge.ok")).to_have_count(2)
    expect(page.locator("#documents-body")).to_contain_text("2 pages")
    expect(page.locator("#documents-body")).to_contain_text("guide.docx")

    # The list survives a reload (it came from the server, not only from the script).
    page.reload()
    expect(page.locator("#documents-body .badge.ok")).to_have_count(2)

    page.get_by_role("link", name="guide.pdf").click()
    expect(page.locator("#page-2")).to_be_visible()
    expect(page.get_by_text(fx.PDF_TITLE).first).to_be_visible()


def test_a_bad_file_shows_why_it_failed(live_server, page, tmp_path):
    User.objects.create_user("bob", password="pw-bob-123")
    page.goto(f"{live_server.url}/login/")
    page.get_by_label("Username").fill("bob")
    page.get_by_label("Password").fill("pw-bob-123")
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("link", name="New project").click()
    page.get_by_label("Name").fill("Bad files")
    page.get_by_role("button", name="Create project").click()
    page.get_by_role("link", name="Upload documents").click()
    page.wait_for_selector("#upload-form[data-ready]", state="attached")
    page.set_input_files("#id_files", [str(fx.make_exe_renamed_pdf(tmp_path))])
    expect(page.locator("#documents-body")).to_contain_text("looks like a Windows program")
    expect(page.locator("#documents-body .badge.bad")).to_have_count(1)
