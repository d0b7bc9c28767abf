from __future__ import annotations

from celery import shared_task


@shared_task(acks_late=True, ignore_result=True)
def parse_document_task(document_id: int) -> None:
    from .services import document_parse

    document_parse(document_id=document_id)
