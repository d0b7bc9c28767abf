"""GET /metrics: the exposition parses, and its numbers follow from the rows and messages the
tests make; callers other than this machine need the token."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from kombu import Connection
from pytest_redis import factories

from ops.queues import CPU, GPU
from slmstudio.celery import app
from training.models import Build

from .helpers import add_worker, sample, scrape

pytestmark = pytest.mark.django_db

redis_server = factories.redis_proc(executable="/usr/bin/redis-server", port=None)


def _build(
    project, status: str, *, recipe: str = "rag", seconds: float | None = None, queue: str = ""
) -> Build:  # type: ignore[no-untyped-def]
    build = Build.objects.create(project=project, recipe=recipe, status=status, queue=queue)
    if seconds is not None:
        ended = timezone.now()
        Build.objects.filter(pk=build.pk).update(
            started_at=ended - timedelta(seconds=seconds), ended_at=ended
        )
    return build


def _send(url: str | None, queue: str, n: int) -> None:
    """n task-like messages to `queue` through the app's broker (or `url`), as `apply_async` sends them."""
    with Connection(url) if url else app.connection_for_write() as conn:
        producer = conn.Producer()
        for i in range(n):
            producer.publish({"n": i}, exchange="", routing_key=queue, declare=[app.amqp.queues[queue]])


def test_builds_are_counted_by_status_and_queue(project):
    for _ in range(2):
        _build(project, "queued", queue=GPU)
    _build(project, "queued", queue=CPU)
    _build(project, "running")
    _build(project, "failed", seconds=5)
    samples = scrape()
    assert sample(samples, "slmstudio_builds", status="queued") == 3
    assert sample(samples, "slmstudio_builds", status="running") == 1
    assert sample(samples, "slmstudio_builds", status="failed") == 1
    assert sample(samples, "slmstudio_builds", status="succeeded") == 0
    assert sample(samples, "slmstudio_builds_waiting", queue=GPU) == 2
    assert sample(samples, "slmstudio_builds_waiting", queue=CPU) == 1
    assert sample(samples, "slmstudio_database_up") == 1


def test_build_durations_are_a_histogram_by_recipe_and_outcome(project):
    _build(project, "succeeded", seconds=45)
    _build(project, "succeeded", seconds=700)
    _build(project, "failed", seconds=20)
    _build(project, "succeeded", recipe="rag,quantize:q4_k_m", seconds=90)
    _build(project, "running")  # not ended: not a duration yet
    samples = scrape()
    name = "slmstudio_build_duration_seconds"
    rag_ok = {"recipe": "rag", "outcome": "succeeded"}
    assert sample(samples, f"{name}_bucket", le="30.0", **rag_ok) == 0
    assert sample(samples, f"{name}_bucket", le="60.0", **rag_ok) == 1
    assert sample(samples, f"{name}_bucket", le="600.0", **rag_ok) == 1
    assert sample(samples, f"{name}_bucket", le="1200.0", **rag_ok) == 2
    assert sample(samples, f"{name}_bucket", le="+Inf", **rag_ok) == 2
    assert sample(samples, f"{name}_count", **rag_ok) == 2
    assert sample(samples, f"{name}_sum", **rag_ok) == pytest.approx(745, abs=1)
    assert sample(samples, f"{name}_count", recipe="rag", outcome="failed") == 1
    assert sample(samples, f"{name}_count", recipe="rag,quantize:q4_k_m", outcome="succeeded") == 1


def test_live_workers_are_counted_per_queue():
    add_worker("cpu@a", [CPU])
    add_worker("cpu@b", [CPU, GPU])
    add_worker("gpu@c", [GPU], seen_ago=3600)  # gone
    samples = scrape()
    assert sample(samples, "slmstudio_workers_alive", queue=CPU) == 2
    assert sample(samples, "slmstudio_workers_alive", queue=GPU) == 1


def test_queue_depth_counts_the_embedded_brokers_message_files():
    before = scrape()
    assert sample(before, "slmstudio_broker_up") == 1
    start_cpu = sample(before, "slmstudio_queue_depth", queue=CPU)
    start_gpu = sample(before, "slmstudio_queue_depth", queue=GPU)
    _send(None, GPU, 3)
    try:
        after = scrape()
        assert sample(after, "slmstudio_queue_depth", queue=GPU) == start_gpu + 3
        assert sample(after, "slmstudio_queue_depth", queue=CPU) == start_cpu
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(GPU)


@pytest.mark.services
def test_queue_depth_reads_redis(redis_server: Any, settings, monkeypatch):
    url = f"redis://{redis_server.host}:{redis_server.port}/0"
    # Celery reads CELERY_BROKER_URL from the environment before its configuration.
    monkeypatch.setenv("CELERY_BROKER_URL", url)
    settings.CELERY_BROKER_URL = url
    _send(url, CPU, 4)
    _send(url, GPU, 1)
    samples = scrape()
    assert sample(samples, "slmstudio_broker_up") == 1
    assert sample(samples, "slmstudio_queue_depth", queue=CPU) == 4
    assert sample(samples, "slmstudio_queue_depth", queue=GPU) == 1
    import redis

    assert redis.Redis(host=redis_server.host, port=redis_server.port).llen(CPU) == 4


def test_an_unreachable_broker_is_reported_not_fatal(settings, monkeypatch):
    from tests.services import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("CELERY_BROKER_URL", url)
    settings.CELERY_BROKER_URL = url
    samples = scrape()
    assert sample(samples, "slmstudio_broker_up") == 0
    assert not any(name == "slmstudio_queue_depth" for name, _ in samples)
    assert sample(samples, "slmstudio_builds", status="queued") == 0


# --- Who may read them -----------------------------------------------------------------------


def test_callers_elsewhere_are_refused_without_the_token(client, settings):
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics").status_code == 200  # the test client is 127.0.0.1
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 403
    assert client.get("/metrics", REMOTE_ADDR="::1").status_code == 200
    # Through a reverse proxy on this machine the address is loopback, the caller is not.
    assert client.get("/metrics", HTTP_X_FORWARDED_FOR="203.0.113.9").status_code == 403
    # No token configured: no bearer string opens it.
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3", HTTP_AUTHORIZATION="Bearer ").status_code == 403


def test_the_token_lets_other_callers_in(client, settings):
    settings.METRICS_TOKEN = "t0ken-for-prometheus"
    refused = client.get("/metrics", REMOTE_ADDR="10.1.2.3")
    assert refused.status_code == 401 and refused["WWW-Authenticate"].startswith("Bearer")
    wrong = client.get("/metrics", REMOTE_ADDR="10.1.2.3", HTTP_AUTHORIZATION="Bearer t0ken-for-prometheuz")
    assert wrong.status_code == 401
    scrape(client, REMOTE_ADDR="10.1.2.3", HTTP_AUTHORIZATION="Bearer t0ken-for-prometheus")
