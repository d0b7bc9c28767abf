"""Capacity of the production stack on this machine: pages per second and chat tokens per second.

Starts the stack as processes, the way docs/deploy.md runs it without Docker: PostgreSQL
(tests.services.postgres_server), Redis (`redis-server`, no persistence), gunicorn from the
Procfile's `web` line (WEB_WORKERS processes x WEB_THREADS threads) with DATABASE_URL and
CELERY_BROKER_URL set. One user, a project with three short documents and a RAG version over the
bundled SmolLM2-135M (built by `manage.py build --recipe rag --wait` with CELERY_TASK_ALWAYS_EAGER=1
in that one command), an API token. No Celery worker runs (none is needed to chat or read pages).

Measured in one run:

* pages: requests/s, p50/p95 latency of the logged-in documents list and of /healthz (skipped
  when it answers 404) with 1, 4 and 16 client threads (`requests`, a session cookie), for
  --page-seconds each;
* chat: 1 stream alone (--alone-rounds times, one after the other), then 2, 4, 8 and 20
  concurrent `/v1/chat/completions` streams (--chat-rounds times each) of --max-tokens tokens at
  temperature 0, the app's default 4 passages: tokens/s in all and per stream, time to first
  token (median, p95, max). They ask the Debian FAQ's version when it was built (passages of the
  size real documents give, ~900 prompt tokens), else the short documents' one;
* builds: the per-step times of the RAG build, of one over the 17 Debian FAQ pages when the
  Debian package debian-faq is installed (--no-faq skips it), and of a LoRA build cut to
  --lora-steps steps (its fixed costs; --no-lora skips it); each build process's peak memory;
* beside each phase: CPU seconds used by gunicorn, PostgreSQL, Redis, this client and the whole
  machine (so "per core" can be read off, and what other jobs took), the load average before and
  after, peak PostgreSQL connections; at the end the web processes' memory, Redis's memory and
  the size of DATA_DIR.

Before it starts it waits (up to --max-wait seconds) for the 1-minute load average to fall to
--max-load: the machine is shared. Then it runs anyway and records the load.

    .venv/bin/python bench/capacity.py [--page-seconds 15] [--chat-rounds 1] [--no-faq] [--no-lora]

Writes bench/results/capacity.{json,txt}. About 7-9 minutes on the 2-core development machine.
Every process it starts runs in its own process group and is stopped when it ends, also on an
error or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.installation import PYTHON, Install  # noqa: E402
from tests.services import free_port, postgres_server  # noqa: E402

FAQ_DIR = Path("/usr/share/doc/debian/FAQ")
USER, PASSWORD = "alice", "pw-alice-123"  # what Install.prepare creates

DOCS = {
    "pump-manual.md": "# P-200 pump manual\n\n## Installing the pump\n\nBefore connecting the P-200, "
    "install the inlet filter and check that the inlet valve is closed. Mount the pump on a level "
    "surface at least 30 cm from the wall.\n\n## Resetting the pump\n\nTo reset the P-200 pump, hold "
    "the red RESET button for five seconds until the status LED blinks green. Then release it and "
    "wait ten seconds before you start it again.\n\n## Error codes\n\nError E-4021 means the inlet "
    "pressure is too low: open the inlet valve fully and clean the filter. Error E-5002 means the "
    "motor is too hot: switch the pump off for thirty minutes.\n\n## Cleaning the filter\n\nClose "
    "the inlet valve, unscrew the filter housing, rinse the filter under warm water and put it back. "
    "Do this every month, or every week in dusty rooms.\n",
    "vacation-policy.md": "# Vacation policy\n\nEmployees get 25 days of paid vacation per year. "
    "Requests go to your manager at least two weeks ahead; for more than ten days in a row, four "
    "weeks ahead. Unused days expire at the end of March of the following year.\n\n## Public "
    "holidays\n\nPublic holidays are not counted as vacation days. If you work on one, you get a "
    "day off in exchange within three months.\n",
    "office-kitchen.md": "# Office kitchen\n\nThe coffee machine is descaled every Friday by the "
    "team on duty. Label food in the fridge with your name and the date; the fridge is emptied on "
    "Thursdays at 5 pm. Dishes go into the dishwasher, which runs every evening.\n",
}

# Questions that make the bundled model write long answers (temperature 0), so every answer
# runs to --max-tokens: one for each of the 20 concurrent streams, each a different prompt.
QUESTIONS = [
    "Explain in detail, step by step, how to install the P-200 pump.",
    "Explain in detail, step by step, how to reset the P-200 pump.",
    "Describe in detail every error code of the P-200 pump and what to do about each.",
    "Explain in detail how to clean the filter of the P-200 pump.",
    "Describe the vacation policy in detail, with examples.",
    "Explain in detail how public holidays and vacation days work.",
    "Describe in detail the rules of the office kitchen.",
    "Write a detailed guide for a new employee about the office kitchen.",
    "Write a detailed guide for a new employee about vacation requests.",
    "Write a detailed checklist for maintaining the P-200 pump.",
    "Explain in detail what to do when the P-200 pump shows error E-4021.",
    "Explain in detail what to do when the P-200 pump shows error E-5002.",
    "Write a long story about a water pump that learns to sing.",
    "Write a long story about a coffee machine that goes on vacation.",
    "Write a very long essay about the history of pumps.",
    "Write a very long essay about why vacations matter.",
    "Write a detailed plan for a team's vacation schedule over one year.",
    "Explain in detail how to keep an office fridge clean.",
    "Write a detailed training course about pump safety.",
    "Write a long letter to the team about the new kitchen rules.",
]

# The same for the Debian FAQ's version.
FAQ_QUESTIONS = [
    "Explain in detail, step by step, how to install Debian.",
    "Explain in detail how to upgrade Debian to the next release.",
    "Describe in detail the differences between stable, testing and unstable.",
    "Explain in detail how the Debian package management tools work.",
    "Describe in detail how Debian is developed and who maintains it.",
    "Explain in detail how to keep a Debian system up to date.",
    "Describe in detail which architectures and kernels Debian supports.",
    "Explain in detail how to get the Debian installation media.",
    "Write a detailed guide for a new Debian user about dpkg and apt.",
    "Write a detailed guide about contributing to Debian.",
    "Explain in detail how Debian handles free and non-free software.",
    "Explain in detail how to customize a Debian installation.",
    "Describe in detail where to find help and support for Debian.",
    "Write a long story about a Debian package that learns to upgrade itself.",
    "Write a very long essay about the history of the Debian project.",
    "Explain in detail how to build a Debian package from source.",
    "Explain in detail how Debian releases are named and numbered.",
    "Describe in detail how to redistribute Debian on a CD.",
    "Explain in detail what to do before the next Debian release.",
    "Write a detailed checklist for maintaining a Debian server.",
]

_ADD_DOCUMENTS = """
import sys
from pathlib import Path
from projects.models import Project
from projects.services import document_add
project = Project.objects.get(slug=sys.argv[1])
for name in sys.argv[2:]:
    path = Path(name)
    with path.open("rb") as fh:
        document_add(project=project, stream=fh, name=path.name, size=path.stat().st_size)
