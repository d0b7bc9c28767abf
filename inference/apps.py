from __future__ import annotations

from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"

    def ready(self) -> None:
        # Registers the `evaluate` build step: it answers through this app's engine.
        from django.conf import settings

        from . import evaluation  # noqa: F401
        from .engines.llama import engines

        engines.decode_threads = settings.CHAT_THREADS
