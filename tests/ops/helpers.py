"""Rows and readings shared by the ops tests."""

from __future__ import annotations

from datetime import timedelta

from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from ops.models import Worker


def add_worker(
    name: str, queues: list[str], *, seen_ago: float = 0, stopped: bool = False, **hardware: object
) -> Worker:
    now = timezone.now()
    return Worker.objects.create(
        name=name,
        host=name.partition("@")[2] or "host-1",
        pid=4242,
        queues=queues,
        hardware={"cores": 8, "memory_bytes": 32 * 10**9, "gpu": None, "concurrency": 2} | hardware,
        started_at=now - timedelta(hours=1),
        last_seen=now - timedelta(seconds=seen_ago),
        stopped_at=now if stopped else None,
    )


def scrape(client: Client | None = None, **headers: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client's own parser: {(sample name, sorted labels): value}."""
    response = (client or Client()).get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def sample(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))
