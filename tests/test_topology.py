"""The production topology run for real, as processes: PostgreSQL, Redis, a `cpu` and a `gpu`
Celery worker (as compose.yaml starts them) and gunicorn.

One build goes through both queues (documents indexed on the cpu worker, training on the gpu
worker, conversion and evaluation back on the cpu worker); then the gpu worker is killed
mid-training and its build moves to the cpu worker, resumes from its checkpoint and ends once;
and the broker's late copy of the killed worker's message finds nothing to run.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pytest_redis import factories

from tests.installation import Install, pid_gone
from tests.services import free_port, postgres_server
from tests.tinymodels import make_tiny_llama
from tests.training.test_worker_roundtrip import _two_documents

pytestmark = [pytest.mark.services]

# Its own Redis, as every process-test module keeps one (tests/conftest.py says why).
redis_server = factories.redis_proc(executable="/usr/bin/redis-server", port=None)


@pytest.fixture
def stack(tmp_path: Path, redis_server: Any) -> Iterator[Install]:
    with postgres_server() as database_url:
        install = Install(tmp_path, database_url=database_url)
        install.env.update(
            CELERY_BROKER_URL=f"redis://{redis_server.host}:{redis_server.port}/0",
            # Short, so the test does not wait minutes: a heartbeat every 2 s, a build without one
            # for 20 s is stale, a worker not seen for 30 s is gone, and Redis hands a message its
            # worker never acknowledged to another after 15 s.
            BUILD_HEARTBEAT_SECONDS="2",
            BUILD_STALE_SECONDS="20",
            WORKER_STALE_SECONDS="30",
            # A worker gone is gone at once here (in production a restarting GPU worker keeps
            # its queue for 10 minutes).
            QUEUE_FALLBACK_SECONDS="0",
            BROKER_VISIBILITY_TIMEOUT="15",
            EVAL_MAX_TOKENS="256",
            EVAL_MAX_PAIRS="2",
            EVAL_ANSWER_TOKENS="16",
        )
        try:
            yield install
        finally:
            install.stop_all()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _steps(install: Install, build_id: int) -> dict[str, dict[str, Any]]:
    rows = install.query(
        'SELECT name, status, worker FROM training_buildstep WHERE build_id = ? ORDER BY "index"', (build_id,)
    )
    return {name: {"status": status, "worker": worker} for name, status, worker in rows}


def _ended(install: Install, build_id: int) -> bool:
    return install.build_row(build_id)["status"] not in ("queued", "running")


def _versions(install: Install, build_id: int) -> int:
    return install.query("SELECT COUNT(*) FROM training_modelversion WHERE build_id = ?", (build_id,))[0][0]


def test_two_workers_share_the_queues_and_a_killed_one_hands_its_build_over(
    stack: Install, tmp_path: Path
) -> None:
    install = stack
    tiny = make_tiny_llama(tmp_path / "tiny-llama")
    slug = install.prepare(_two_documents(tmp_path / "src"))
    install.add_pairs(slug)
    install.manage("basemodels", "--add", str(tiny), "--name", "Tiny")
    port = free_port()
    install.start_web(port)
    cpu = install.start_worker(queues="cpu", name="cpu")
    gpu = install.start_worker(queues="gpu", name="gpu")

    def workers() -> set[str]:
        rows = install.query("SELECT name, queues FROM ops_worker WHERE stopped_at IS NULL")
        return {f"{name.partition('@')[0]}:{','.join(q)}" for name, q in rows}

    install.wait_for("both workers to announce themselves", lambda: workers() == {"cpu:cpu", "gpu:gpu"}, 90)
    install.wait_for("gunicorn to answer", lambda: _get(f"http://127.0.0.1:{port}/login/")[0] == 200, 60)
    status, body = _get(f"http://127.0.0.1:{port}/healthz")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok", body
    assert (
        health["checks"]["database"]["vendor"] == "postgresql"
        and health["checks"]["broker"]["status"] == "ok"
    )
    assert health["checks"]["workers"]["queues"] == {"cpu": 1, "gpu": 1}, body

    # 1. Both queues: the build travels cpu -> gpu -> cpu.
    train = ("--base", "tiny", "--set", "lora.batch_tokens=128", "--set", "lora.eval_every=100")
    first = json.loads(
        install.manage(
            "build", slug, "--recipe", "rag,lora", *train, "--set", "lora.max_steps=20",
            "--wait", "--timeout", "600", timeout=650,
        ).stdout
    )  # fmt: skip
    assert first["status"] == "succeeded", install.report(f"first build: {first}")
    ran_on = {
        name: step["worker"].partition("@")[0] for name, step in _steps(install, first["build"]).items()
    }
    assert ran_on["rag"] == "cpu" and ran_on["lora"] == "gpu" and ran_on["evaluate"] == "cpu", ran_on
    assert set(ran_on.values()) == {"cpu", "gpu"}
    logs = install.build_logs(first["build"])
    assert any("handed over to the gpu queue" in m for m in logs), install.report(str(logs))
    assert _versions(install, first["build"]) == 1
    # The web processes' metrics (read from loopback) see the same stack.
    metrics = {
        m.name + str(sorted(s.labels.items())): s.value
        for m in text_string_to_metric_families(_get(f"http://127.0.0.1:{port}/metrics")[1])
        for s in m.samples
    }
    assert metrics["slmstudio_workers_alive[('queue', 'gpu')]"] == 1
    assert metrics["slmstudio_builds[('status', 'succeeded')]"] == 1
    assert metrics["slmstudio_queue_depth[('queue', 'gpu')]"] == 0

    # 2. The gpu worker is killed while it trains: the build moves to the cpu worker.
    started = install.manage(
        "build", slug, "--recipe", "lora", *train,
        "--set", "lora.max_steps=300", "--set", "lora.epochs=1000", "--set", "lora.checkpoint_every=20",
    )  # fmt: skip
    build_id = json.loads(started.stdout)["build"]

    def training_on_gpu() -> bool:
        assert not _ended(install, build_id), install.report("the build ended before the kill")
        lora = install.step_row(build_id, "lora")
        history = [p["step"] for p in lora["metrics"].get("history", [])]
        assert not history or history[-1] < 280, install.report("training nearly finished before the kill")
        return lora["status"] == "running" and bool(history) and history[-1] >= 45

    install.wait_for("training to pass step 45 on the gpu worker", training_on_gpu, timeout=300)
    assert _steps(install, build_id)["lora"]["worker"].startswith("gpu@")
    gpu.kill()
    dead = int(install.build_row(build_id)["claimed_by"].rpartition(":")[2])
    install.wait_for(f"the killed process {dead} to be reaped", lambda: pid_gone(dead), 20)
    install.wait_for("the build to end on the cpu worker", lambda: _ended(install, build_id), timeout=600)

    build = install.build_row(build_id)
    assert build["status"] == "succeeded" and build["attempts"] == 2, install.report(f"build: {build}")
    assert _steps(install, build_id)["lora"]["worker"].startswith("cpu@"), _steps(install, build_id)
    logs = install.build_logs(build_id)
    resumed = [m for m in logs if m.startswith("Resumed training from the checkpoint")]
    assert resumed and int(resumed[0].rsplit(" ", 1)[1].rstrip(".")) >= 40, install.report(str(logs))
    lora = install.step_row(build_id, "lora")["metrics"]
    assert [p["step"] for p in lora["history"] if p["train_loss"] is not None] == list(range(1, 301))
    assert _versions(install, build_id) == 1
    assert install.query("SELECT stopped_at IS NOT NULL FROM ops_worker WHERE name LIKE ?", ("gpu@%",))[0][0]
    health = json.loads(_get(f"http://127.0.0.1:{port}/healthz")[1])
    assert health["checks"]["workers"]["queues"] == {"cpu": 1, "gpu": 0}, health

    # 3. A gpu worker comes back. Redis hands it the killed worker's unacknowledged message
    # (after the visibility timeout); that copy's token is no longer the build's, so it runs nothing.
    settled = (install.build_logs(build_id), _versions(install, build_id))
    again = install.start_worker(queues="gpu", name="gpu")
    install.wait_for(
        "the old message to be delivered again and skipped",
        lambda: f"build {build_id} not claimable" in again.log(),
        timeout=120,
    )
    time.sleep(2)
    assert (install.build_logs(build_id), _versions(install, build_id)) == settled
    assert install.build_row(build_id)["status"] == "succeeded"
    assert cpu.proc.poll() is None, install.report("the cpu worker died")