print(project.documents.count())
"""

_API_TOKEN = """
from django.contrib.auth.models import User
from inference.services import api_token_create
print(api_token_create(user=User.objects.get(username="alice"), name="capacity bench")[1])
"""


# --- processes --------------------------------------------------------------------------------


def stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM to the process group, then SIGKILL; safe to call twice."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    log = (tmp / "redis.log").open("wb")
    proc = subprocess.Popen(
        ["/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(tmp / 'redis.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer in 30 s")
            time.sleep(0.2)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        stop_group(proc)
        log.close()


def procfile_command(name: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError(f"no {name!r} process in the Procfile")


@contextlib.contextmanager
def web_server(env: dict[str, str], log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    log = log_path.open("wb")
    proc = subprocess.Popen(
        ["bash", "-c", "exec " + procfile_command("web")], cwd=ROOT,
        env=env | {"WEB_HOST": "127.0.0.1", "WEB_PORT": str(port)},
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{log_path.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + "/login/", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not answer in 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, proc
    finally:
        stop_group(proc)
        log.close()


def run_in_group(
    cmd: list[str], env: dict[str, str], timeout: float
) -> tuple[subprocess.CompletedProcess, int]:
    """Run a command in its own process group (killed whole on timeout or error); returns the
    result and the peak resident memory of its processes, sampled every 0.2 s."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(proc.pid)
                rss = root.memory_info().rss
                for child in root.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        rss += child.memory_info().rss
                peak[0] = max(peak[0], rss)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        done.set()
        stop_group(proc, grace=5)
        sampler.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak[0]


# --- CPU accounting ---------------------------------------------------------------------------


