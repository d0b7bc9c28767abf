from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def fresh_health_reports(settings, monkeypatch):  # type: ignore[no-untyped-def]
    """Each test reads its own /healthz report, not one cached by the test before it."""
    from ops import views

    settings.HEALTH_CACHE_SECONDS = 0
    monkeypatch.setattr(views, "_cached", None)
