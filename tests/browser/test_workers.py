"""The Workers page in real Chromium: it refreshes itself (htmx polling, every 5 s) while workers
come and go and a build runs, with no Content-Security-Policy violation."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.utils import timezone
from playwright.sync_api import expect

from ops.models import Worker
from ops.queues import CPU, GPU
from tests.ops.helpers import add_worker
from training.models import Build, BuildStep

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_the_page_follows_workers_and_builds_without_a_reload(live_server, page, project):  # type: ignore[no-untyped-def]
    User.objects.create_user("erin", password="pw-erin-123", is_staff=True)
    add_worker("cpu@web-1", [CPU], cores=16, concurrency=2)
    failed = Build.objects.create(
        project=project, recipe="rag,quantize:q4_k_m", status=Build.Status.FAILED, ended_at=timezone.now(),
        error="Quantization needs 2.1 GB free on the data disk; 0.4 GB is left.",
    )  # fmt: skip
    BuildStep.objects.create(build=failed, index=0, name="quantize", status="failed", worker="cpu@web-1")
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)

    page.goto(f"{live_server.url}/login/")
    page.get_by_label("Username").fill("erin")
    page.get_by_label("Password").fill("pw-erin-123")
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("link", name="Workers").click()
    expect(page.get_by_role("heading", name="Workers", level=1)).to_be_visible()
    status = page.locator("#workers-status")
    expect(status).to_contain_text("cpu@web-1")
    expect(status).to_contain_text("Quantization needs 2.1 GB")

    # A GPU worker starts and takes a training build; the first worker stops answering.
    add_worker("gpu@gpu-box", [GPU], gpu="NVIDIA H200", gpu_memory_bytes=141 * 10**9)
    build = Build.objects.create(
        project=project, recipe="lora", status=Build.Status.RUNNING, claimed_by="gpu-box:5151",
        started_at=timezone.now() - timedelta(minutes=2), heartbeat_at=timezone.now(),
    )  # fmt: skip
    BuildStep.objects.create(
        build=build, index=0, name="lora", status="running", worker="gpu@gpu-box",
        progress_current=30, progress_total=120, message="Step 30 of 120, loss 1.84", started_at=timezone.now(),
    )  # fmt: skip
    Worker.objects.filter(name="cpu@web-1").update(last_seen=timezone.now() - timedelta(hours=1))
    expect(status.locator("tr.worker-row", has_text="gpu@gpu-box")).to_contain_text(
        f"Build #{build.pk}", timeout=12_000
    )
    expect(status.locator("tr.worker-row", has_text="cpu@web-1")).to_contain_text("Not responding")
    expect(status).to_contain_text("Step 30 of 120, loss 1.84")
    if os.environ.get("SCREENSHOT_DIR"):  # to look at it
        page.screenshot(path=str(Path(os.environ["SCREENSHOT_DIR"]) / "workers.png"), full_page=True)
    assert violations == []
