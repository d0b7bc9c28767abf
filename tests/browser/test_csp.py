"""The Content-Security-Policy in real Chromium: the main pages load without a single violation, and
what used to be inline script (confirm before delete, print, bulk accept) still works."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from playwright.sync_api import expect

from projects.models import InstructionPair, Project
from projects.services import document_add, document_parse, pair_create
from training.models import Build, BuildStep, ModelVersion

pytestmark = [pytest.mark.browser, pytest.mark.abuse, pytest.mark.django_db(transaction=True)]


def _fill_project(project: Project, owner) -> dict[str, str]:  # type: ignore[no-untyped-def]
    from training.ml.bundled import bundled_llm_gguf

    doc = document_add(
        project=project,
        stream=SimpleUploadedFile("pump.md", b"# Pump\n\nHold RESET."),
        name="pump.md",
        size=None,
    ).document
    document_parse(document_id=doc.pk)
    pair_create(project=project, instruction="How do I reset it?", input="", response="Hold RESET.")
    for i in range(2):
        pair = pair_create(
            project=project, instruction=f"Generated {i}?", input="", response="Yes.",
            source=InstructionPair.Source.GENERATED,
        )  # fmt: skip
        InstructionPair.objects.filter(pk=pair.pk).update(review=InstructionPair.Review.PENDING)
    # Rows only, no worker: the pages show them as they are.
    build = Build.objects.create(project=project, created_by=owner, recipe="rag", status=Build.Status.RUNNING)
    BuildStep.objects.create(
        build=build, index=0, name="rag", status="succeeded", progress_current=5, progress_total=5
    )
    BuildStep.objects.create(
        build=build, index=1, name="evaluate", status="running", progress_current=1, progress_total=4
    )
    ModelVersion.objects.create(
        project=project, number=1, recipe="rag", base_model="SmolLM2-135M-Instruct (bundled, Q4_1)",
        quant_type="q4_1", gguf_path=str(bundled_llm_gguf().path),
    )  # fmt: skip
    s = project.slug
    return {
        "home": "/",
        "overview": f"/p/{s}/",
        "documents": f"/p/{s}/documents/",
        "document": doc.get_absolute_url(),
        "pairs": f"/p/{s}/pairs/",
        "builds": f"/p/{s}/builds/",
        "build": build.get_absolute_url(),
        "models": f"/p/{s}/models/",
        "chat": f"/p/{s}/models/1/",
        "model": f"/p/{s}/models/1/about/",
        "report": f"/p/{s}/models/report/",
        "wizard": f"/p/{s}/wizard/",
        "teachers": f"/p/{s}/teachers/",
        "members": f"/p/{s}/members/",
        "settings": "/settings/",
    }


def test_the_main_pages_run_under_the_policy_without_violations(live_server, page, owner, project):  # type: ignore[no-untyped-def]
    pages = _fill_project(project, owner)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    page.goto(f"{live_server.url}/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("pw-alice-123")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("link", name="New project")).to_be_visible()

    for name, path in pages.items():
        response = page.goto(f"{live_server.url}{path}")
        assert response is not None and response.status == 200, name
        assert "script-src 'self'" in response.headers["content-security-policy"], name
        page.wait_for_load_state("load")
        # Our scripts ran (they are files, so the policy allows them) and htmx injected no <style>.
        if name != "report":  # the printable report is a page of its own, without htmx
            assert page.evaluate("typeof window.htmx") == "object", name
        assert page.evaluate("document.querySelectorAll('style').length") == 0, name
    # The build page polls with htmx; let one swap happen under the policy.
    page.goto(f"{live_server.url}{pages['build']}")
    expect(page.locator("progress.progress").first).to_have_attribute("value", "100")
    page.wait_for_timeout(2500)
    assert problems == [], problems


def test_behaviour_moved_out_of_inline_handlers_still_works(live_server, page, owner, project):  # type: ignore[no-untyped-def]
    pages = _fill_project(project, owner)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(f"{live_server.url}/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("pw-alice-123")
    page.get_by_role("button", name="Log in").click()

    # Confirm before deleting a document: Cancel keeps it, OK deletes it.
    page.goto(f"{live_server.url}{pages['document']}")
    page.once("dialog", lambda d: d.dismiss())
    page.get_by_role("button", name="Delete document").click()
    page.wait_for_timeout(300)
    assert project.documents.count() == 1
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Delete document").click()
    expect(page.get_by_text("pump.md was deleted.")).to_be_visible()
    assert project.documents.count() == 0

    # "Accept all waiting" is a form of its own now, not a script switching the scope.
    page.goto(f"{live_server.url}{pages['pairs']}")
    page.get_by_role("button", name="Accept all 2 waiting").click()
    expect(page.get_by_text("2 pairs accepted.")).to_be_visible()
    assert not project.pairs.exclude(review=InstructionPair.Review.ACCEPTED).exists()

    # Print on the report page.
    page.goto(f"{live_server.url}{pages['report']}")
    page.evaluate("window.print = () => { window.printed = true; }")
    page.get_by_role("button", name="Print or save as PDF").click()
    assert page.evaluate("window.printed") is True

    # Deleting the project: type its name, and it is gone.
    Build.objects.filter(project=project).update(status=Build.Status.SUCCEEDED)
    page.goto(f"{live_server.url}{pages['members']}")
    page.get_by_label("Project name").fill(project.name)
    page.get_by_role("button", name="Delete project").click()
    expect(page.get_by_text(f"“{project.name}” was deleted")).to_be_visible()
    assert not Project.objects.filter(pk=project.pk).exists()
    assert problems == [], problems
