"""Worker faults with real processes: SIGTERM on deploy, a time limit, a full disk, no memory.

Each test installs the app in its own DATA_DIR (tests/installation.py), starts real `celery
worker` processes, and watches the installation's database from outside. The kill -9 cases
(parsing, training) are in tests/training/test_worker_roundtrip.py, marked for this suite too.
"""

from __future__ import annotations

import hashlib
import json
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_redis import factories

from tests.installation import Install, Worker, pid_gone
from tests.projects.fixtures_docs import make_markdown, make_pdf
from tests.tinymodels import make_tiny_llama

pytestmark = [pytest.mark.services]

redis_server = factories.redis_proc(executable="/usr/bin/redis-server", port=None)


# Many short steps of a tiny model: long enough to stop part-way, short enough to finish after.
LORA = [
    "--set", "lora.epochs=1000", "--set", "lora.batch_tokens=128", "--set", "lora.eval_every=100000",
]  # fmt: skip


def _project_with_tiny_model(install: Install, tmp_path: Path, **model: Any) -> str:
    src = tmp_path / "src"
    src.mkdir()
    slug = install.prepare([make_pdf(src), make_markdown(src)])
    install.add_pairs(slug)
    tiny = make_tiny_llama(tmp_path / "tiny-llama", **model)
    install.manage("basemodels", "--add", str(tiny), "--name", "Tiny", timeout=300)
    return slug


def _lora_history(install: Install, build_id: int) -> list[int]:
    return [p["step"] for p in install.step_row(build_id, "lora")["metrics"].get("history", [])]


def _resumed_from(install: Install, build_id: int) -> list[int]:
    return [
        int(m.rsplit(" ", 1)[1].rstrip("."))
        for m in install.build_logs(build_id)
        if m.startswith("Resumed training from the checkpoint")
    ]


def _wait_for_end(install: Install, build_id: int, timeout: float) -> dict[str, Any]:
    install.wait_for(
        f"build {build_id} to end",
        lambda: install.build_row(build_id)["status"] not in ("queued", "running", "cancelling"),
        timeout=timeout,
    )
    return install.build_row(build_id)


# --- SIGTERM on deploy -----------------------------------------------------------------------


