"""Worker start-up: recover what a killed worker left behind, then keep checking.

The embedded broker loses a message whose worker is killed (see FACTS.md), and Redis only
redelivers after its visibility timeout; so recovery comes from our own job table.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready, worker_shutdown
from django.conf import settings
from django.db import connections

log = logging.getLogger(__name__)
_stop = threading.Event()


def sweep() -> None:
    from datetime import timedelta

    from projects.services import documents_requeue_stale

    from .services import builds_recover_stale
    from .teachers import generation_runs_recover_stale

    try:
        builds = builds_recover_stale()
        runs = generation_runs_recover_stale()
        if runs:
            log.info("recovered stale generation runs %s", runs)
        docs = documents_requeue_stale(stale_after=timedelta(seconds=settings.BUILD_STALE_SECONDS))
        if builds or docs:
            log.info("re-queued stale builds %s and documents %s", builds, docs)
    except Exception:
        log.exception("stale-job sweep failed")
    finally:
        # This runs in the worker's parent process; a connection left open would be inherited
        # by forked pool children.
        connections.close_all()


def _loop() -> None:
    while not _stop.wait(settings.BUILD_STALE_SECONDS / 2):
        sweep()


@worker_ready.connect
def _on_worker_ready(**kwargs: object) -> None:
    sweep()
    threading.Thread(target=_loop, daemon=True, name="stale-sweep").start()


@worker_shutdown.connect
def _on_worker_shutdown(**kwargs: object) -> None:
    _stop.set()
