from __future__ import annotations

from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"

    def ready(self) -> None:
        from . import tuning, worker  # noqa: F401  (registers the fine-tuning steps; the worker sweep)
