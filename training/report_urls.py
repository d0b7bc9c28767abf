from __future__ import annotations

from django.urls import path

from . import report_views as views

urlpatterns = [
    path("", views.data_report, name="training-data-report"),
    path("recompute/", views.data_report_recompute, name="training-data-report-recompute"),
]
