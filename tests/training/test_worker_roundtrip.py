"""Builds through real Celery workers: Redis and the embedded broker, and a worker killed mid-build.

Nothing here runs in the test process's Django: every step is a real process (manage.py commands,
`celery worker`) sharing one fresh DATA_DIR with a file-based SQLite database, exactly as an
installation runs. The test process reads that database with sqlite3 to watch progress.

The test process itself runs with CELERY_TASK_ALWAYS_EAGER=1 and BUILD_HEARTBEAT_THREAD=0 (see
tests/testenv.py); the processes started here get a clean environment with both turned back.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pytest_redis import factories
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen import canvas

from tests.installation import Install, Worker, pid_gone
from tests.projects.fixtures_docs import make_markdown, make_pdf

pytestmark = pytest.mark.services

# A session-scoped Redis on a free port, from Debian's server; configured here, not in ini files.
redis_server = factories.redis_proc(executable="/usr/bin/redis-server", port=None)


def _two_documents(directory: Path) -> list[Path]:
    directory.mkdir()
    return [make_pdf(directory), make_markdown(directory)]


def _assert_round_trip(install: Install, worker: Worker, result: subprocess.CompletedProcess) -> None:
    """`build --wait` printed a succeeded build whose parse step the worker ran."""
    assert result.returncode == 0, install.report(f"build did not succeed: {result.stdout}")
    out = json.loads(result.stdout)
    assert out["status"] == "succeeded", install.report(f"build output: {out}")
    metrics = out["metrics"]
    assert out["model_version"] is None, install.report(f"build output: {out}")
    assert metrics["parse"]["parsed"] == 2, install.report(f"build output: {out}")
    assert metrics["parse"]["newly_read"] == 2, install.report(f"build output: {out}")
    assert metrics["validate"]["documents"] == 2, install.report(f"build output: {out}")
    assert sorted(install.document_statuses().values()) == ["parsed", "parsed"], install.report("documents")
    build = install.build_row(out["build"])
    assert build["attempts"] == 1, install.report(f"build row: {build}")
    # Run by the worker's pool process, not eagerly inside the `build` command.
    assert build["claimed_by"].startswith(f"{socket.gethostname()}:"), build
    log = worker.log()
    assert "run_build_task[" in log and "received" in log, install.report("the worker never got the task")


def test_round_trip_through_redis(install: Install, redis_server: Any, tmp_path: Path) -> None:
    install.env["CELERY_BROKER_URL"] = f"redis://{redis_server.host}:{redis_server.port}/0"
    slug = install.prepare(_two_documents(tmp_path / "src"))
    # A slow start on a loaded machine must not make the stored documents look abandoned (the
    # start-up sweep would parse them before the build does): stale only after an hour.
    worker = install.start_worker(BUILD_STALE_SECONDS="3600")

    result = install.manage(
        "build", slug, "--recipe", "check", "--wait", "--timeout", "120", timeout=150, check=False
    )

    _assert_round_trip(install, worker, result)
    # Celery masks the URL in its log ("redis://:**@127.0.0.1:PORT/0").
    connected = f"Connected to redis://:**@{redis_server.host}:{redis_server.port}/0"
    assert connected in worker.log(), install.report("the worker is not on the test's Redis")
    assert not (install.data_dir / "broker").exists(), "the embedded broker was used instead of Redis"


def test_round_trip_through_embedded_broker(install: Install, tmp_path: Path) -> None:
    assert "CELERY_BROKER_URL" not in install.env
    slug = install.prepare(_two_documents(tmp_path / "src"))
    worker = install.start_worker(BUILD_STALE_SECONDS="3600")  # as above

    result = install.manage(
        "build", slug, "--recipe", "check", "--wait", "--timeout", "120", timeout=150, check=False
    )

    _assert_round_trip(install, worker, result)
    assert "filesystem://" in worker.log(), install.report("not on the embedded broker")
    assert (install.data_dir / "broker" / "queue").is_dir()


# --- A worker killed mid-build ---------------------------------------------------------------

# Enough reading for the parse step to take a few seconds on a small machine (measured on 2 cores:
# about 0.14 s per 30-page document, some 6 s in all), so it can be killed part-way. Progress
# reaches the database at most once a second (training.steps.WRITE_EVERY_SECONDS), so the kill
# lands after roughly a second of parsing.
KILL_DOCUMENTS = 40
KILL_PAGES = 30


def _make_manual(path: Path, index: int, pages: int) -> Path:
    """A text PDF with distinct content (documents are de-duplicated by their bytes)."""
    pdf = canvas.Canvas(str(path), pagesize=A4)
    pdf.setTitle(f"Pump manual {index}")
    for page in range(pages):
        y = 780.0
        pdf.setFont("Helvetica-Bold", 16)
        pdf.drawString(72, y, f"Chapter {page + 1} of manual {index}")
        y -= 32
        pdf.setFont("Helvetica", 11)
        for line in range(40):
            text = f"Manual {index}, page {page + 1}, line {line + 1}: check the filter and the valve."
            pdf.drawString(72, y, text)
            y -= 17
        pdf.showPage()
    pdf.save()
    return path


@pytest.mark.abuse
def test_worker_killed_mid_build_is_recovered(install: Install, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    documents = [_make_manual(src / f"manual-{i:02}.pdf", i, KILL_PAGES) for i in range(KILL_DOCUMENTS)]
    slug = install.prepare(documents)
    first = install.start_worker()

    started = install.manage("build", slug, "--recipe", "check", timeout=60)
    build_id = json.loads(started.stdout)["build"]

    def parse_under_way() -> bool:
        build, parse = install.build_row(build_id), install.step_row(build_id, "parse")
        assert build["status"] in ("queued", "running"), install.report(f"build ended early: {build}")
        assert not (parse["progress_total"] and parse["progress_current"] >= parse["progress_total"]), (
            install.report("the parse step finished before it could be killed: make the documents bigger")
        )
        return build["status"] == "running" and parse["progress_current"] >= 1

    install.wait_for("the parse step to make progress", parse_under_way, timeout=60)
    first.kill()

    # The dead worker's build is left as it was: running, claimed by a process that is gone.
    build = install.build_row(build_id)
    assert build["status"] == "running" and build["attempts"] == 1, install.report(f"after kill: {build}")
    assert install.step_row(build_id, "parse")["status"] == "running"
    statuses = install.document_statuses()
    parsed_before = dict(install.query("SELECT id, parsed_at FROM projects_document WHERE status = 'parsed'"))
    assert 1 <= len(parsed_before) < KILL_DOCUMENTS, statuses
    assert "pending" in statuses.values(), statuses
    # The killed pool process is an orphan that init reaps a moment later (up to ~2 s on a VM whose
    # init polls); until then it is a zombie, and training.services._worker_is_dead, which asks
    # kill(pid, 0), would still count it alive. Wait for the reaping, not for the app.
    dead_pid = int(build["claimed_by"].rpartition(":")[2])
    install.wait_for(f"the killed worker process {dead_pid} to be reaped", lambda: pid_gone(dead_pid), 20)

    # A new worker re-queues it at start-up from the dead pid alone: the heartbeat is still fresh
    # and BUILD_STALE_SECONDS is a minute away.
    second = install.start_worker(BUILD_STALE_SECONDS="60")
    install.wait_for(
        "the build to end after the restart",
        lambda: install.build_row(build_id)["status"] not in ("queued", "running"),
        timeout=120,
    )

    build = install.build_row(build_id)
    assert build["status"] == "succeeded", install.report(f"build: {build}")
    assert build["attempts"] == 2, install.report(f"build: {build}")
    assert install.query("SELECT COUNT(*) FROM training_build") == [(1,)]
    assert f"re-queued stale builds [{build_id}]" in second.log(), install.report("no re-queue logged")
    logs = install.build_logs(build_id)
    assert any("re-queued" in m for m in logs), logs
    assert "Resuming (attempt 2)." in logs, logs

    # Every document read, once: none added or lost, the ones read before the kill left alone.
    statuses = install.document_statuses()
    assert len(statuses) == KILL_DOCUMENTS and set(statuses.values()) == {"parsed"}, statuses
    parsed_at = dict(install.query("SELECT id, parsed_at FROM projects_document"))
    assert {pk: parsed_at[pk] for pk in parsed_before} == parsed_before, "documents were parsed again"

    parse = install.step_row(build_id, "parse")
    assert parse["status"] == "succeeded", parse
    assert parse["metrics"]["documents"] == KILL_DOCUMENTS, parse
    assert parse["metrics"]["parsed"] == KILL_DOCUMENTS, parse
    assert parse["metrics"]["failed"] == 0, parse
    assert parse["metrics"]["newly_read"] == KILL_DOCUMENTS - len(parsed_before), parse
    assert parse["metrics"]["pages"] == KILL_DOCUMENTS * KILL_PAGES, parse
    assert install.step_row(build_id, "validate")["status"] == "succeeded"


# --- A worker killed mid-training -----------------------------------------------------------


@pytest.mark.abuse
def test_worker_killed_mid_training_resumes_from_its_checkpoint(install: Install, tmp_path: Path) -> None:
    from tests.tinymodels import make_tiny_llama

    tiny = make_tiny_llama(tmp_path / "tiny-llama")
    src = tmp_path / "src"
    slug = install.prepare(_two_documents(src))
    install.add_pairs(slug)
    install.manage("basemodels", "--add", str(tiny), "--name", "Tiny")
    first = install.start_worker()
    started = install.manage(
        "build", slug, "--recipe", "lora", "--base", "tiny",
        "--set", "lora.max_steps=400", "--set", "lora.epochs=1000", "--set", "lora.checkpoint_every=20",
        "--set", "lora.batch_tokens=128", "--set", "lora.eval_every=100",
    )  # fmt: skip
    build_id = json.loads(started.stdout)["build"]

    def trained_a_while() -> bool:
        lora = install.step_row(build_id, "lora")
        assert install.build_row(build_id)["status"] in ("queued", "running"), install.report("ended early")
        steps = [p["step"] for p in lora["metrics"].get("history", [])]
        assert not steps or steps[-1] < 380, install.report("training nearly finished before the kill")
        return bool(steps) and steps[-1] >= 45

    install.wait_for("training to pass step 45", trained_a_while, timeout=180)
    first.kill()
    killed_at = install.step_row(build_id, "lora")["metrics"]["history"][-1]["step"]
    dead_pid = int(install.build_row(build_id)["claimed_by"].rpartition(":")[2])
    install.wait_for(f"the killed worker process {dead_pid} to be reaped", lambda: pid_gone(dead_pid), 20)

    second = install.start_worker(BUILD_STALE_SECONDS="60")
    install.wait_for(
        "the build to end after the restart",
        lambda: install.build_row(build_id)["status"] not in ("queued", "running"),
        timeout=300,
    )
    build = install.build_row(build_id)
    assert build["status"] == "succeeded" and build["attempts"] == 2, install.report(f"build: {build}")
    resumed = [
        m for m in install.build_logs(build_id) if m.startswith("Resumed training from the checkpoint")
    ]
    assert resumed, install.report("no resume logged")
    checkpoint = int(resumed[0].rsplit(" ", 1)[1].rstrip("."))
    # The last checkpoint before the kill: a multiple of checkpoint_every. The history seen in the
    # database (written every few seconds) may lag the step the process had reached, so it bounds
    # the checkpoint from below only.
    assert checkpoint % 20 == 0 and killed_at - 20 <= checkpoint < 400, (checkpoint, killed_at)
    lora = install.step_row(build_id, "lora")["metrics"]
    assert lora["steps"] == 400, lora
    steps = [p["step"] for p in lora["history"] if p["train_loss"] is not None]
    assert steps == list(range(1, 401)), "the loss curve has a gap or a repeat"
    assert f"re-queued stale builds [{build_id}]" in second.log(), install.report("no re-queue logged")
