from __future__ import annotations

from celery import shared_task


@shared_task(acks_late=True, ignore_result=True)
def parse_document_task(document_id: int) -> None:
    from .services import document_parse

    document_parse(document_id=document_id)


@shared_task(acks_late=True, ignore_result=True)
def scan_project_task(project_id: int, rescan: bool = False) -> None:
    from .models import Project
    from .privacy import project_scan

    project = Project.objects.filter(pk=project_id).first()
    if project is not None:
        project_scan(project=project, rescan=rescan)
