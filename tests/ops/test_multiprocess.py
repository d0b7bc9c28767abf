"""Several web processes, one set of numbers: answers observed in different processes add up in
one scrape (prometheus_client's multiprocess mode), and gunicorn started from the Procfile's own
line gets a metrics folder of its own, shared by its workers and removed when it stops."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.installation import PYTHON, ROOT, Install
from tests.services import free_port

# One web process answering `n` questions: two pieces each, the first after 1.5 s.
_ANSWER = """
import sys, time
from ops.metrics import answer_observed

class Result:
    finish_reason = "stop"
    tokens_per_second = 40.0

def pieces():
    yield "Hold"
    yield " RESET."

for _ in range(int(sys.argv[1])):
    list(answer_observed(pieces(), Result(), started=time.perf_counter() - 1.5))
"""

_SCRAPE = "import django; django.setup()\nfrom ops.metrics import exposition\nprint(exposition().decode())"


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_answers_observed_in_separate_processes_add_up(install: Install, tmp_path: Path):
    metrics_dir = tmp_path / "metrics"
    env = {**install.env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    for n in (1, 2):
        subprocess.run([PYTHON, "-c", _ANSWER, str(n)], cwd=ROOT, env=env, check=True, timeout=60)
    assert len(glob.glob(str(metrics_dir / "histogram_*.db"))) == 2  # one file per process
    scraped = subprocess.run(
        [PYTHON, "-c", _SCRAPE], cwd=ROOT, env=env, check=True, timeout=60, capture_output=True, text=True
    )
    samples = _samples(scraped.stdout)
    assert samples[("slmstudio_chat_first_token_seconds_count", ())] == 3
    assert samples[("slmstudio_chat_first_token_seconds_sum", ())] == pytest.approx(4.5, abs=0.5)
    assert samples[("slmstudio_chat_answer_seconds_count", (("outcome", "stop"),))] == 3
    assert samples[("slmstudio_chat_tokens_per_second_sum", ())] == pytest.approx(120)
    # No database in this installation: the scrape says so and still answers.
    assert samples[("slmstudio_database_up", ())] == 0


def _procfile_web() -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no web process in the Procfile")


@contextlib.contextmanager
def _gunicorn(install: Install, tmp_path: Path, **env: str):  # type: ignore[no-untyped-def]
    port = free_port()
    log = (tmp_path / f"gunicorn-{port}.log").open("wb")
    proc = subprocess.Popen(
        ["bash", "-c", "exec " + _procfile_web()],
        cwd=ROOT,
        env={**install.env, "WEB_PORT": str(port), "WEB_WORKERS": "2", "WEB_THREADS": "4", **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / f"gunicorn-{port}.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=5).status_code in (200, 503):
                    break
            assert time.monotonic() < deadline, "gunicorn did not answer in 90 s"
            time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


@pytest.mark.services
def test_gunicorn_from_the_procfile_gets_a_metrics_folder_of_its_own(install: Install, tmp_path: Path):
    install.manage("migrate", "--noinput")
    temp = tmp_path / "tmp"
    temp.mkdir()
    with _gunicorn(install, tmp_path, TMPDIR=str(temp)) as (url, proc):
        health = httpx.get(url + "/healthz", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "degraded"  # no worker yet
        for _ in range(10):  # reach both processes
            scraped = httpx.get(url + "/metrics", timeout=10)
            assert scraped.status_code == 200
        samples = _samples(scraped.text)
        assert samples[("slmstudio_builds", (("status", "queued"),))] == 0
        assert samples[("slmstudio_broker_up", ())] == 1
        (folder,) = temp.glob("slmstudio-metrics-*")
        # Each web process writes its own files there (its chat histograms exist from import).
        pids = {int(p.stem.rsplit("_", 1)[1]) for p in folder.glob("histogram_*.db")}
        assert pids and proc.pid not in pids
    assert not folder.exists()  # removed with the server

    # A folder the operator chose instead: emptied at start (a previous server's numbers would
    # count again), kept at exit.
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    (chosen / "histogram_99999.db").write_bytes(b"left by the previous server")
    with _gunicorn(install, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(chosen)) as (url, _):
        assert httpx.get(url + "/metrics", timeout=10).status_code == 200
        assert not (chosen / "histogram_99999.db").exists()
        assert list(chosen.glob("histogram_*.db"))
    assert chosen.exists()