@pytest.mark.parametrize("broker, signal_to", [("embedded", "main"), ("redis", "group")])
def test_sigterm_requeues_the_build_which_resumes_where_it_stopped(
    broker: str, signal_to: str, install: Install, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if broker == "redis":
        redis = request.getfixturevalue("redis_server")
        install.env["CELERY_BROKER_URL"] = f"redis://{redis.host}:{redis.port}/0"
    slug = _project_with_tiny_model(install, tmp_path)
    first = install.start_worker()
    # No periodic checkpoint: the one the resume uses can only be the one written on SIGTERM.
    started = install.manage(
        "build", slug, "--recipe", "lora", "--base", "tiny",
        "--set", "lora.max_steps=400", "--set", "lora.checkpoint_every=100000", *LORA,
    )  # fmt: skip
    build_id = json.loads(started.stdout)["build"]

    def trained_a_while() -> bool:
        steps = _lora_history(install, build_id)
        assert not steps or steps[-1] < 380, install.report("training nearly finished before SIGTERM")
        return bool(steps) and steps[-1] >= 30

    install.wait_for("training to pass step 30", trained_a_while, timeout=240)
    signalled_at = _lora_history(install, build_id)[-1]
    (first.terminate_main if signal_to == "main" else first.terminate_group)()

    # A warm shutdown that ends by itself, well inside a deploy's grace period.
    assert first.exited(timeout=60), install.report("the worker did not stop after SIGTERM")
    build = install.build_row(build_id)
    assert build["status"] == "queued" and build["claimed_by"] == "", install.report(
        f"after SIGTERM: {build}"
    )
    assert build["attempts"] == 0, install.report(f"a deploy counted as a failed attempt: {build}")
    assert any("shutting down" in m for m in install.build_logs(build_id)), install.build_logs(build_id)
    # Marked for the next worker to pick up (the stopping one sends no message it could take itself).
    flagged = "SELECT requeue_requested_at IS NOT NULL FROM training_build WHERE id = ?"
    assert install.query(flagged, (build_id,)) == [(1,)]

    second = install.start_worker()
    build = _wait_for_end(install, build_id, timeout=300)
    assert build["status"] == "succeeded" and build["attempts"] == 1, install.report(f"build: {build}")
    (resumed,) = _resumed_from(install, build_id)
    assert resumed >= signalled_at, (resumed, signalled_at)  # the stop's own checkpoint, not step 0
    lora = install.step_row(build_id, "lora")["metrics"]
    assert [p["step"] for p in lora["history"] if p["train_loss"] is not None] == list(range(1, 401))
    assert install.query("SELECT COUNT(*) FROM training_modelversion WHERE build_id = ?", (build_id,)) == [
        (1,)
    ]
    assert f"resuming builds [{build_id}]" in second.log(), install.report("not resumed by the sweep")


# --- Time limit ------------------------------------------------------------------------------


def test_a_build_past_its_time_limit_times_out_with_a_checkpoint_and_resumes(
    install: Install, tmp_path: Path
) -> None:
    """Far more steps than fit in the limit, whatever the machine's speed: the build times out,
    is resumed (by the CLI twin of the Resume button), continues from the step it stopped at, and
    times out again further on."""
    slug = _project_with_tiny_model(install, tmp_path)
    worker = install.start_worker(BUILD_TIME_LIMIT="10")
    started = install.manage(
        "build", slug, "--recipe", "lora", "--base", "tiny",
        "--set", "lora.max_steps=100000", "--set", "lora.checkpoint_every=100000", *LORA,
    )  # fmt: skip
    build_id = json.loads(started.stdout)["build"]

    build = _wait_for_end(install, build_id, timeout=240)
    assert build["status"] == "timed_out", install.report(f"build: {build}")
    assert "time limit of 10 seconds" in build["error"] and "Resume" in build["error"], build["error"]
    stopped_at = _lora_history(install, build_id)[-1]
    assert stopped_at > 0
    checkpoints = list(install.data_dir.glob(f"builds/{build_id}/*-lora/checkpoints/step-*"))
    assert [int(p.name.split("-")[1]) for p in checkpoints] == [stopped_at], checkpoints
    assert install.step_row(build_id, "lora")["status"] == "pending"
    worker.stop()

    install.start_worker(BUILD_TIME_LIMIT="10")
    resumed = install.manage(
        "resumebuild", str(build_id), "--wait", "--timeout", "240", timeout=300, check=False
    )
    assert json.loads(resumed.stdout)["status"] == "timed_out", install.report(resumed.stdout)
    assert _resumed_from(install, build_id) == [stopped_at]
    steps = [
        p["step"]
        for p in install.step_row(build_id, "lora")["metrics"]["history"]
        if p["train_loss"] is not None
    ]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > stopped_at, (stopped_at, steps[-3:])


# --- Disk full -------------------------------------------------------------------------------


def _sha256s(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MB tmpfs: a file system that really runs out of space (needs root, as CI runs)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_the_build_readably_and_loses_nothing(
    small_disk: Path, tmp_path: Path, redis_server: Any
) -> None:
    install = Install(tmp_path, data_dir=small_disk, db_path=tmp_path / "db.sqlite3")
    # The embedded broker keeps its queue under DATA_DIR; the broker here is Redis, as a
    # deployment with a separate data volume would have.
    install.env["CELERY_BROKER_URL"] = f"redis://{redis_server.host}:{redis_server.port}/0"
    install.env["MODEL_CACHE_DIR"] = str(tmp_path / "models")
    try:
        slug = _project_with_tiny_model(install, tmp_path)
        worker = install.start_worker()
        first = install.manage("build", slug, "--recipe", "check", "--wait", "--timeout", "120", timeout=150)
        assert json.loads(first.stdout)["status"] == "succeeded"
        projects = install.data_dir / "projects"
        before = _sha256s(projects)
        pairs = install.query("SELECT COUNT(*) FROM projects_instructionpair")

        # Fill the disk but for a few kilobytes.
        filler = install.data_dir / "filler"
        with filler.open("wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        result = install.manage(
            "build", slug, "--recipe", "lora", "--base", "tiny", "--set", "lora.max_steps=20", *LORA,
            "--wait", "--timeout", "300", timeout=330, check=False,
        )  # fmt: skip
        out = json.loads(result.stdout)
        assert out["status"] == "failed", install.report(str(out))
        assert out["error"].startswith("The disk is full"), out["error"]
        assert "Free some space" in out["error"] and "untouched" in out["error"], out["error"]

        # Nothing the project holds was lost or changed, and the worker is still there.
        assert _sha256s(projects) == before
        assert install.query("SELECT COUNT(*) FROM projects_instructionpair") == pairs
        assert worker.proc.poll() is None, install.report("the worker died")

        filler.unlink()
        again = install.manage(
            "build", slug, "--recipe", "lora", "--base", "tiny", "--set", "lora.max_steps=20", *LORA,
            "--wait", "--timeout", "300", timeout=330, check=False,
        )  # fmt: skip
        assert json.loads(again.stdout)["status"] == "succeeded", install.report(again.stdout)
    finally:
        install.stop_all()


# --- Out of memory ---------------------------------------------------------------------------


def test_out_of_memory_fails_the_build_readably_and_the_worker_lives_on(
    install: Install, tmp_path: Path
) -> None:
    slug = _project_with_tiny_model(install, tmp_path)
    # A second base model about 60 MB in fp32: more than the memory the worker will have left.
    big = make_tiny_llama(
        tmp_path / "big-llama", hidden=512, intermediate=2048, layers=4, heads=8, kv_heads=4
    )
    install.manage("basemodels", "--add", str(big), "--name", "Big", timeout=600)
    worker: Worker = install.start_worker()

    # A first build loads everything training needs (libraries, thread pools) into the pool process.
    warm = install.manage(
        "build", slug, "--recipe", "lora", "--base", "tiny", "--set", "lora.max_steps=5", *LORA,
        "--wait", "--timeout", "300", timeout=330, check=False,
    )  # fmt: skip
    assert json.loads(warm.stdout)["status"] == "succeeded", install.report(warm.stdout)
    (pool,) = worker.pool_pids()
    size = (
        int(
            next(
                line
                for line in Path(f"/proc/{pool}/status").read_text().splitlines()
                if line.startswith("VmSize")
            ).split()[1]
        )
        * 1024
    )
    soft, hard = resource.prlimit(pool, resource.RLIMIT_AS)
    resource.prlimit(pool, resource.RLIMIT_AS, (size + 16 * 2**20, hard))
    try:
        starved = install.manage(
            "build", slug, "--recipe", "lora", "--base", "big", "--set", "lora.max_steps=5", *LORA,
            "--wait", "--timeout", "300", timeout=330, check=False,
        )  # fmt: skip
    finally:
        resource.prlimit(pool, resource.RLIMIT_AS, (soft, hard))
    out = json.loads(starved.stdout)
    assert out["status"] == "failed", install.report(str(out))
    assert "ran out of memory" in out["error"] and "smaller base model" in out["error"], out["error"]

    # The same pool process takes the next build.
    again = install.manage(
        "build", slug, "--recipe", "lora", "--base", "tiny", "--set", "lora.max_steps=5", *LORA,
        "--wait", "--timeout", "300", timeout=330, check=False,
    )  # fmt: skip
    assert json.loads(again.stdout)["status"] == "succeeded", install.report(again.stdout)
    assert worker.pool_pids() == [pool], "the pool process was replaced"


# --- The same message twice; a build that always crashes -----------------------------------

_SEND_AGAIN = """
import sys
from training.tasks import run_build_task
run_build_task.delay(int(sys.argv[1]))
"""


def test_the_same_task_message_delivered_twice_runs_the_build_once(
    install: Install, tmp_path: Path, redis_server: Any
) -> None:
    install.env["CELERY_BROKER_URL"] = f"redis://{redis_server.host}:{redis_server.port}/0"
    src = tmp_path / "src"
    src.mkdir()
    slug = install.prepare([make_pdf(src), make_markdown(src)])
    # Two pool processes, so the two deliveries really run at the same time.
    worker = install.start_worker(concurrency=2)
    build_id = json.loads(install.manage("build", slug, "--recipe", "check").stdout)["build"]
    install.python(_SEND_AGAIN, str(build_id))
    build = _wait_for_end(install, build_id, timeout=120)
    assert build["status"] == "succeeded" and build["attempts"] == 1, install.report(f"build: {build}")
    install.wait_for("both deliveries to be handled", lambda: worker.log().count("run_build_task[") >= 4, 60)
    logs = install.build_logs(build_id)
    assert logs.count("Build started.") == 1 and logs.count("Build finished.") == 1, logs
    assert "not claimable" in worker.log(), install.report("the second delivery was not refused")


def test_a_build_whose_worker_dies_every_time_stops_after_the_last_attempt(
    install: Install, tmp_path: Path
) -> None:
    slug = _project_with_tiny_model(install, tmp_path)
    install.env["BUILD_MAX_ATTEMPTS"] = "2"
    install.start_worker()
    started = install.manage(
        "build", slug, "--recipe", "lora", "--base", "tiny", "--set", "lora.max_steps=3000", *LORA
    )  # fmt: skip
    build_id = json.loads(started.stdout)["build"]
    for attempt in (1, 2):

        def training(attempt: int = attempt) -> bool:
            build = install.build_row(build_id)
            return (
                build["status"] == "running"
                and build["attempts"] == attempt
                and len(_lora_history(install, build_id)) > 0
            )

        install.wait_for(f"attempt {attempt} to train", training, timeout=240)
        dead = int(install.build_row(build_id)["claimed_by"].rpartition(":")[2])
        install.workers[-1].kill()  # as the kernel's OOM killer would, every time
        install.wait_for(f"process {dead} to be reaped", lambda dead=dead: pid_gone(dead), 20)
        install.start_worker(BUILD_STALE_SECONDS="60")

    build = _wait_for_end(install, build_id, timeout=60)
    assert build["status"] == "failed" and build["attempts"] == 2, install.report(f"build: {build}")
    assert "stopped 2 times without finishing" in build["error"] and "memory" in build["error"], build[
        "error"
    ]
    assert install.workers[-1].proc.poll() is None, "the worker that gave up on the build is still running"
