from __future__ import annotations

import logging

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
    if project is None:
        return
    try:
        project_scan(project=project, rescan=rescan)
    except MemoryError:
        # Kept inside the task: billiard would re-raise it in the worker's main process (see
        # training.tasks.data_report_task). What is unscanned is scanned by the next build.
        logging.getLogger(__name__).error("PII scan of project %s: out of memory", project_id)
