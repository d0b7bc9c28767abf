"""The Celery broker as the web process sees it: can it be reached, how many messages wait.

Every probe runs on a small shared thread pool and is given up after a few seconds, so a broker
that hangs (a firewall dropping packets, a full disk under the embedded broker) makes /healthz
and /metrics answer "unreachable" quickly instead of holding a web thread for minutes. A probe
still hanging keeps its pool thread; with two threads, at most two are ever held that way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TypeVar

from django.conf import settings

from .queues import QUEUES

T = TypeVar("T")

_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ops-probe")


class ProbeTimeout(Exception):
    pass


def start(fn: Callable[[], T]) -> Future[T]:
    """Start fn() on the probe pool; `finish` collects it."""
    return _pool.submit(fn)


def finish(future: Future[T], *, timeout: float) -> T:
    """The probe's result; ProbeTimeout when it has not returned within `timeout` seconds."""
    try:
        return future.result(timeout=timeout)
    except FutureTimeout:
        future.cancel()  # still waiting for a pool thread: never starts
        raise ProbeTimeout(f"no answer within {timeout:g} s") from None


def bounded(fn: Callable[[], T], *, timeout: float) -> T:
    return finish(start(fn), timeout=timeout)


def transport() -> str:
    """The broker's kind ("redis", "filesystem"), never its URL (which may hold a password)."""
    return settings.CELERY_BROKER_URL.split("://", 1)[0] or "unknown"


@dataclass
class BrokerState:
    reachable: bool
    seconds: float
    depths: dict[str, int] = field(default_factory=dict)  # messages waiting, per queue
    error: str = ""


def _depths(timeout: float) -> dict[str, int]:
    from slmstudio.celery import app

    options = dict(app.conf.broker_transport_options or {})
    # Redis: give up on a connect or a reply after `timeout` (kombu's default waits forever).
    options.update(socket_timeout=timeout, socket_connect_timeout=timeout)
    with app.connection_for_read(connect_timeout=timeout, transport_options=options) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
        channel = conn.default_channel
        depths = {}
        for queue in QUEUES:
            if hasattr(channel, "_size"):
                # kombu's virtual transports: Redis sums LLEN over the queue's priority lists,
                # the filesystem transport counts the "<stamp>_<uuid>.<queue>.msg" files of its
                # folder. Neither creates the queue (a passive declare fails on an empty Redis queue).
                depths[queue] = int(channel._size(queue))
            else:  # AMQP
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
        return depths


def broker_probe(*, timeout: float | None = None) -> BrokerState:
    """Connect to the broker and count the messages waiting in each of our queues."""
    timeout = float(settings.HEALTH_TIMEOUT_SECONDS if timeout is None else timeout)
    started = time.perf_counter()
    try:
        depths = bounded(lambda: _depths(timeout), timeout=timeout)
    except Exception as exc:  # any failure means the same to a monitor: builds cannot be queued
        return BrokerState(False, time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}"[:300])
    return BrokerState(True, time.perf_counter() - started, depths)
