from __future__ import annotations

import time

from django.core.exceptions import ValidationError

from projects.models import Project
from slmstudio.lib.cli import JsonCommand
from training.models import Build
from training.services import build_start


class Command(JsonCommand):
    help = (
        "Start a build of a project (run by a worker). With --wait, wait for it to end. Prints "
        '{"build": ID, "status": ..., "error": ..., "steps": [{"name", "status", "metrics"}]}.'
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("project", help="project slug")
        parser.add_argument("--wait", action="store_true", help="wait until the build ends")
        parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait at most")

    def handle(self, *args, project: str, wait: bool, timeout: float, **options) -> None:  # type: ignore[no-untyped-def]
        target = Project.objects.filter(slug=project).first()
        if target is None:
            self.fail(f"No project {project!r}.")
        try:
            build = build_start(project=target, user=None)
        except ValidationError as exc:
            self.fail(" ".join(exc.messages))
        deadline = time.monotonic() + timeout
        while wait and not build.is_terminal and time.monotonic() < deadline:
            time.sleep(0.5)
            build.refresh_from_db()
        build.refresh_from_db()
        self.emit(
            {
                "build": build.pk,
                "status": build.status,
                "error": build.error,
                "steps": [
                    {"name": s.name, "status": s.status, "metrics": s.metrics} for s in build.steps.all()
                ],
            }
        )
        if wait and build.status != Build.Status.SUCCEEDED:
            raise SystemExit(1)
