from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings


def _run_build_failure(self, exc, task_id, args, kwargs, einfo) -> None:  # type: ignore[no-untyped-def]
    from .models import Build
    from .services import build_fail

    token = (kwargs or {}).get("token")
    # A message sent before the build's latest dispatch never ran it: its crash (a database
    # error while it checked) must not fail the run another worker has now.
    if token and not Build.objects.filter(pk=args[0], dispatch_token=token).exists():
        return
    build_fail(build_id=args[0], message=f"The build's task crashed: {exc.__class__.__name__}: {exc}")


# acks_late + prefetch 1: a message is only acknowledged once the build has run. Redelivery is
# harmless because build_run claims the row with a conditional UPDATE.
# A build converts, quantizes, measures (and later trains): far longer than the 10 minutes other
# tasks get, so it has its own limits.
@shared_task(
    acks_late=True,
    ignore_result=True,
    on_failure=_run_build_failure,
    # build_run stops a build at a safe point when BUILD_TIME_LIMIT passes; these only catch a
    # step stuck where it cannot check (one long C call).
    soft_time_limit=settings.BUILD_TIME_LIMIT + settings.BUILD_STOP_GRACE,
    time_limit=settings.BUILD_TIME_LIMIT + 2 * settings.BUILD_STOP_GRACE,
)
def run_build_task(build_id: int, token: str | None = None) -> None:
    from .services import build_run
    from .worker import sigterm_stops_builds

    with sigterm_stops_builds():
        build_run(build_id=build_id, token=token)


@shared_task(
    acks_late=True,
    ignore_result=True,
    soft_time_limit=settings.BUILD_TIME_LIMIT,
    time_limit=settings.BUILD_TIME_LIMIT + 120,
)
def generate_pairs_task(run_id: int) -> None:
    from .teachers import generation_run

    generation_run(run_id=run_id)


# A report reads every document and embeds every passage once: minutes for a large project on a
# CPU, so more than the 10 minutes other short tasks get. Redelivery is harmless: a second run
# finds the report current and returns.
@shared_task(acks_late=True, ignore_result=True, soft_time_limit=1800, time_limit=1860)
def data_report_task(project_id: int, force: bool = False) -> None:
    from .reports import report_refresh

    try:
        report_refresh(project_id=project_id, force=force)
    except MemoryError:
        # Never let a MemoryError out of a task: billiard re-raises it in the worker's main
        # process, whose result handler then dies and every later task (builds) hangs. The report
        # stays out of date; the next data change or Recompute tries again.
        logging.getLogger(__name__).error("data report of project %s: out of memory", project_id)
