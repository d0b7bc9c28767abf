from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("healthz", views.healthz, name="ops-healthz"),
    path("metrics", views.metrics, name="ops-metrics"),
    path("ops/workers/", views.workers, name="ops-workers"),
]
