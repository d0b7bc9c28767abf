from __future__ import annotations

from django.urls import path

from . import privacy_views, views

urlpatterns = [
    path("", views.home, name="projects-home"),
    path("p/new/", views.project_new, name="projects-new"),
    path("p/<slug:slug>/", views.project_detail, name="projects-detail"),
    path("p/<slug:slug>/members/", views.members, name="projects-members"),
    path("p/<slug:slug>/members/<int:pk>/remove/", views.member_remove, name="projects-member-remove"),
    path("p/<slug:slug>/delete/", views.project_delete, name="projects-delete"),
    path("p/<slug:slug>/documents/", views.documents, name="projects-documents"),
    path("p/<slug:slug>/documents/upload/", views.documents_upload, name="projects-documents-upload"),
    path("p/<slug:slug>/documents/<int:pk>/", views.document_detail, name="projects-document"),
    path("p/<slug:slug>/documents/<int:pk>/row/", views.document_row, name="projects-document-row"),
    path("p/<slug:slug>/documents/<int:pk>/delete/", views.document_delete, name="projects-document-delete"),
    path("p/<slug:slug>/pairs/", views.pairs, name="projects-pairs"),
    path("p/<slug:slug>/pairs/import/", views.pairs_import, name="projects-pairs-import"),
    path("p/<slug:slug>/pairs/export.jsonl", views.pairs_export, name="projects-pairs-export"),
    path("p/<slug:slug>/pairs/review/", views.pairs_review, name="projects-pairs-review"),
    path("p/<slug:slug>/pairs/<int:pk>/edit/", views.pair_edit, name="projects-pair-edit"),
    path("p/<slug:slug>/pairs/<int:pk>/delete/", views.pair_delete, name="projects-pair-delete"),
    path("p/<slug:slug>/privacy/", privacy_views.privacy_page, name="projects-privacy"),
    path("p/<slug:slug>/privacy/status/", privacy_views.privacy_status, name="projects-privacy-status"),
    path("p/<slug:slug>/privacy/policy/", privacy_views.privacy_policy, name="projects-privacy-policy"),
    path("p/<slug:slug>/privacy/scan/", privacy_views.privacy_scan, name="projects-privacy-scan"),
    path(
        "p/<slug:slug>/privacy/findings/<int:pk>/ignore/",
        privacy_views.finding_ignore,
        name="projects-finding-ignore",
    ),
]
