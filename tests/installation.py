"""One installation of the app for tests that drive real processes: its own DATA_DIR and
file-based SQLite database, `manage.py` commands and `celery worker` processes started with a
clean environment, and read-only SQL on that database to watch progress.

Used by tests/training/test_worker_roundtrip.py and the fault suite in tests/abuse/.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Variables the test process sets for itself (tests/testenv.py, pytest-django) that must not leak
# into the installation under test.
_SCRUBBED = {
    "SLMSTUDIO_TEST_DATA_DIR",
    "DATA_DIR",
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "CELERY_TASK_ALWAYS_EAGER",
    "BUILD_HEARTBEAT_THREAD",
    "BUILD_STALE_SECONDS",
    "DJANGO_ALLOW_ASYNC_UNSAFE",
    "SECRET_KEY",
    "PYTEST_CURRENT_TEST",
    "PYTEST_XDIST_WORKER",
}

# Prefixed to `python -c` snippets that use the ORM of the installation under test.
_DJANGO = "import django; django.setup()\n"

_CREATE_USER = (
    "from django.contrib.auth.models import User; User.objects.create_user('alice', password='pw-alice-123')"
)

# Stores files as documents without parsing them (what a large upload does): they stay "pending"
# until a worker reads them, so a succeeded build proves the worker did.
_ADD_DOCUMENTS = """
import sys
from pathlib import Path
from projects.models import Document, Project
from projects.services import document_add
project = Project.objects.get(slug=sys.argv[1])
for name in sys.argv[2:]:
    path = Path(name)
    with path.open("rb") as fh:
        added = document_add(project=project, stream=fh, name=path.name, size=path.stat().st_size)
    assert not added.duplicate, f"{name} is a duplicate"
assert not project.documents.exclude(status=Document.Status.PENDING).exists()
print(project.documents.count())
"""


_ADD_PAIRS = """
import sys
from projects.models import Project
from projects.services import pair_create
project = Project.objects.get(slug=sys.argv[1])
for i in range(int(sys.argv[2])):
    pair_create(project=project, instruction=f"How do I reset pump P-{i}00?", input="", response=f"Hold RESET for {i + 2} seconds.")
