"""Worker start-up and shut-down: recover what a killed worker left behind, keep checking, and
hand running builds back to the queue when the worker is told to stop.

The embedded broker loses a message whose worker is killed (see FACTS.md), and Redis only
redelivers after its visibility timeout; so recovery comes from our own job table.

SIGTERM (a deploy or restart) must not cost a build its progress nor count as a failure. It
reaches the worker in two ways, and both end the same way (the running step stops at its next
safe point, a training step writes a checkpoint, and the build is queued again; the next sweep
of a running worker, or of this one once restarted, sends it to a worker):
- to the main process only (docker stop, Kubernetes): Celery's warm shutdown waits for running
  tasks, so `_on_shutting_down` marks the builds its pool processes run (requeue_requested_at),
  which their steps read within a second;
- to every process of the worker (systemd, a terminal's Ctrl-C, honcho): a pool process would
  die at once (billiard's handler), so while a build runs `sigterm_stops_builds` replaces that
  handler with one that raises the flag instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from django.conf import settings
from django.db import connections

log = logging.getLogger(__name__)
_stop = threading.Event()
# Set when this worker starts its shut-down: from then on it sends no task messages, since it
# could still take them itself.
_shutting_down = threading.Event()


def sweep() -> None:
    from datetime import timedelta

    from ops.queues import node_name
    from ops.services import worker_seen, workers_forget_old, workers_gone_on_this_host
    from projects.services import documents_requeue_stale

    from .services import (
        builds_dispatch_requeued,
        builds_recover_stale,
        builds_reroute_stranded,
        builds_resend_unsent,
    )
    from .teachers import generation_runs_recover_stale

    try:
        if node_name():
            # Also while shutting down: a worker finishing its builds is still there.
            worker_seen(name=node_name())
    except Exception:
        log.exception("could not touch this worker's registry row")
    if _shutting_down.is_set():
        connections.close_all()
        return
    stale_docs = timedelta(seconds=settings.BUILD_STALE_SECONDS)
    # Each job on its own: one that fails (the broker unreachable) does not skip the others.
    jobs: list[tuple[Callable[[], object], str]] = [
        (workers_forget_old, ""),
        (workers_gone_on_this_host, "workers %s of this host are gone; their queues no longer count"),
        (builds_reroute_stranded, "builds %s waited in a queue no worker consumes any more; sent elsewhere"),
        (
            builds_resend_unsent,
            "builds %s never reached a worker (the broker did not take or lost them); sent again",
        ),
        (builds_dispatch_requeued, "resuming builds %s that a stopping worker handed back"),
        (builds_recover_stale, "re-queued stale builds %s"),
        (generation_runs_recover_stale, "recovered stale generation runs %s"),
        (lambda: documents_requeue_stale(stale_after=stale_docs), "re-queued stale documents %s"),
    ]
    try:
        for job, message in jobs:
            try:
                found = job()
            except Exception:
                log.exception("stale-job sweep: %s failed", getattr(job, "__name__", "a job"))
                continue
            if found and message:
                log.warning(message, found)
    finally:
        # This runs in the worker's parent process; a connection left open would be inherited
        # by forked pool children.
        connections.close_all()


def _loop() -> None:
    while not _stop.wait(settings.BUILD_STALE_SECONDS / 2):
        sweep()


@worker_ready.connect
def _on_worker_ready(sender: object = None, **kwargs: object) -> None:
    from ops.queues import consumed_queues, node_name
    from ops.services import worker_register

    try:
        # Announced before the first sweep, so the sweep already counts this worker's queues.
        worker_register(
            name=node_name() or "worker",
            queues=sorted(consumed_queues() or ()),
            concurrency=getattr(getattr(sender, "controller", None), "concurrency", None),
        )
    except Exception:  # a worker that cannot announce itself still works; the sweep says why
        log.exception("could not register this worker")
    sweep()
    threading.Thread(target=_loop, daemon=True, name="stale-sweep").start()


@worker_shutdown.connect
def _on_worker_shutdown(**kwargs: object) -> None:
    from ops.queues import node_name
    from ops.services import worker_stopped

    _stop.set()
    try:
        if node_name():
            worker_stopped(name=node_name())
    except Exception:
        log.exception("could not sign this worker off")
    finally:
        connections.close_all()


@worker_shutting_down.connect
def _on_shutting_down(**kwargs: object) -> None:
    import psutil

    from .services import builds_stop_for_shutdown

    _shutting_down.set()
    me = psutil.Process()
    pids = {me.pid} | {child.pid for child in me.children(recursive=True)}
    try:
        stopping = builds_stop_for_shutdown(pids=pids)
        if stopping:
            log.warning("shutting down: builds %s stop at their next safe point and are re-queued", stopping)
    except Exception:  # a shutdown must go on even when the database cannot be reached
        log.exception("could not hand running builds back to the queue")
    finally:
        connections.close_all()


@contextlib.contextmanager
def sigterm_stops_builds() -> Iterator[None]:
    """While a build task runs in a pool process: SIGTERM raises SHUTDOWN_REQUESTED instead of
    ending the process (billiard's handler would exit at once, losing the step's progress), and
    the build stops at its next safe point. A second SIGTERM does what the first would have."""
    from .steps import SHUTDOWN_REQUESTED

    if threading.current_thread() is not threading.main_thread():  # a threads pool: no signals
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def terminate(signum: int, frame: object) -> None:
        SHUTDOWN_REQUESTED.set()
        signal.signal(signal.SIGTERM, previous)
        log.warning("pool process %s: SIGTERM; the build stops at its next safe point", os.getpid())

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