def tree_cpu_seconds(pid: int | None) -> float:
    """CPU seconds of a process, its live descendants, and the children it has reaped (the
    PostgreSQL backends of closed connections are reaped by the postmaster)."""
    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        t = root.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        children = root.children(recursive=True)
    except psutil.Error:
        return 0.0
    for child in children:
        with contextlib.suppress(psutil.Error):
            c = child.cpu_times()
            total += c.user + c.system + c.children_user + c.children_system
    return total


def machine_busy_seconds() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


class CpuMeter:
    """CPU seconds per part of the stack between start() and stop()."""

    def __init__(self, pids: dict[str, Callable[[], int | None]]) -> None:
        self.pids = pids

    def snapshot(self) -> dict[str, float]:
        snap = {name: tree_cpu_seconds(pid()) for name, pid in self.pids.items()}
        t = psutil.Process().cpu_times()
        snap["client (this script)"] = t.user + t.system
        snap["machine"] = machine_busy_seconds()
        snap["wall"] = time.monotonic()
        return snap

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        d = {k: round(after[k] - before[k], 2) for k in before}
        stack = sum(v for k, v in d.items() if k not in ("machine", "wall"))
        d["other processes"] = round(d["machine"] - stack, 2)
        d["server (gunicorn + postgres + redis)"] = round(
            d.get("gunicorn", 0) + d.get("postgres", 0) + d.get("redis", 0), 2
        )
        return d