"""


class Worker:
    """`celery worker` in its own process group, logging to a file."""

    def __init__(
        self, env: dict[str, str], log_path: Path, *, concurrency: int = 1, queues: str = "", name: str = ""
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        # As the Procfile and compose.yaml start them: `-Q cpu` / `-Q gpu` for a worker that takes
        # one queue (none: both), a node name telling them apart.
        only = ["-Q", queues] if queues else []
        named = ["--hostname", f"{name}@%h"] if name else []
        self.name = name
        self.proc = subprocess.Popen(
            [
                PYTHON, "-m", "celery", "-A", "slmstudio", "worker", *only, *named,
                "--loglevel", "INFO", "--concurrency", str(concurrency), "--without-mingle", "--without-gossip",
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session: the worker leads its own group

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pool_pids(self) -> list[int]:
        """The pool processes that run tasks (children of the main process)."""
        import psutil

        try:
            return [child.pid for child in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def terminate_main(self) -> None:
        """SIGTERM to the main process only, as `docker stop` and Kubernetes send it."""
        os.kill(self.proc.pid, signal.SIGTERM)

    def terminate_group(self) -> None:
        """SIGTERM to every process of the worker, as systemd or a terminal's Ctrl-C send it."""
        os.killpg(self.pgid, signal.SIGTERM)

    def exited(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        """kill -9 the whole group (main process and pool children), as a crash or OOM would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()

    def stop(self) -> None:
        """SIGTERM (warm shutdown), then SIGKILL after a few seconds. Safe to call twice."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        # The group may outlive its leader (a pool child finishing a task): always sweep it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._log.close()


class Install:
    """One installation: its DATA_DIR, its environment, its processes."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        data_dir: Path | None = None,
        db_path: Path | None = None,
        database_url: str | None = None,
    ) -> None:
        self.tmp_path = tmp_path  # logs go here
        # conftest already made tmp_path/data for the test process
        self.data_dir = data_dir or tmp_path / "install"
        self.data_dir.mkdir(exist_ok=True)
        # The database inside DATA_DIR as installed by default, or elsewhere (a disk-full test
        # fills DATA_DIR's file system, not the database's).
        self.db_path = db_path or self.data_dir / "db.sqlite3"
        self.env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
        self.env.update(
            DJANGO_SETTINGS_MODULE="slmstudio.settings",
            DATA_DIR=str(self.data_dir),
            CELERY_TASK_ALWAYS_EAGER="0",
            BUILD_HEARTBEAT_THREAD="1",
            PYTHONUNBUFFERED="1",
        )
        if db_path is not None:
            self.env["DATABASE_URL"] = f"sqlite:///{db_path}"
        # PostgreSQL instead of SQLite (the production stack); query() then reads it.
        self.database_url = database_url
        if database_url:
            self.env["DATABASE_URL"] = database_url
        self.workers: list[Worker] = []
        self.webs: list[subprocess.Popen] = []
        self.outputs: list[str] = []

    # --- processes ---------------------------------------------------------------------------

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            list(args), cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        self.outputs.append(
            f"$ {' '.join(args)[:200]}\n[rc {proc.returncode}]\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
        )
        if check:
            assert proc.returncode == 0, self.report(f"command failed: {' '.join(args)[:200]}")
        return proc

    def manage(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return self.run(PYTHON, "manage.py", *args, **kwargs)

    def python(self, code: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return self.run(PYTHON, "-c", _DJANGO + code, *args, **kwargs)

    def start_worker(
        self, *, concurrency: int = 1, queues: str = "", name: str = "", **extra_env: str
    ) -> Worker:
        env = {**self.env, **({"WORKER_QUEUES": queues} if queues else {}), **extra_env}
        log = self.tmp_path / f"worker-{len(self.workers) + 1}{'-' + name if name else ''}.log"
        worker = Worker(env, log, concurrency=concurrency, queues=queues, name=name)
        self.workers.append(worker)
        return worker

    def start_web(self, port: int, *, workers: int = 2, threads: int = 8) -> subprocess.Popen:
        """gunicorn as the Procfile starts it, on 127.0.0.1:`port`."""
        log = (self.tmp_path / f"web-{len(self.webs) + 1}.log").open("wb")
        web = subprocess.Popen(
            [
                str(Path(PYTHON).parent / "gunicorn"), "slmstudio.wsgi", "-c", "slmstudio/gunicorn.conf.py",
                "--bind", f"127.0.0.1:{port}",
                "--worker-class", "gthread", "--workers", str(workers), "--threads", str(threads),
                "--timeout", "120",
            ],
            cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.webs.append(web)
        return web

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()
        for web in self.webs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(web.pid, signal.SIGTERM)
            try:
                web.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(web.pid, signal.SIGKILL)
                web.wait(timeout=10)

    def report(self, message: str) -> str:
        """An assertion message with what the processes printed, so a failure explains itself."""
        parts = [message]
        for i, worker in enumerate(self.workers, start=1):
            parts.append(f"----- worker {i} log ({worker.log_path}) -----\n{worker.log()[-8000:]}")
        parts.append("----- commands -----\n" + "\n".join(self.outputs[-4:]))
        return "\n".join(parts)

    # --- setup -------------------------------------------------------------------------------

    def prepare(self, documents: list[Path]) -> str:
        """Migrate, create a user and a project, store `documents` unparsed. Returns the slug."""
        self.manage("migrate", "--noinput", "-v", "0")
        self.python(_CREATE_USER)
        slug = json.loads(self.manage("createproject", "Pump manuals", "--owner", "alice").stdout)["project"]
        added = self.python(_ADD_DOCUMENTS, slug, *map(str, documents))
        assert int(added.stdout.strip()) == len(documents), self.report("documents not stored")
        return slug

    def add_pairs(self, slug: str, count: int = 12) -> None:
        """`count` short instruction pairs, enough for a tiny model to train on."""
        self.python(_ADD_PAIRS, slug, str(count))

    # --- reading the installation's database -------------------------------------------------

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Read-only SQL with `?` placeholders, on SQLite or PostgreSQL."""
        if self.database_url:
            import psycopg

            with psycopg.connect(self.database_url, autocommit=True) as con:
                con.read_only = True
                return con.execute(sql.replace("?", "%s"), params).fetchall()
        con = sqlite3.connect(self.db_path, timeout=20)
        try:
            con.execute("PRAGMA query_only = 1")
            return con.execute(sql, params).fetchall()
        finally:
            con.close()

    def build_row(self, build_id: int) -> dict[str, Any]:
        cols = ("status", "attempts", "claimed_by", "error")
        row = self.query(f"SELECT {', '.join(cols)} FROM training_build WHERE id = ?", (build_id,))[0]
        return dict(zip(cols, row, strict=False))

    def step_row(self, build_id: int, name: str) -> dict[str, Any]:
        cols = ("status", "progress_current", "progress_total", "metrics", "message")
        row = self.query(
            f"SELECT {', '.join(cols)} FROM training_buildstep WHERE build_id = ? AND name = ?",
            (build_id, name),
        )[0]
        step = dict(zip(cols, row, strict=False))
        metrics = step["metrics"]  # text in SQLite, decoded already from PostgreSQL's jsonb
        step["metrics"] = metrics if isinstance(metrics, dict) else json.loads(metrics or "{}")
        return step

    def document_statuses(self) -> dict[int, str]:
        return dict(self.query("SELECT id, status FROM projects_document"))

    def build_logs(self, build_id: int) -> list[str]:
        rows = self.query("SELECT message FROM training_buildlog WHERE build_id = ? ORDER BY id", (build_id,))
        return [message for (message,) in rows]

    def wait_for(self, what: str, condition: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(self.report(f"timed out after {timeout:.0f} s waiting for {what}"))
            time.sleep(0.1)


def pid_gone(pid: int) -> bool:
    """True once the process has been reaped (a zombie still answers kill(pid, 0))."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # gone between open and read: ProcessLookupError, not FileNotFoundError
        return True
    return state == "X"
