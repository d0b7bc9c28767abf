from __future__ import annotations

from django.urls import path

from . import api

urlpatterns = [
    path("models", api.models, name="api-models"),
    path("chat/completions", api.chat_completions, name="api-chat-completions"),
]
