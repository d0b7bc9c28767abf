from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("", views.base_models, name="training-base-models"),
    path("<slug:base>/", views.base_model_detail, name="training-base-model"),
    path("<slug:base>/remove/", views.base_model_remove, name="training-base-model-remove"),
]
