from __future__ import annotations

from django.urls import path

from . import teacher_views as views

urlpatterns = [
    path("", views.teachers, name="training-teachers"),
    path("<int:pk>/check/", views.teacher_check, name="training-teacher-check"),
    path("<int:pk>/remove/", views.teacher_remove, name="training-teacher-remove"),
    path("generate/", views.generation_new, name="training-generation-new"),
    path("generate/<int:pk>/", views.generation_status, name="training-generation-status"),
    path("generate/<int:pk>/cancel/", views.generation_cancel, name="training-generation-cancel"),
]
