"""Watching a LoRA build in real Chromium: the loss chart grows while training runs, and Cancel
stops it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from playwright.sync_api import expect

from projects.services import pair_create
from tests.tinymodels import make_tiny_llama
from training.models import Build
from training.registry import base_model_register
from training.services import build_start

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parents[2]


def _worker(build_id: int) -> subprocess.Popen:
    """The build runs in its own process, as under a real worker: training in a thread of the
    test process would hold the interpreter and stall the live server it is watched through."""
    env = os.environ | {
        "DATA_DIR": str(settings.DATA_DIR),
        "DATABASE_URL": f"sqlite:///{connection.settings_dict['NAME']}",
        "CELERY_TASK_ALWAYS_EAGER": "1",
        "BUILD_HEARTBEAT_THREAD": "0",
    }
    code = f"import django; django.setup(); from training.services import build_run; build_run(build_id={build_id})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)


def test_the_loss_chart_moves_while_training_runs(live_server, page, owner, project, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    # The queue is replaced by the worker process below: the tests' eager Celery would otherwise
    # run the whole build inside build_start, before the page is even opened.
    from training import tasks

    monkeypatch.setattr(tasks.run_build_task, "apply_async", lambda *args, **kwargs: None)
    for i in range(12):
        pair_create(project=project, instruction=f"How do I reset pump P-{i}00?", input="",
                    response=f"Hold RESET for {i + 2} seconds.")  # fmt: skip
    base = base_model_register(source=str(make_tiny_llama(tmp_path / "tiny")), name="Tiny")
    overrides = {"max_steps": "5000", "epochs": "1000", "batch_tokens": "128", "checkpoint_every": "1000"}
    build = build_start(
        project=project, user=owner, recipe="lora", base=base, params={"lora": {"overrides": overrides}}
    )

    page.goto(f"{live_server.url}/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("pw-alice-123")
    page.get_by_role("button", name="Log in").click()
    page.goto(f"{live_server.url}{build.get_absolute_url()}")
    worker = _worker(build.pk)
    try:
        line = page.locator("polyline.train-line")
        expect(line).to_be_attached(timeout=90_000)
        first = len(line.get_attribute("points").split(" "))
        # The page polls every 2 s and the curve is written every 2 s: it grows without a reload.
        page.wait_for_function(
            "(before) => { const l = document.querySelector('polyline.train-line');"
            " return l && l.getAttribute('points').split(' ').length > before; }",
            arg=first,
            timeout=30_000,
        )
        expect(page.get_by_text("Fine-tune on your pairs (LoRA)")).to_be_visible()
        expect(page.locator(".step-message").filter(has_text="Step ")).to_be_visible()
        # Cancel is always there: training stops within a step and the build ends cancelled.
        page.get_by_role("button", name="Cancel build").click()
        assert worker.wait(timeout=120) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    build.refresh_from_db()
    assert build.status == Build.Status.CANCELLED, build.error
    history = build.steps.get(name="lora").metrics["history"]
    assert first < len(history) < 5000  # it trained a while, and stopped well before the end


def test_a_timed_out_build_says_why_and_resumes(live_server, page, owner, project, settings):  # type: ignore[no-untyped-def]
    from training.services import build_run

    pair_create(project=project, instruction="How do I reset the pump?", input="", response="Hold RESET.")
    settings.BUILD_TIME_LIMIT = 0  # past its limit before the first step
    build = build_start(project=project, user=owner, recipe="check")
    build_run(build_id=build.pk)
    build.refresh_from_db()
    assert build.status == Build.Status.TIMED_OUT

    page.goto(f"{live_server.url}/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("pw-alice-123")
    page.get_by_role("button", name="Log in").click()
    page.goto(f"{live_server.url}{build.get_absolute_url()}")
    expect(page.get_by_role("alert")).to_contain_text("ran past its time limit")
    expect(page.locator(".badge", has_text="Timed out")).to_be_visible()
    if os.environ.get("SLM_SCREENSHOTS"):
        page.screenshot(
            path=os.path.join(os.environ["SLM_SCREENSHOTS"], "build-timed-out.png"), full_page=True
        )

    settings.BUILD_TIME_LIMIT = 3600
    page.get_by_role("button", name="Resume build").click()  # eager Celery: it runs to the end
    expect(page.locator(".badge", has_text="Succeeded")).to_be_visible()
    build.refresh_from_db()
    assert build.status == Build.Status.SUCCEEDED
