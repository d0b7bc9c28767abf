from __future__ import annotations

from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"

    def ready(self) -> None:
        from . import distilling, pruning, tuning, worker  # noqa: F401  (registers the training steps; the worker sweep)
