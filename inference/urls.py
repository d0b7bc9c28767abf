from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("", views.models, name="inference-models"),
    path("<int:number>/", views.chat, name="inference-chat"),
    path("<int:number>/c/<int:conversation>/", views.chat, name="inference-conversation"),
    path("<int:number>/ask/", views.ask, name="inference-ask"),
    path("<int:number>/stream/<int:message>/", views.stream, name="inference-stream"),
    path("<int:number>/retrieve/", views.retrieve, name="inference-retrieve"),
]
