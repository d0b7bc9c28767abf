"""Prometheus metrics for /metrics.

Two kinds of numbers:
- observed as they happen, in the process that answers a question (chat page, API, `ask`):
  time to the first token, time to the whole answer, generation speed. Gunicorn answers from
  several processes; with PROMETHEUS_MULTIPROC_DIR set (slmstudio/gunicorn.conf.py does) each
  process writes its samples to files there and a scrape adds up every process's files, also
  those of processes that have since exited. Without it (`runserver`, tests) they live in memory.
- read at scrape time from the database and the broker, so every web process reports the
  same: queue depths, builds by status and their durations, live workers per queue, free disk.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path
from typing import Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

_MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _MULTIPROC_DIR:
    # prometheus_client writes a file there as soon as a metric without labels is created.
    Path(_MULTIPROC_DIR).mkdir(parents=True, exist_ok=True)

# --- Observed in the answering process -----------------------------------------------------

FIRST_TOKEN_SECONDS = Histogram(
    "slmstudio_chat_first_token_seconds",
    "Seconds from a question to the first word of its answer: retrieval, waiting for the model, "
    "reading the prompt (chat page, API, ask).",
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60),
)
ANSWER_SECONDS = Histogram(
    "slmstudio_chat_answer_seconds",
    "Seconds from a question to the end of its answer, by how it ended (stop, length, cancelled, error).",
    ["outcome"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
)
TOKENS_PER_SECOND = Histogram(
    "slmstudio_chat_tokens_per_second",
    "Generation speed of an answer after its first token (tokens per second).",
    buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300),
)
_OUTCOMES = frozenset({"stop", "length", "cancelled"})


class _Generation(Protocol):
    finish_reason: str | None

    @property
    def tokens_per_second(self) -> float: ...


def answer_observed(
    pieces: Generator[str, None, None], result: _Generation, *, started: float
) -> Generator[str, None, None]:
    """`pieces` passed through, timed from `started` (time.perf_counter()) as the asker sees it.
    Observed once the answer ends, however it ends: finished, cut off, or closed by a client
    that went away."""
    first: float | None = None
    try:
        for piece in pieces:
            if first is None:
                first = time.perf_counter() - started
            yield piece
    finally:
        # Close the engine's stream first (a for loop does not): it frees the model and fills
        # in the result's finish reason and speed.
        pieces.close()
        try:
            if first is not None:
                FIRST_TOKEN_SECONDS.observe(first)
            outcome = result.finish_reason if result.finish_reason in _OUTCOMES else "error"
            ANSWER_SECONDS.labels(outcome=outcome).observe(time.perf_counter() - started)
            if result.tokens_per_second > 0:
                TOKENS_PER_SECOND.observe(result.tokens_per_second)
        except Exception:  # a full metrics disk must not cost the user the answer
            log.exception("could not record the answer's metrics")


# --- Read at scrape time ---------------------------------------------------------------------

BUILD_SECONDS_BUCKETS = (30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)


def _histogram(
    name: str,
    doc: str,
    labels: list[str],
    values: dict[tuple[str, ...], list[float]],
    buckets: Iterable[float],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    bounds = [*buckets, float("inf")]
    for key, observed in sorted(values.items()):
        counts = [sum(1 for v in observed if v <= bound) for bound in bounds]
        family.add_metric(
            list(key), [(_bound(b), c) for b, c in zip(bounds, counts, strict=True)], sum_value=sum(observed)
        )
    return family


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else str(float(bound))


class StateCollector:
    """Numbers read from the database and the broker when Prometheus scrapes."""

    def collect(self) -> Iterator[Metric]:
        yield from self._broker()
        try:
            yield from self._database()
        except Exception:
            log.exception("metrics: could not read the database")
            yield GaugeMetricFamily("slmstudio_database_up", "1 when the database answered this scrape.", 0)
        else:
            yield GaugeMetricFamily("slmstudio_database_up", "1 when the database answered this scrape.", 1)
        yield from self._disk()

    def _broker(self) -> Iterator[Metric]:
        from .broker import broker_probe

        state = broker_probe()
        yield GaugeMetricFamily(
            "slmstudio_broker_up", "1 when the task broker answered this scrape.", int(state.reachable)
        )
        if state.reachable:
            depth = GaugeMetricFamily(
                "slmstudio_queue_depth", "Task messages waiting in the broker, per queue.", labels=["queue"]
            )
            for queue, n in sorted(state.depths.items()):
                depth.add_metric([queue], n)
            yield depth

    def _database(self) -> Iterator[Metric]:
        from django.db.models import Count

        from training.models import Build

        from .models import Worker
        from .queues import QUEUES

        # Collected into a list first: a failing query must not leave half a scrape behind.
        families: list[Metric] = []
        by_status = dict(Build.objects.values_list("status").annotate(n=Count("id")).order_by())
        builds = GaugeMetricFamily("slmstudio_builds", "Builds by status.", labels=["status"])
        for status in Build.Status.values:
            builds.add_metric([status], by_status.get(status, 0))
        families.append(builds)

        waiting = dict(
            Build.objects.filter(status=Build.Status.QUEUED)
            .values_list("queue")
            .annotate(n=Count("id"))
            .order_by()
        )
        queued = GaugeMetricFamily(
            "slmstudio_builds_waiting", "Queued builds, per queue they were sent to.", labels=["queue"]
        )
        for queue in sorted({*QUEUES, *waiting}):
            queued.add_metric([queue or "none"], waiting.get(queue, 0))
        families.append(queued)

        durations: dict[tuple[str, ...], list[float]] = defaultdict(list)
        ended = Build.objects.filter(
            status__in=Build.TERMINAL, started_at__isnull=False, ended_at__isnull=False
        ).values_list("recipe", "status", "started_at", "ended_at")
        for recipe, status, started_at, ended_at in ended.iterator(chunk_size=2000):
            durations[(recipe, status)].append(max(0.0, (ended_at - started_at).total_seconds()))
        families.append(
            _histogram(
                "slmstudio_build_duration_seconds",
                "Seconds from a build's (last) start to its end, by recipe and outcome.",
                ["recipe", "outcome"],
                durations,
                BUILD_SECONDS_BUCKETS,
            )
        )

        serving = Counter(
            q for queues in Worker.objects.alive().values_list("queues", flat=True) for q in queues
        )
        workers = GaugeMetricFamily(
            "slmstudio_workers_alive", "Live workers consuming each queue.", labels=["queue"]
        )
        for queue in sorted({*QUEUES, *serving}):
            workers.add_metric([queue], serving.get(queue, 0))
        families.append(workers)
        yield from families

    def _disk(self) -> Iterator[Metric]:
        import shutil

        from django.conf import settings

        from .broker import bounded

        try:
            free = bounded(
                lambda: shutil.disk_usage(settings.DATA_DIR).free, timeout=settings.HEALTH_TIMEOUT_SECONDS
            )
        except Exception:
            return
        yield GaugeMetricFamily(
            "slmstudio_disk_free_bytes", "Free bytes on the disk that holds DATA_DIR.", free
        )


class _Collectors:
    """Several collectors read as one registry (generate_latest only needs `collect`)."""

    def __init__(self, *collectors: object) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()  # type: ignore[attr-defined]


def exposition() -> bytes:
    """The text exposition format of every metric: observed ones (this process's, or all web
    processes' in multiprocess mode) and the state read now."""
    if _MULTIPROC_DIR:
        observed = CollectorRegistry()
        MultiProcessCollector(observed, path=_MULTIPROC_DIR)
    else:
        observed = REGISTRY
    return generate_latest(_Collectors(observed, StateCollector()))  # type: ignore[arg-type]
