from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone


class WorkerQuerySet(models.QuerySet["Worker"]):
    def alive(self) -> WorkerQuerySet:
        """Workers that said they were running within WORKER_STALE_SECONDS and have not stopped."""
        cutoff = timezone.now() - timedelta(seconds=settings.WORKER_STALE_SECONDS)
        return self.filter(stopped_at__isnull=True, last_seen__gte=cutoff)


class Worker(models.Model):
    """A Celery worker as it announced itself: its queues and its hardware.

    Each worker writes its own row when it starts and touches it from its periodic sweep, so the
    web process (which cannot see workers) knows which queues someone consumes, and the wizard
    estimates on the hardware that will run the build, not on the web server's.
    """

    name = models.CharField(max_length=255, unique=True)  # Celery's node name, e.g. "gpu@host-3"
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    queues = models.JSONField(default=list)
    # {"cores": 16, "memory_bytes": ..., "gpu": "NVIDIA H200" | None, "gpu_memory_bytes": ...,
    #  "concurrency": 2, "disk_free_bytes": ...}
    hardware = models.JSONField(default=dict)
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField()
    stopped_at = models.DateTimeField(null=True, blank=True)

    objects = WorkerQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_alive(self) -> bool:
        cutoff = timezone.now() - timedelta(seconds=settings.WORKER_STALE_SECONDS)
        return self.stopped_at is None and self.last_seen >= cutoff
