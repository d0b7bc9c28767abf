"""What the Workers page shows: the registered workers, what each runs, the queues, failures."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Count, Min
from django.urls import reverse
from django.utils import timezone

from projects.models import Membership
from training.models import Build, BuildStep
from training.recipes import recipe_label

from .broker import broker_probe, transport
from .models import Worker
from .queues import QUEUES

# Workers that stopped or vanished are kept in the registry; the page lists the newest few.
GONE_SHOWN = 20
FAILURES_SHOWN = 10
BROKER_LABELS = {
    "filesystem": "embedded (files in the data folder)",
    "redis": "Redis",
    "rediss": "Redis (TLS)",
}


@dataclass
class BuildRow:
    build: Build
    step: BuildStep | None  # the step running now, or the one that failed
    worker: str  # Celery node name of the step's worker ("" before any step started)
    url: str | None  # where this staff member may open it, if anywhere

    @property
    def recipe(self) -> str:
        return recipe_label(self.build.recipe)


@dataclass
class WorkerRow:
    worker: Worker
    state: str  # "alive" | "stopped" (signed off) | "lost" (stopped touching its row)
    running: list[BuildRow] = field(default_factory=list)

    @property
    def hardware(self) -> dict:
        return self.worker.hardware or {}


@dataclass
class QueueRow:
    name: str
    depth: int | None  # messages in the broker; None when it cannot be read
    waiting: int  # queued builds sent to this queue
    oldest: datetime | None  # when the longest-waiting of them was sent
    workers: int  # live workers consuming it


@dataclass
class Overview:
    workers: list[WorkerRow]
    hidden_gone: int
    running: list[BuildRow]
    queues: list[QueueRow]
    failures: list[BuildRow]
    broker_transport: str
    broker_reachable: bool
    notes: list[tuple[str, str]]  # (level "error" | "info", text)

    @property
    def broker_label(self) -> str:
        return BROKER_LABELS.get(self.broker_transport, self.broker_transport)

    @property
    def alive_count(self) -> int:
        return sum(1 for w in self.workers if w.state == "alive")


def _build_url(build: Build, *, member_of: set[int], user: AbstractBaseUser) -> str | None:
    # Staff are not members of every project: the project's page 404s for them, the admin does not.
    if build.project_id in member_of:
        return build.get_absolute_url()
    if user.has_perm("training.view_build"):
        return reverse("admin:training_build_change", args=[build.pk])
    return None


def _worker_state(worker: Worker, cutoff: datetime) -> str:
    if worker.stopped_at is not None:
        return "stopped"
    return "alive" if worker.last_seen >= cutoff else "lost"


def workers_overview(*, user: AbstractBaseUser) -> Overview:
    now = timezone.now()
    cutoff = now - timedelta(seconds=settings.WORKER_STALE_SECONDS)
    member_of = set(Membership.objects.filter(user=user).values_list("project_id", flat=True))

    def row(build: Build, step: BuildStep | None) -> BuildRow:
        url = _build_url(build, member_of=member_of, user=user)
        return BuildRow(build, step, step.worker if step else "", url)

    running = []
    active = (
        Build.objects.filter(status__in=Build.ACTIVE).select_related("project").order_by("started_at", "pk")
    )
    for build in active.prefetch_related("steps"):
        steps = list(build.steps.all())
        current = next((s for s in steps if s.status == BuildStep.Status.RUNNING), None)
        started = [s for s in steps if s.started_at]
        running.append(row(build, current or (started[-1] if started else None)))

    rows = [WorkerRow(w, _worker_state(w, cutoff)) for w in Worker.objects.all()]
    by_name = {r.worker.name: r for r in rows}
    for build_row in running:
        if build_row.worker in by_name:
            by_name[build_row.worker].running.append(build_row)
    # Alive first, then the most recently seen.
    rows.sort(key=lambda r: (r.state != "alive", -r.worker.last_seen.timestamp()))
    gone = [r for r in rows if r.state != "alive"]
    shown = [r for r in rows if r.state == "alive"] + gone[:GONE_SHOWN]

    broker = broker_probe()
    queued = Build.objects.filter(status=Build.Status.QUEUED).values("queue").order_by()
    waiting = {
        g["queue"]: (g["n"], g["oldest"]) for g in queued.annotate(n=Count("id"), oldest=Min("dispatched_at"))
    }
    serving: dict[str, int] = {}
    for r in rows:
        if r.state == "alive":
            for q in r.worker.queues:
                serving[q] = serving.get(q, 0) + 1
    queues = [
        QueueRow(
            name=q or "none",
            depth=broker.depths.get(q) if broker.reachable else None,
            waiting=waiting.get(q, (0, None))[0],
            oldest=waiting.get(q, (0, None))[1],
            workers=serving.get(q, 0),
        )
        for q in sorted({*QUEUES, *waiting, *serving}, key=lambda q: (q not in QUEUES, q))
    ]

    failed = (
        Build.objects.filter(status__in=[Build.Status.FAILED, Build.Status.TIMED_OUT])
        .select_related("project")
        .prefetch_related("steps")
        .order_by("-ended_at", "-pk")[:FAILURES_SHOWN]
    )
    failures = []
    for build in failed:
        steps = list(build.steps.all())
        step = next((s for s in steps if s.status == BuildStep.Status.FAILED), None)
        step = step or next((s for s in reversed(steps) if s.started_at), None)
        failures.append(row(build, step))

    notes = []
    if not broker.reachable:
        text = "The task broker cannot be reached: builds cannot be queued, and queue lengths are unknown."
        notes.append(("error", text))
    if not serving:
        notes.append(("error", "No worker is running: builds and large uploads wait until one starts."))
    else:
        for q in QUEUES:
            if q not in serving:
                # Routing (ops.queues.route) sends the work on: worth knowing, not an error.
                other = next(o for o in QUEUES if o != q)
                notes.append(
                    (
                        "info",
                        f"No worker consumes the {q} queue: its work goes to the {other} queue's workers.",
                    )
                )
    return Overview(
        workers=shown,
        hidden_gone=len(gone) - len(gone[:GONE_SHOWN]),
        running=running,
        queues=queues,
        failures=failures,
        broker_transport=transport(),
        broker_reachable=broker.reachable,
        notes=notes,
    )
