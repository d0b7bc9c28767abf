from __future__ import annotations

from celery import shared_task


def _run_build_failure(self, exc, task_id, args, kwargs, einfo) -> None:  # type: ignore[no-untyped-def]
    from .services import build_fail

    build_fail(build_id=args[0], message=f"The build's task crashed: {exc.__class__.__name__}: {exc}")


# acks_late + prefetch 1: a message is only acknowledged once the build has run. Redelivery is
# harmless because build_run claims the row with a conditional UPDATE.
@shared_task(acks_late=True, ignore_result=True, on_failure=_run_build_failure)
def run_build_task(build_id: int) -> None:
    from .services import build_run

    build_run(build_id=build_id)
