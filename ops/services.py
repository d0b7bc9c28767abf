"""The worker registry: workers announce themselves, touch their row while they run, and sign off."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from .hardware import disk_free, machine
from .models import Worker


def worker_register(*, name: str, queues: list[str], concurrency: int | None = None) -> Worker:
    """Announce this process as worker `name` consuming `queues`, with this machine's hardware."""
    now = timezone.now()
    hardware = machine(Path(settings.DATA_DIR)) | {"concurrency": concurrency}
    worker, _ = Worker.objects.update_or_create(
        name=name,
        defaults={
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": sorted(queues),
            "hardware": hardware,
            "started_at": now,
            "last_seen": now,
            "stopped_at": None,
        },
    )
    return worker


def worker_seen(*, name: str) -> None:
    """The worker is still running (called from its periodic sweep); free disk is re-read."""
    worker = Worker.objects.filter(name=name, pid=os.getpid()).first()
    if worker is None:
        return
    worker.last_seen = timezone.now()
    worker.hardware = worker.hardware | {"disk_free_bytes": disk_free(Path(settings.DATA_DIR))}
    worker.save(update_fields=["last_seen", "hardware"])


def worker_stopped(*, name: str) -> None:
    # Guarded by pid: a newer process of the same name (a quick restart) keeps its row.
    Worker.objects.filter(name=name, pid=os.getpid()).update(stopped_at=timezone.now())


def workers_gone_on_this_host() -> list[str]:
    """Sign off the workers of this host whose process is gone (killed, crashed): their queues stop
    counting at once, not WORKER_STALE_SECONDS later. Other hosts' workers go stale by time."""
    from slmstudio.lib.workers import worker_is_dead

    gone = [
        w.name
        for w in Worker.objects.filter(host=socket.gethostname(), stopped_at__isnull=True)
        if worker_is_dead(f"{w.host}:{w.pid}")
    ]
    if gone:
        Worker.objects.filter(name__in=gone, stopped_at__isnull=True).update(stopped_at=timezone.now())
    return gone


# Workers gone this long are forgotten: every container recreated on an upgrade has a new name.
FORGET_AFTER = timedelta(days=7)


def workers_forget_old() -> int:
    cutoff = timezone.now() - FORGET_AFTER
    deleted, _ = Worker.objects.filter(Q(stopped_at__lt=cutoff) | Q(last_seen__lt=cutoff)).delete()
    return deleted


def training_hardware() -> dict[str, Any]:
    """The hardware builds' training steps will run on: the live worker with a GPU (most GPU
    memory) when training is routed to GPU workers, else the live CPU worker with the most cores;
    this machine's when no worker has announced itself yet (a fresh `make run`)."""
    from .queues import GPU, route

    queue = route(GPU)
    candidates = [w for w in Worker.objects.alive() if queue in w.queues]
    if not candidates:
        return machine(Path(settings.DATA_DIR)) | {"source": "this machine"}

    def rank(w: Worker) -> tuple:
        hw = w.hardware
        return (bool(hw.get("gpu")), hw.get("gpu_memory_bytes") or 0, hw.get("cores") or 0)

    best = max(candidates, key=rank)
    return best.hardware | {"source": f"worker {best.name}", "queue": queue}
