"""Gunicorn settings the Procfile's `web` line loads (`-c slmstudio/gunicorn.conf.py`): the web
processes share one set of Prometheus metrics.

Gunicorn answers from several processes, each counting for itself, and a scrape reaches one of
them. In prometheus_client's multiprocess mode every process writes its samples to files in
PROMETHEUS_MULTIPROC_DIR and /metrics adds up all the files, those of exited processes too. So
the folder must
- be set before any web process imports prometheus_client (it picks its storage at import):
  here, in the master, which the workers fork from;
- start empty, or a restarted server would count the previous one's answers again;
- belong to this server alone: two servers sharing one would add up each other's numbers and
  wipe each other's files. Hence, by default, a fresh temporary folder per server, removed when
  it stops, rather than one under DATA_DIR (which web and worker machines may share).
Command-line options still win over this file. Only the web server reads it; workers and
management commands keep their numbers in memory.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile

# Set once the folder is ready: a reload (SIGHUP) runs this file again in the same master, and
# its numbers go on. _OWNED marks a folder this file created (removed at exit), not one the
# operator chose.
_READY, _OWNED = "SLMSTUDIO_METRICS_DIR_READY", "SLMSTUDIO_METRICS_DIR_OWNED"

_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
if not _dir:
    _dir = tempfile.mkdtemp(prefix="slmstudio-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ[_OWNED] = _dir
elif os.environ.get(_READY) != _dir:
    os.makedirs(_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(_dir, "*.db")):
        os.remove(stale)
os.environ[_READY] = _dir


def child_exit(server: object, worker: object) -> None:
    # Live gauges of a dead worker must not be summed any more (counters and histograms stay).
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]


def on_exit(server: object) -> None:
    if os.environ.get(_OWNED) == _dir:
        shutil.rmtree(_dir, ignore_errors=True)
