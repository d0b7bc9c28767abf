from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from inference import views as inference_views

from . import views

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("signup/", views.signup, name="signup"),
    path("admin/", admin.site.urls),
    path("", include("projects.urls")),
    path("base-models/", include("training.base_urls")),
    path("p/<slug:slug>/builds/", include("training.urls")),
    path("p/<slug:slug>/teachers/", include("training.teacher_urls")),
    path("p/<slug:slug>/wizard/", include("training.wizard_urls")),
    path("p/<slug:slug>/data-quality/", include("training.report_urls")),
    path("p/<slug:slug>/models/", include("inference.urls")),
    path("settings/", inference_views.settings_page, name="inference-settings"),
    path("settings/tokens/<int:pk>/revoke/", inference_views.token_revoke, name="inference-token-revoke"),
    path("v1/", include("inference.api_urls")),
    path("", include("ops.urls")),
]
