from __future__ import annotations

from django.apps import AppConfig


class OpsConfig(AppConfig):
    """Running the installation: the worker registry, queues, health, metrics."""

    name = "ops"
    verbose_name = "Operations"

    def ready(self) -> None:
        from . import queues  # noqa: F401  (a worker learns its queues at start: worker_init)
