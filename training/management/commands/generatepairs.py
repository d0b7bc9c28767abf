from __future__ import annotations

import time

from django.core.exceptions import ValidationError

from projects.models import Project
from slmstudio.lib.cli import JsonCommand
from training.models import GenerationRun
from training.teachers import generation_start


class Command(JsonCommand):
    help = (
        "Have a teacher write question/answer pairs from the project's documents (a worker runs it). "
        'With --wait, wait for the end and print {"run": ID, "status", "added", "duplicates", "failed", '
        '"total", "error"}; the pairs wait for review on the Instruction pairs tab. Exit 1 unless it '
        "succeeded. A new run for the same teacher skips passages an earlier run already answered."
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("project", help="project slug")
        parser.add_argument("--teacher", type=int, required=True, help="teacher id (see addteacher)")
        parser.add_argument("--per-document", type=int, default=5, help="questions per document")
        parser.add_argument("--wait", action="store_true", help="wait until the run ends")
        parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait at most")

    def handle(
        self, *args, project: str, teacher: int, per_document: int, wait: bool, timeout: float, **o
    ) -> None:  # type: ignore[no-untyped-def]
        target = Project.objects.filter(slug=project).first()
        if target is None:
            self.fail(f"No project {project!r}.")
        chosen = target.teachers.filter(pk=teacher).first()
        if chosen is None:
            self.fail(f"Project {project!r} has no teacher {teacher}.")
        try:
            run = generation_start(project=target, teacher=chosen, per_document=per_document, user=None)
        except ValidationError as exc:
            self.fail(" ".join(exc.messages))
        deadline = time.monotonic() + timeout
        run.refresh_from_db()
        while wait and not run.is_terminal and time.monotonic() < deadline:
            time.sleep(0.5)
            run.refresh_from_db()
        payload = {
            "run": run.pk, "status": run.status, "added": run.added, "duplicates": run.duplicates,
            "failed": run.failed, "total": run.total, "error": run.error or None,
        }  # fmt: skip
        if run.last_error:
            payload["last_error"] = run.last_error
        self.emit(payload)
        if wait and run.status != GenerationRun.Status.SUCCEEDED:
            raise SystemExit(1)