class PgConnections:
    """Peak number of client connections to PostgreSQL (this monitor's own excluded)."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.con = psycopg.connect(url, autocommit=True)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                n = self.con.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                ).fetchone()[0]
                self.peak = max(self.peak, n - 1)
            self._stop.wait(0.25)

    def take_peak(self) -> int:
        peak, self.peak = self.peak, 0
        return peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.con.close()


# --- clients ----------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def login(base: str) -> requests.Session:
    session = requests.Session()
    page = session.get(base + "/login/", timeout=30)
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    if not csrf:
        raise RuntimeError(f"no CSRF token on the login page: {page.text[:300]}")
    done = session.post(
        base + "/login/", data={"username": USER, "password": PASSWORD, "csrfmiddlewaretoken": csrf.group(1)},
        allow_redirects=False, timeout=30,
    )  # fmt: skip
    if done.status_code != 302:
        raise RuntimeError(f"log-in failed: HTTP {done.status_code}")
    return session


def load_pages(url: str, cookies: Any, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` threads, each on its own keep-alive connection, GET `url` in a loop."""
    sessions = []
    for _ in range(clients):
        s = requests.Session()
        if cookies is not None:
            s.cookies.update(cookies)
        sessions.append(s)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    ends: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    start = [0.0]

    def client(session: requests.Session) -> None:
        barrier.wait()
        deadline = start[0] + seconds
        mine: list[tuple[float, int]] = []
        while (now := time.perf_counter()) < deadline:
            try:
                r = session.get(url, allow_redirects=False, timeout=60)
                mine.append((time.perf_counter() - now, r.status_code))
            except requests.RequestException as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
        with lock:
            for latency, status in mine:
                latencies.append(latency)
                statuses[status] = statuses.get(status, 0) + 1
            ends.append(time.perf_counter())

    threads = [threading.Thread(target=client, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    start[0] = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    for s in sessions:
        s.close()
    elapsed = max(ends) - start[0]
    ok = statuses.get(200, 0)
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": len(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": errors[:10],
        "requests_per_s": round(ok / elapsed, 1),
        "p50_ms": round(1000 * pct(latencies, 50), 1) if latencies else None,
        "p95_ms": round(1000 * pct(latencies, 95), 1) if latencies else None,
        "max_ms": round(1000 * max(latencies), 1) if latencies else None,
    }


def chat_stream(base: str, token: str, model: str, question: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    result: dict[str, Any] = {"question": question, "error": None, "finish": None, "pieces": 0}
    started = time.perf_counter()
    first = last = None
    try:
        with requests.post(
            base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"},
            stream=True, timeout=(10, 600),
        ) as r:  # fmt: skip
            if r.status_code != 200:
                result["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
                return result | {"seconds": time.perf_counter() - started}
            done = False
            for line in r.iter_lines(chunk_size=None):
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result["usage"] = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if choice["delta"].get("content"):
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        result["pieces"] += 1
                    result["finish"] = choice.get("finish_reason") or result["finish"]
            if not done:
                result["error"] = "the stream ended without [DONE]"
    except (requests.RequestException, ValueError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:300]
    end = time.perf_counter()
    result["start"], result["end"], result["seconds"] = started, end, end - started
    tokens = (result.get("usage") or {}).get("completion_tokens", result["pieces"])
    result["tokens"] = tokens
    result["prompt_tokens"] = (result.get("usage") or {}).get("prompt_tokens")
    if first is not None and last is not None:
        result["ttft_s"] = first - started
        # The tokens after the first, over the time from the first piece to the last: the speed a
        # reader sees once the answer has started (a piece is one token or a few).
        decode = last - first
        result["decode_tokens_per_s"] = (tokens - 1) / decode if decode > 0 else None
    return result


def concurrent_streams(
    base: str, token: str, model: str, n: int, max_tokens: int, questions: list[str], offset: int
) -> dict[str, Any]:
    """`n` streams started together, each with its own question."""
    results: list[dict[str, Any]] = [{} for _ in range(n)]
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        results[i] = chat_stream(base, token, model, questions[(offset + i) % len(questions)], max_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    good = [r for r in results if not r.get("error") and r.get("ttft_s") is not None]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in good)
    ttfts = [r["ttft_s"] for r in good]
    per_stream = [r["decode_tokens_per_s"] for r in good if r.get("decode_tokens_per_s")]
    return {
        "streams": n,
        "wall_s": round(wall, 2),
        "errors": [r["error"] for r in results if r.get("error")],
        "tokens": tokens,
        "answers_at_max_tokens": sum(1 for r in good if r["tokens"] >= max_tokens),
        "prompt_tokens_median": statistics.median(r["prompt_tokens"] for r in good if r["prompt_tokens"])
        if good
        else None,
        "total_tokens_per_s": round(tokens / wall, 1),
        "per_stream_tokens_per_s_median": round(statistics.median(per_stream), 1) if per_stream else None,
        "ttft_median_s": round(statistics.median(ttfts), 2) if ttfts else None,
        "ttft_p95_s": round(pct(ttfts, 95), 2) if ttfts else None,
        "ttft_max_s": round(max(ttfts), 2) if ttfts else None,
        "answer_seconds_max": round(max(r["seconds"] for r in results), 2),
        "each": [
            {
                "ttft_s": round(r["ttft_s"], 2) if r.get("ttft_s") is not None else None,
                "tokens": r.get("tokens"),
                "pieces": r.get("pieces"),
                "prompt_tokens": r.get("prompt_tokens"),
                "tokens_per_s": round(r["decode_tokens_per_s"], 1) if r.get("decode_tokens_per_s") else None,
                "seconds": round(r["seconds"], 2),
                "finish": r.get("finish"),
            }
            for r in results
        ],
    }


# --- the run ----------------------------------------------------------------------------------


def wait_for_quiet(max_load: float, max_wait: float) -> dict[str, Any]:
    started = time.monotonic()
    seen = [round(os.getloadavg()[0], 2)]
    while os.getloadavg()[0] > max_load and time.monotonic() - started < max_wait:
        print(f"load average {os.getloadavg()[0]:.2f} > {max_load}: waiting", flush=True)
        time.sleep(30)
        seen.append(round(os.getloadavg()[0], 2))
    return {
        "max_load": max_load,
        "waited_s": round(time.monotonic() - started),
        "load_1min_seen": seen,
        "quiet_enough": os.getloadavg()[0] <= max_load,
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "git_commit": commit,
        "uncommitted_files": len(dirty.splitlines()),
    }


def du(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def build(install: Install, slug: str, timeout: float, *options: str) -> dict[str, Any]:
    """`manage.py build SLUG OPTIONS --wait`, run inside the command (eager); its steps' times."""
    eager = install.env | {"CELERY_TASK_ALWAYS_EAGER": "1"}
    options = options or ("--recipe", "rag")
    started = time.monotonic()
    done, peak = run_in_group([PYTHON, "manage.py", "build", slug, *options, "--wait"], eager, timeout)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"the build failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    rows = install.query(
        "SELECT name, started_at, ended_at, metrics FROM training_buildstep WHERE build_id = ? ORDER BY index",
        (payload["build"],),
    )
    steps = []
    for name, began, ended, metrics in rows:
        metrics = metrics if isinstance(metrics, dict) else json.loads(metrics or "{}")
        brief = {k: v for k, v in metrics.items() if isinstance(v, int | float | str) and len(str(v)) < 60}
        steps.append({"step": name, "seconds": round((ended - began).total_seconds(), 1), "metrics": brief})
    return {
        "command": " ".join(["manage.py", "build", slug, *options, "--wait"]),
        "build": payload["build"],
        "status": payload["status"],
        "model_version": payload.get("model_version"),
        "command_wall_s": round(wall, 1),
        "peak_rss_mb": round(peak / 2**20),
        "build_folder_mb": round(du(install.data_dir / "builds" / str(payload["build"])) / 2**20, 1),
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page-seconds", type=float, default=15)
    parser.add_argument("--page-clients", default="1,4,16")
    parser.add_argument("--streams", default="2,4,8,20")
    parser.add_argument("--alone-rounds", type=int, default=3)
    parser.add_argument("--chat-rounds", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-load", type=float, default=2.5)
    parser.add_argument("--max-wait", type=float, default=1200)
    parser.add_argument("--no-faq", action="store_true", help="skip the RAG build over the Debian FAQ")
    parser.add_argument("--no-lora", action="store_true", help="skip the short LoRA build")
    parser.add_argument("--lora-steps", type=int, default=3, help="optimizer steps of the LoRA build")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    page_clients = [int(x) for x in args.page_clients.split(",")]
    stream_levels = [int(x) for x in args.streams.split(",")]

    # SIGTERM ends the run through the finally blocks below, which stop every process started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report: dict[str, Any] = {"machine": machine_info()}
    report["load_wait"] = wait_for_quiet(args.max_load, args.max_wait)
    report["started_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    report["loadavg_start"] = loadavg()
    t_start = time.monotonic()
    print(f"start: load average {report['loadavg_start']} on {os.cpu_count()} CPUs", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="slm-capacity-"))
    try:
        with (
            postgres_server() as database_url,
            redis_server(tmp) as (broker_url, redis_proc),
        ):
            install = Install(tmp, database_url=database_url)
            install.env.update(CELERY_BROKER_URL=broker_url, BUILD_HEARTBEAT_THREAD="0")
            docs = tmp / "docs"
            docs.mkdir()
            for name, text in DOCS.items():
                (docs / name).write_text(text)
            t0 = time.monotonic()
            slug = install.prepare(sorted(docs.iterdir()))
            report["setup"] = {"migrate_user_project_s": round(time.monotonic() - t0, 1)}
            print(f"migrated, project {slug} with {len(DOCS)} documents", flush=True)

            builds: dict[str, Any] = {}
            builds["chat project (3 short documents)"] = build(install, slug, 900)
            builds["chat project (3 short documents)"]["documents_bytes"] = sum(
                len(t.encode()) for t in DOCS.values()
            )
            print(f"built: {builds['chat project (3 short documents)']}", flush=True)
            faq = sorted(FAQ_DIR.glob("*.en.html")) if FAQ_DIR.is_dir() else []
            if faq and not args.no_faq:
                faq_slug: str = json.loads(
                    install.manage("createproject", "Debian FAQ", "--owner", USER).stdout
                )["project"]
                install.python(_ADD_DOCUMENTS, faq_slug, *map(str, faq))
                key = f"Debian FAQ ({len(faq)} HTML pages)"
                builds[key] = build(install, faq_slug, 900)
                builds[key]["documents_bytes"] = sum(p.stat().st_size for p in faq)
                print(f"built: {builds[key]}", flush=True)
            if not args.no_lora:
                # The fixed costs of a fine-tuning build (dequantize the base, convert, evaluate)
                # and its memory; training is cut to a few steps (its speed is
                # lora_throughput.py's subject).
                install.add_pairs(slug, 24)
                key = f"LoRA, 24 short pairs, {args.lora_steps} steps"
                builds[key] = build(
                    install, slug, 1200, "--recipe", "lora", "--set", f"lora.max_steps={args.lora_steps}"
                )
                builds[key]["documents_bytes"] = builds["chat project (3 short documents)"]["documents_bytes"]
                print(f"built: {builds[key]}", flush=True)
            report["builds"] = builds
            # Chat with the FAQ's version when there is one: its passages have the size real
            # documents give, and reading them (the prompt) costs as much as writing the answer.
            chat_slug = faq_slug if faq and not args.no_faq else slug
            questions = FAQ_QUESTIONS if chat_slug != slug else QUESTIONS
            token = install.python(_API_TOKEN).stdout.strip().splitlines()[-1]

            web_env = dict(install.env)
            with web_server(web_env, tmp / "web.log") as (base, web_proc):
                pg_data = install.query("SELECT setting FROM pg_settings WHERE name = 'data_directory'")[0][0]
                postmaster = int((Path(pg_data) / "postmaster.pid").read_text().split()[0])
                meter = CpuMeter(
                    {
                        "gunicorn": lambda: web_proc.pid,
                        "postgres": lambda: postmaster,
                        "redis": lambda: redis_proc.pid,
                    }
                )
                pg = PgConnections(database_url)
                phases: list[dict[str, Any]] = []

                def phase(kind: str, label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
                    pg.take_peak()
                    load_before = loadavg()
                    before = meter.snapshot()
                    result = fn()
                    cpu = CpuMeter.delta(before, meter.snapshot())
                    result |= {
                        "kind": kind,
                        "label": label,
                        "cpu_seconds": cpu,
                        "loadavg_before": load_before,
                        "loadavg_after": loadavg(),
                        "pg_connections_peak": pg.take_peak(),
                    }
                    phases.append(result)
                    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}), flush=True)
                    return result

                try:
                    session = login(base)
                    pages = {"documents list": f"{base}/p/{slug}/documents/", "/healthz": f"{base}/healthz"}
                    for name, url in list(pages.items()):
                        for _ in range(5):  # warm-up; also shows the page answers
                            r = session.get(url, allow_redirects=False, timeout=60)
                        if r.status_code == 404:
                            print(f"{name}: 404, skipped", flush=True)
                            report["healthz"] = "404: not in this tree, skipped"
                            del pages[name]
                        elif name == "documents list" and r.status_code != 200:
                            raise RuntimeError(f"{url}: HTTP {r.status_code}")
                        elif name == "/healthz":
                            report["healthz"] = {"status": r.status_code, "body": r.json()}

                    models = requests.get(
                        base + "/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=30
                    ).json()
                    model = next(m["id"] for m in models["data"] if m["owned_by"] == chat_slug)
                    report["chat_version"] = {
                        "project": chat_slug,
                        "model": model,
                        "why": "the Debian FAQ's RAG version: passages of full size (chunks of 1000 characters), "
                        "as a team's own documents give"
                        if chat_slug != slug
                        else "the short documents' RAG version (the FAQ was not built): short passages",
                    }
                    # Load the model and the embedder in every web process.
                    workers = int(web_env.get("WEB_WORKERS", "2"))
                    for i in range(2):
                        threads = [
                            threading.Thread(
                                target=chat_stream, args=(base, token, model, f"Hello, number {i}-{j}?", 4)
                            )
                            for j in range(2 * workers)
                        ]
                        for t in threads:
                            t.start()
                        for t in threads:
                            t.join()

                    for name, url in pages.items():
                        cookies = session.cookies if name == "documents list" else None
                        for clients in page_clients:
                            phase(
                                "page",
                                name,
                                lambda u=url, c=cookies, n=clients: load_pages(u, c, n, args.page_seconds),
                            )

                    def summarize(rounds: list[dict[str, Any]], n: int) -> dict[str, Any]:
                        def med(key: str) -> float | None:
                            values = [r[key] for r in rounds if r.get(key) is not None]
                            return round(statistics.median(values), 2) if values else None

                        return {
                            "streams": n,
                            "rounds": rounds,
                            **{
                                k: med(k)
                                for k in (
                                    "total_tokens_per_s", "per_stream_tokens_per_s_median", "ttft_median_s",
                                    "ttft_p95_s", "ttft_max_s", "wall_s", "prompt_tokens_median",
                                )
                            },
                            "errors": [e for r in rounds for e in r["errors"]],
                            "answers_at_max_tokens": sum(r["answers_at_max_tokens"] for r in rounds),
                            "answers": n * len(rounds),
                        }  # fmt: skip

                    def alone_rounds() -> dict[str, Any]:
                        rounds = [
                            concurrent_streams(base, token, model, 1, args.max_tokens, questions, i)
                            for i in range(args.alone_rounds)
                        ]
                        return summarize(rounds, 1)

                    phase("chat", "1 stream alone", alone_rounds)
                    for n in stream_levels:
                        phase(
                            "chat",
                            f"{n} streams at once",
                            lambda n=n: summarize(
                                [
                                    concurrent_streams(
                                        base, token, model, n, args.max_tokens, questions, 3 * r
                                    )
                                    for r in range(args.chat_rounds)
                                ],
                                n,
                            ),
                        )

                    # Memory and sizes once everything has run.
                    # RSS counts the model file (mapped) in every process that maps it; PSS
                    # shares such pages out among the processes, USS is what one process alone holds.
                    gunicorn = psutil.Process(web_proc.pid)
                    web_workers = [c.memory_full_info() for c in gunicorn.children(recursive=True)]
                    report["memory"] = {
                        "gunicorn_master_rss_mb": round(gunicorn.memory_info().rss / 2**20),
                        "gunicorn_workers_rss_mb": [round(m.rss / 2**20) for m in web_workers],
                        "gunicorn_workers_pss_mb": [round(m.pss / 2**20) for m in web_workers],
                        "gunicorn_workers_uss_mb": [round(m.uss / 2**20) for m in web_workers],
                    }
                    import redis

                    info = redis.Redis.from_url(broker_url).info("memory")
                    report["memory"]["redis_used_memory_mb"] = round(info["used_memory"] / 2**20, 2)
                    report["memory"]["redis_used_memory_peak_mb"] = round(info["used_memory_peak"] / 2**20, 2)
                finally:
                    pg.close()
                report["phases"] = phases
            report["postgres"] = {
                "version": install.query("SHOW server_version")[0][0],
                "max_connections": int(install.query("SHOW max_connections")[0][0]),
                "database_mb": round(install.query("SELECT pg_database_size('postgres')")[0][0] / 2**20, 1),
                "note": "tests.services.postgres_server: a throw-away cluster with fsync=off",
            }
            data_dir = install.data_dir
            report["data_dir_mb"] = {
                p.name: round(du(p) / 2**20, 2) for p in sorted(data_dir.iterdir()) if p.is_dir()
            } | {"total": round(du(data_dir) / 2**20, 2)}
            threads_per_process = int(web_env.get("WEB_THREADS") or 32)
            report["settings"] = {
                "WEB_WORKERS": int(web_env.get("WEB_WORKERS") or 2),
                "WEB_THREADS": threads_per_process,
                "STREAMS_PER_PROCESS": int(
                    web_env.get("STREAMS_PER_PROCESS")
                    or max(1, threads_per_process - max(2, threads_per_process // 4))
                ),
                "DB_CONN_MAX_AGE": int(web_env.get("DB_CONN_MAX_AGE") or 0),
                "defaults": "values not set in the environment are the Procfile's and settings.py's defaults",
                "web_command": procfile_command("web"),
                "max_tokens": args.max_tokens,
                "page_seconds": args.page_seconds,
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["loadavg_end"] = loadavg()
    report["run_seconds"] = round(time.monotonic() - t_start)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "capacity.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = render(report)
    print(text)
    (args.out / "capacity.txt").write_text(text + "\n")


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    cpus = m["cpus"]
    lines = [
        f"Capacity of the production stack (PostgreSQL, Redis, gunicorn from the Procfile: "
        f"{report['settings']['WEB_WORKERS']} processes x {report['settings']['WEB_THREADS']} threads), "
        f"SmolLM2-135M Q4_1 RAG version, on {cpus} CPUs ({m['cpu_model']}), {m['memory_gb']} GB",
        f"started {report.get('started_at', '?')}; load average at start {report['loadavg_start']}, at end {report['loadavg_end']}; waited "
        f"{report['load_wait']['waited_s']} s for load <= {report['load_wait']['max_load']} "
        f"(seen {report['load_wait']['load_1min_seen']}); run {report['run_seconds']} s; commit "
        f"{m['git_commit'][:10]} with {m['uncommitted_files']} uncommitted files in the tree",
        "",
        f"Chat asks {report['chat_version']['model']}: {report['chat_version']['why']}",
        "",
        "Builds (manage.py build ... --wait, eager: the build runs in the command's process):",
    ]
    for name, b in report["builds"].items():
        steps = []
        for s in b["steps"]:
            rate = s["metrics"].get("tokens_per_second") or s["metrics"].get("chunks_per_second")
            unit = "tokens/s" if s["metrics"].get("tokens_per_second") else "chunks/s"
            steps.append(f"{s['step']} {s['seconds']} s" + (f" ({rate} {unit})" if rate else ""))
        lines.append(
            f"  {name}, {b['documents_bytes'] / 1024:.0f} KiB of documents: {b['status']} in "
            f"{b['command_wall_s']} s (command); steps: {', '.join(steps)}; peak memory {b['peak_rss_mb']} MB; "
            f"build folder {b['build_folder_mb']} MB"
        )
    lines += [
        "",
        "Pages (client threads on keep-alive connections, GET in a loop; CPU seconds of the phase):",
        f"{'page':16} {'clients':>7} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7} "
        f"{'server cpu s':>12} {'client cpu s':>12} {'other cpu s':>11} {'req per server cpu-s':>20} "
        f"{'load before->after':>19} {'pg conns':>8}",
    ]
    for p in report["phases"]:
        if p["kind"] != "page":
            continue
        cpu = p["cpu_seconds"]
        p = {k: "–" if v is None else v for k, v in p.items()}
        server = cpu["server (gunicorn + postgres + redis)"]
        ok = p["statuses"].get("200", 0)
        lines.append(
            f"{p['label']:16} {p['clients']:>7} {p['requests_per_s']:>7} {p['p50_ms']:>7} {p['p95_ms']:>7} "
            f"{p['max_ms']:>7} {server:>12} {cpu['client (this script)']:>12} {cpu['other processes']:>11} "
            f"{ok / server if server else 0:>20.0f} "
            f"{p['loadavg_before'][0]:>8} -> {p['loadavg_after'][0]:<7} {p['pg_connections_peak']:>8}"
        )
        if p["errors"] or set(p["statuses"]) != {"200"}:
            lines.append(f"    statuses {p['statuses']}, errors {p['errors'][:3]}")
    lines += [
        "",
        "Chat (/v1/chat/completions streams, temperature 0; medians over the rounds):",
        f"{'case':22} {'tok/s all':>9} {'per core':>8} {'tok/s each':>10} {'TTFT p50':>8} {'TTFT p95':>8} "
        f"{'TTFT max':>8} {'at max':>7} {'prompt':>6} {'server cpu s':>12} {'client cpu s':>12} "
        f"{'other cpu s':>11} {'load before->after':>19} {'pg conns':>8}",
    ]
    for p in report["phases"]:
        if p["kind"] != "chat":
            continue
        cpu = p["cpu_seconds"]
        per_core = f"{p['total_tokens_per_s'] / cpus:.1f}" if p["total_tokens_per_s"] is not None else "–"
        prompt = round(p["prompt_tokens_median"]) if p["prompt_tokens_median"] is not None else None
        p = {k: "–" if v is None else v for k, v in p.items()} | {"prompt": prompt or "–"}
        lines.append(
            f"{p['label']:22} {p['total_tokens_per_s']:>9} {per_core:>8} "
            f"{p['per_stream_tokens_per_s_median']:>10} {p['ttft_median_s']:>8} {p['ttft_p95_s']:>8} "
            f"{p['ttft_max_s']:>8} {p['answers_at_max_tokens']:>3}/{p['answers']:<3} {p['prompt']:>6} "
            f"{cpu['server (gunicorn + postgres + redis)']:>12} {cpu['client (this script)']:>12} "
            f"{cpu['other processes']:>11} {p['loadavg_before'][0]:>8} -> {p['loadavg_after'][0]:<7} "
            f"{p['pg_connections_peak']:>8}"
        )
        for r in p["rounds"]:
            lines.append(
                f"    round: {r['streams']} streams, {r['tokens']} tokens in {r['wall_s']} s = "
                f"{r['total_tokens_per_s']} tok/s; TTFT p50 {r['ttft_median_s']} s, max {r['ttft_max_s']} s"
                + (f"; errors {r['errors'][:2]}" if r["errors"] else "")
            )
    mem = report.get("memory", {})
    pg = report["postgres"]
    lines += [
        "",
        f"Memory after the run: gunicorn master {mem.get('gunicorn_master_rss_mb')} MB, workers "
        f"{mem.get('gunicorn_workers_rss_mb')} MB RSS, {mem.get('gunicorn_workers_pss_mb')} MB PSS, "
        f"{mem.get('gunicorn_workers_uss_mb')} MB USS (model and embedder loaded); Redis used "
        f"{mem.get('redis_used_memory_mb')} MB (peak {mem.get('redis_used_memory_peak_mb')} MB)",
        f"PostgreSQL {pg['version']}: max_connections {pg['max_connections']}, database "
        f"{pg['database_mb']} MB ({pg['note']})",
        f"DATA_DIR after the builds, MB: {report['data_dir_mb']}",
        f"/healthz: {report.get('healthz', {}).get('status') if isinstance(report.get('healthz'), dict) else report.get('healthz')}",
        "server cpu = gunicorn + PostgreSQL + Redis processes; client = this script's request threads "
        "(on the same cores); other = the rest of the machine (other jobs).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
