"""GET /healthz: ok with a live worker, degraded without one, failing (503) when the disk is
short or the broker cannot be reached; names and paths only for staff."""

from __future__ import annotations

import time

import pytest
from django.contrib.auth.models import User

from tests.conftest import client_for
from tests.services import free_port

from .helpers import add_worker

pytestmark = pytest.mark.django_db


def test_it_is_ok_with_a_live_worker(client):
    add_worker("cpu@host-1", ["cpu"])
    add_worker("gpu@host-2", ["gpu"])
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response["Cache-Control"].startswith("max-age=0")
    data = response.json()
    assert data["status"] == "ok"
    checks = data["checks"]
    assert {name: c["status"] for name, c in checks.items()} == {
        "database": "ok", "broker": "ok", "workers": "ok", "disk": "ok"
    }  # fmt: skip
    assert checks["database"]["ms"] >= 0 and checks["broker"]["transport"] == "filesystem"
    assert checks["workers"]["alive"] == 2 and checks["workers"]["queues"] == {"cpu": 1, "gpu": 1}
    assert checks["disk"]["free_mb"] > checks["disk"]["min_free_mb"] == 1024


def test_it_is_degraded_but_up_when_no_worker_is_alive(client):
    add_worker("cpu@host-1", ["cpu", "gpu"], seen_ago=3600)  # stopped touching its row
    add_worker("cpu@host-2", ["cpu"], stopped=True)  # signed off
    response = client.get("/healthz")
    assert response.status_code == 200
    data = response.json()
    assert data["status"] == "degraded"
    assert data["checks"]["workers"]["status"] == "degraded" and data["checks"]["workers"]["alive"] == 0
    assert "No worker is running" in data["checks"]["workers"]["message"]


def test_it_fails_when_the_disk_has_less_free_space_than_the_threshold(client, settings):
    add_worker("cpu@host-1", ["cpu", "gpu"])
    settings.HEALTH_MIN_FREE_MB = 2**40  # a million terabytes
    response = client.get("/healthz")
    assert response.status_code == 503
    data = response.json()
    assert data["status"] == "failing" and data["checks"]["disk"]["status"] == "failing"
    assert data["checks"]["database"]["status"] == "ok"


def test_it_fails_quickly_when_the_broker_cannot_be_reached(client, settings, monkeypatch):
    add_worker("cpu@host-1", ["cpu", "gpu"])
    # Celery reads CELERY_BROKER_URL from the environment before its configuration.
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("CELERY_BROKER_URL", url)
    settings.CELERY_BROKER_URL = url
    started = time.monotonic()
    response = client.get("/healthz")
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    data = response.json()
    assert data["status"] == "failing"
    assert data["checks"]["broker"] == data["checks"]["broker"] | {"status": "failing", "transport": "redis"}
    body = response.content.decode()
    assert "s3cret" not in body and "127.0.0.1" not in body and "error" not in data["checks"]["broker"]


def test_only_staff_see_names_paths_and_errors(client, settings):
    add_worker("cpu@host-1", ["cpu"])
    anonymous = client.get("/healthz").json()["checks"]
    assert "workers" not in anonymous["workers"] and "path" not in anonymous["disk"]
    assert "host-1" not in str(anonymous) and str(settings.DATA_DIR) not in str(anonymous)
    plain = (
        client_for(User.objects.create_user("dora", password="pw-dora-123")).get("/healthz").json()["checks"]
    )
    assert "workers" not in plain["workers"]
    staff = client_for(User.objects.create_user("ed", password="pw-ed-123", is_staff=True))
    checks = staff.get("/healthz").json()["checks"]
    assert checks["workers"]["workers"] == ["cpu@host-1"] and checks["disk"]["path"] == str(settings.DATA_DIR)


def test_it_answers_head_and_refuses_post(client):
    assert client.head("/healthz").status_code == 200
    assert client.post("/healthz").status_code == 405


def test_anonymous_callers_share_a_report_for_a_few_seconds(client, settings, monkeypatch):
    from ops import health

    calls = []
    real = health.health_report
    monkeypatch.setattr(health, "health_report", lambda **kw: calls.append(kw) or real(**kw))
    settings.HEALTH_CACHE_SECONDS = 60
    for _ in range(5):
        assert client.get("/healthz").status_code in (200, 503)
    assert len(calls) == 1
    settings.HEALTH_CACHE_SECONDS = 0
    client.get("/healthz")
    assert len(calls) == 2
