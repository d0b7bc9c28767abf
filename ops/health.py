"""Is this installation healthy? Four checks for /healthz: database, broker, workers, disk.

Each check says "ok", "degraded" (something a person should look at, but pages work) or
"failing" (requests or builds fail now); the report takes the worst. Anonymous callers (a load
balancer) learn states and numbers; staff also get names, paths and error messages, which say
where things live.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection

from .broker import broker_probe, finish, start, transport
from .models import Worker
from .queues import QUEUES

OK, DEGRADED, FAILING = "ok", "degraded", "failing"
_RANK = {OK: 0, DEGRADED: 1, FAILING: 2}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def check_database(*, details: bool) -> dict[str, Any]:
    # In the request's own thread and connection: Django connections belong to their thread. A
    # database that hangs is bounded by its own timeouts (SQLite's busy timeout; PostgreSQL:
    # add ?connect_timeout=5 to DATABASE_URL).
    started = time.perf_counter()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:
        report = {"status": FAILING, "message": "The database cannot be reached."}
        return report | ({"error": _error(exc)} if details else {})
    return {"status": OK, "vendor": connection.vendor, "ms": _ms(time.perf_counter() - started)}


def check_broker(*, details: bool) -> dict[str, Any]:
    state = broker_probe()
    if not state.reachable:
        report = {
            "status": FAILING,
            "transport": transport(),
            "ms": _ms(state.seconds),
            "message": "The task broker cannot be reached: builds and uploads cannot be queued.",
        }
        return report | ({"error": state.error} if details else {})
    return {"status": OK, "transport": transport(), "ms": _ms(state.seconds), "queues": state.depths}


def check_workers(*, details: bool) -> dict[str, Any]:
    try:
        alive = list(Worker.objects.alive().only("name", "queues"))
    except Exception as exc:  # the database check already fails the report
        report = {"status": FAILING, "message": "The worker registry cannot be read."}
        return report | ({"error": _error(exc)} if details else {})
    serving = Counter(q for worker in alive for q in worker.queues)
    report: dict[str, Any] = {"alive": len(alive), "queues": {q: serving.get(q, 0) for q in QUEUES}}
    if details:
        report["workers"] = [w.name for w in alive]
    if not alive:
        # Pages and chat still work; only builds and large uploads wait.
        return {"status": DEGRADED, "message": "No worker is running: builds wait until one starts."} | report
    return {"status": OK} | report


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_disk(
    *, details: bool, pending: Future[int] | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Free space under DATA_DIR; `pending` is that measurement already started (health_report
    runs it beside the other checks)."""
    path = Path(settings.DATA_DIR)
    minimum = settings.HEALTH_MIN_FREE_MB
    where = {"path": str(path)} if details else {}
    try:
        # On the probe pool, bounded: statvfs on a dead network mount blocks.
        future = pending or start(lambda: _free_bytes(path))
        free = finish(future, timeout=settings.HEALTH_TIMEOUT_SECONDS if timeout is None else timeout)
    except Exception as exc:
        report = {"status": FAILING, "message": "The data folder's disk cannot be read."} | where
        return report | ({"error": _error(exc)} if details else {})
    report = {"free_mb": free // 2**20, "min_free_mb": minimum} | where
    if free < minimum * 2**20:
        message = f"Less than {minimum} MB free for uploads, models and the database."
        return {"status": FAILING, "message": message} | report
    return {"status": OK} | report


def health_report(*, details: bool = False) -> dict[str, Any]:
    """{"status": worst of the checks, "checks": {name: {"status", ...}}}. Answers within about
    HEALTH_TIMEOUT_SECONDS (plus the database's own time): the disk is measured while the
    database, broker and workers are checked."""
    deadline = time.monotonic() + settings.HEALTH_TIMEOUT_SECONDS
    disk_free = start(lambda: _free_bytes(Path(settings.DATA_DIR)))
    checks = {"database": check_database(details=details), "broker": check_broker(details=details)}
    if checks["database"]["status"] == FAILING:
        # The registry is in the database: a second wait for it would only say the same thing.
        checks["workers"] = {"status": FAILING, "message": "The worker registry is in the database."}
    else:
        checks["workers"] = check_workers(details=details)
    remaining = max(0.1, deadline - time.monotonic())
    checks["disk"] = check_disk(details=details, pending=disk_free, timeout=remaining)
    worst = max((c["status"] for c in checks.values()), key=_RANK.__getitem__)
    return {"status": worst, "checks": checks}
