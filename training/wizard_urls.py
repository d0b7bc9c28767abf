from __future__ import annotations

from django.urls import path

from . import wizard_views as views

urlpatterns = [
    path("", views.wizard_page, name="training-wizard"),
    path("reset/", views.wizard_reset, name="training-wizard-reset"),
]
