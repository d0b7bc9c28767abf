from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("", views.models, name="inference-models"),
    path("report/", views.report, name="inference-report"),
    path("<int:number>/", views.chat, name="inference-chat"),
    path("<int:number>/about/", views.model_detail, name="inference-model-detail"),
    path("<int:number>/refresh/", views.refresh, name="inference-refresh"),
    path("<int:number>/download/gguf/", views.download_gguf, name="inference-download-gguf"),
    path("<int:number>/download/modelfile/", views.download_modelfile, name="inference-download-modelfile"),
    path("<int:number>/download/model-card/", views.download_card, name="inference-download-card"),
    path("<int:number>/c/<int:conversation>/", views.chat, name="inference-conversation"),
    path("<int:number>/ask/", views.ask, name="inference-ask"),
    path("<int:number>/stream/<int:message>/", views.stream, name="inference-stream"),
    path("<int:number>/retrieve/", views.retrieve, name="inference-retrieve"),
]
