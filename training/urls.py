from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("", views.builds, name="training-builds"),
    path("new/", views.build_new, name="training-build-new"),
    path("<int:pk>/", views.build_detail, name="training-build-detail"),
    path("<int:pk>/cancel/", views.build_cancel, name="training-build-cancel"),
]
