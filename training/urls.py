from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("", views.builds, name="training-builds"),
    path("new/", views.build_new, name="training-build-new"),
    path("<int:pk>/", views.build_detail, name="training-build-detail"),
    path("<int:pk>/cancel/", views.build_cancel, name="training-build-cancel"),
    path("<int:pk>/resume/", views.build_resume, name="training-build-resume"),
    path("recipes/", views.recipe_save, name="training-recipe-save"),
    path("recipes/<int:pk>.yaml", views.recipe_export, name="training-recipe-export"),
    path("recipes/<int:pk>/build/", views.recipe_build, name="training-recipe-build"),
    path("recipes/<int:pk>/delete/", views.recipe_delete, name="training-recipe-delete"),
]
