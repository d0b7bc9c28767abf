"""kill -9 of the worker during embedding, quantization and distillation: the build resumes after
a worker restart, ends with what an unbroken run makes, and leaves nothing twice.

Parsing and LoRA training are killed in tests/training/test_worker_roundtrip.py (also part of
this suite). Everything here runs in real processes (tests/installation.py).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pytest_redis import factories

from tests.installation import Install, pid_gone
from tests.tinymodels import make_tiny_llama
from tests.training.test_worker_roundtrip import _make_manual

pytestmark = [pytest.mark.services]

redis_server = factories.redis_proc(executable="/usr/bin/redis-server", port=None)

# About 1,300 passages: embedding them takes some seconds on two cores, long enough to kill.
DOCUMENTS, PAGES = 10, 30


@pytest.fixture
def install(install: Install) -> Install:
    # The evaluation every build ends with, kept short: it is not what these tests are about.
    install.env.update(EVAL_MAX_TOKENS="256", EVAL_MAX_PAIRS="2", EVAL_ANSWER_TOKENS="16")
    return install


def _step_outputs(install: Install, build_id: int, name: str) -> dict[str, str]:
    rows = install.query(
        "SELECT outputs FROM training_buildstep WHERE build_id = ? AND name = ?", (build_id, name)
    )
    return json.loads(rows[0][0] or "{}")


def _kill_during(install: Install, build_id: int, step: str, ready: Any, timeout: float) -> None:
    """Wait until `ready(step row)` holds while the step runs, then kill -9 the worker's group."""
    worker = install.workers[-1]

    def now() -> bool:
        build = install.build_row(build_id)
        assert build["status"] in ("queued", "running"), install.report(f"build ended early: {build}")
        row = install.step_row(build_id, step)
        assert row["status"] != "succeeded", install.report(f"the {step} step finished before the kill")
        return row["status"] == "running" and ready(row)

    install.wait_for(f"the {step} step to be under way", now, timeout=timeout)
    worker.kill()
    dead = int(install.build_row(build_id)["claimed_by"].rpartition(":")[2])
    install.wait_for(f"the killed process {dead} to be reaped", lambda: pid_gone(dead), 20)


def _finish(install: Install, build_id: int, timeout: float) -> dict[str, Any]:
    install.start_worker(BUILD_STALE_SECONDS="60")
    install.wait_for(
        f"build {build_id} to end",
        lambda: install.build_row(build_id)["status"] not in ("queued", "running"),
        timeout=timeout,
    )
    return install.build_row(build_id)


def _index_rows(index_dir: Path) -> tuple[list[str], int]:
    """(the passages as written, in order; the number of vectors Chroma holds)."""
    lines = (index_dir / "chunks.jsonl").read_text(encoding="utf-8").splitlines()
    con = sqlite3.connect(index_dir / "chroma" / "chroma.sqlite3")
    try:
        (vectors,) = con.execute("SELECT COUNT(*) FROM embeddings").fetchone()
    finally:
        con.close()
    return lines, vectors


