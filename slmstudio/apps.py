from __future__ import annotations

from django.apps import AppConfig


class SlmStudioConfig(AppConfig):
    name = "slmstudio"
    verbose_name = "SLM Studio"
