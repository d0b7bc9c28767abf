"""A version whose documents changed says so on its page, and Refresh starts a new build."""

from __future__ import annotations

import os

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from playwright.sync_api import expect

from projects.services import document_add, document_delete
from training.models import Build, ModelVersion
from training.services import build_run, build_start

SHOTS = os.environ.get("SLM_SCREENSHOTS")  # a folder to keep screenshots in, when set


def _add(project, name: str, text: str):  # type: ignore[no-untyped-def]
    return document_add(
        project=project, stream=SimpleUploadedFile(name, text.encode()), name=name, size=None
    ).document


@pytest.mark.django_db(transaction=True)
def test_the_changed_banner_and_refresh(live_server, page, owner, project):  # type: ignore[no-untyped-def]
    pump = _add(
        project, "pump.md", "# Pump manual\n\n" + "Hold RESET for five seconds to reset the pump. " * 20
    )
    _add(project, "vacation.md", "# Vacation\n\n" + "Employees get 25 days of paid vacation. " * 20)
    build = build_start(project=project, user=owner, recipe="rag", steps=[{"name": "parse"}, {"name": "rag"}])
    build_run(build_id=build.pk)
    version = ModelVersion.objects.get(build=build)
    document_delete(document=pump)
    _add(project, "pump.md", "# Pump manual\n\n" + "The P-300 resets from its touch screen. " * 20)

    page.goto(f"{live_server.url}/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("pw-alice-123")
    page.get_by_role("button", name="Log in").click()
    page.goto(f"{live_server.url}/p/{project.slug}/models/{version.number}/about/")
    banner = page.locator("section.stale")
    expect(banner).to_contain_text("1 document changed since this version was built")
    expect(banner).to_contain_text("Changed: pump.md.")
    if SHOTS:
        page.screenshot(path=os.path.join(SHOTS, "version-changed.png"), full_page=False)
    page.set_default_timeout(120_000)  # the refresh build runs inside the request here (eager Celery)
    banner.get_by_role("button", name="Refresh").click()
    page.wait_for_url("**/builds/*/")
    refresh = Build.objects.exclude(pk=build.pk).get()
    assert page.url.endswith(refresh.get_absolute_url())
    assert refresh.steps.get(name="evaluate").params["refresh_of"] == version.pk