def test_kills_during_embedding_and_quantization(install: Install, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    slug = install.prepare([_make_manual(src / f"manual-{i:02}.pdf", i, PAGES) for i in range(DOCUMENTS)])
    install.start_worker()
    recipe = ("--recipe", "rag,quantize:q8_0", "--chunk-chars", "400")
    build_id = json.loads(install.manage("build", slug, *recipe).stdout)["build"]

    # 1. Killed while passages are being embedded.
    _kill_during(
        install, build_id, "rag", lambda row: 0 < row["progress_current"] < row["progress_total"] - 200, 300
    )
    # 2. The next worker re-embeds from scratch into a clean folder; killed again while quantizing.
    install.start_worker(BUILD_STALE_SECONDS="60")
    _kill_during(install, build_id, "quantize", lambda row: "Quantizing" in (row.get("message") or ""), 600)
    build = _finish(install, build_id, timeout=900)
    assert build["status"] == "succeeded" and build["attempts"] == 3, install.report(f"build: {build}")

    # 3. An unbroken build of the same recipe, for comparison.
    install.start_worker()
    unbroken = json.loads(
        install.manage("build", slug, *recipe, "--wait", "--timeout", "900", timeout=950).stdout
    )
    assert unbroken["status"] == "succeeded"

    # The same passages, each embedded once, and the same quantized file.
    resumed_index = install.data_dir / _step_outputs(install, build_id, "rag")["index_dir"]
    fresh_index = install.data_dir / _step_outputs(install, unbroken["build"], "rag")["index_dir"]
    (resumed, resumed_vectors), (fresh, fresh_vectors) = _index_rows(resumed_index), _index_rows(fresh_index)
    assert resumed == fresh and resumed_vectors == fresh_vectors == len(resumed) > 500
    assert len({json.loads(line)["id"] for line in resumed}) == len(resumed)

    def quantized(build: int) -> str:
        (path,) = install.query(
            "SELECT gguf_path FROM training_modelversion WHERE build_id = ? AND quant_type = 'q8_0'", (build,)
        )[0]
        return hashlib.sha256((install.data_dir / path).read_bytes()).hexdigest()

    assert quantized(build_id) == quantized(unbroken["build"])
    # One version per build and no folder left half-written (temporary names start with a dot).
    assert install.query("SELECT build_id, COUNT(*) FROM training_modelversion GROUP BY build_id") == [
        (build_id, 1), (unbroken["build"], 1),
    ]  # fmt: skip
    leftovers = [p for p in (install.data_dir / "builds" / str(build_id)).rglob(".*") if p.name != ".gitkeep"]
    assert not leftovers, leftovers


def test_a_kill_during_distillation_resumes_without_asking_the_teacher_again(
    install: Install, tmp_path: Path, redis_server: Any
) -> None:
    install.env["CELERY_BROKER_URL"] = f"redis://{redis_server.host}:{redis_server.port}/0"
    src = tmp_path / "src"
    src.mkdir()
    slug = install.prepare([_make_manual(src / "manual.pdf", 0, 2)])
    install.add_pairs(slug)
    student = make_tiny_llama(tmp_path / "student", seed=0)
    teacher = make_tiny_llama(tmp_path / "teacher", seed=1)
    install.manage("basemodels", "--add", str(student), "--name", "Student")
    added = json.loads(install.manage("addteacher", slug, "Big brother", "--path", str(teacher)).stdout)
    install.start_worker()
    build_id = json.loads(
        install.manage(
            "build", slug, "--recipe", "distill", "--base", "student",
            "--set", f"distill.teacher={added['teacher']}", "--set", "distill.mode=logits",
            "--set", "lora.max_steps=300", "--set", "lora.epochs=1000", "--set", "lora.checkpoint_every=20",
            "--set", "lora.batch_tokens=128", "--set", "lora.eval_every=100000",
        ).stdout
    )["build"]  # fmt: skip

    def trained(row: dict[str, Any]) -> bool:
        steps = [p["step"] for p in row["metrics"].get("history", [])]
        return bool(steps) and steps[-1] >= 45

    _kill_during(install, build_id, "distill", trained, timeout=300)
    killed_at = install.step_row(build_id, "distill")["metrics"]["history"][-1]["step"]
    build = _finish(install, build_id, timeout=400)
    assert build["status"] == "succeeded" and build["attempts"] == 2, install.report(f"build: {build}")

    logs = install.build_logs(build_id)
    resumed = [m for m in logs if m.startswith("Resumed training from the checkpoint")]
    assert resumed, install.report("no resume logged")
    checkpoint = int(resumed[0].rsplit(" ", 1)[1].rstrip("."))
    # The last checkpoint before the kill: a multiple of checkpoint_every. The history seen in the
    # database (written every few seconds) may lag the step the process had reached, so it bounds
    # the checkpoint from below only.
    assert checkpoint % 20 == 0 and killed_at - 20 <= checkpoint < 300, (checkpoint, killed_at)
    history = install.step_row(build_id, "distill")["metrics"]["history"]
    assert [p["step"] for p in history if p["train_loss"] is not None] == list(range(1, 301))
    assert all(p.get("distill_loss") is not None for p in history)
    # The teacher's logits were cached before the kill and read back, not computed again.
    assert "Teacher logits read from" in install.workers[-1].log(), install.report("the teacher ran again")
    assert install.query("SELECT COUNT(*) FROM training_modelversion") == [(1,)]
