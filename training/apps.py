from __future__ import annotations

from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"

    def ready(self) -> None:
        from . import worker  # noqa: F401  (connects the worker start-up sweep)
