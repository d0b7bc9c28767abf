"""The front door in real Chromium: answer the wizard, build what it recommends on the bundled
model, and read the estimates next to what the build measured."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from playwright.sync_api import expect

from projects.services import document_add

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

MANUAL = "\n\n".join(
    f"## Pump P-{i}00\n\nTo reset the P-{i}00 pump, hold the red RESET button for {i + 2} seconds until the "
    "light blinks green. Error E-40{i}1 means the inlet pressure is too low: open the inlet valve fully."
    for i in range(1, 9)
)


def test_wizard_to_build_to_estimates_against_measurements(live_server, page, owner, project, settings):  # type: ignore[no-untyped-def]
    settings.EVAL_MAX_TOKENS = 256
    document_add(
        project=project, stream=SimpleUploadedFile("pumps.md", MANUAL.encode()), name="pumps.md", size=None
    )
    page.set_default_timeout(30_000)
    page.goto(f"{live_server.url}/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("pw-alice-123")
    page.get_by_role("button", name="Log in").click()
    page.goto(f"{live_server.url}/p/{project.slug}/")
    page.get_by_role("link", name="Choose an approach").click()

    expect(page.get_by_text("Question 1 of 6")).to_be_visible()
    expect(page.get_by_text("1 document, 0 training pairs")).to_be_visible()  # read, not asked
    for choice in ("No, start from the bundled small model", "A laptop or a CPU server", "No particular limit", "Yes",
                   "Low cost and effort", "Minutes"):  # fmt: skip
        page.get_by_label(choice, exact=True).check()
        page.get_by_role("button", name="Next").click()

    expect(page.get_by_role("heading", name="Our recommendation")).to_be_visible()
    expect(page.get_by_text("Fastest path to production")).to_be_visible()
    expect(page.get_by_text("rag,quantize:q4_k_m").first).to_be_visible()
    # The build runs as the request's on-commit task here (eager Celery): the click returns when it ends.
    page.get_by_role("button", name="Build model").click(timeout=600_000)
    page.wait_for_url("**/builds/*/", timeout=600_000)
    expect(page.locator(".summary-card").get_by_text("is ready")).to_be_visible(timeout=600_000)
    table = page.get_by_role("table", name="Estimated and measured")
    expect(table).to_be_visible()
    expect(table.get_by_role("row", name="File size")).to_contain_text("MB")
    cells = table.get_by_role("row", name="File size").locator("td")
    estimated, measured = (float(cells.nth(i).inner_text().split()[0]) for i in (0, 1))
    assert 0.5 < estimated / measured < 2  # the estimate is of the right size
