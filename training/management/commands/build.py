from __future__ import annotations

import time

from django.core.exceptions import ValidationError

from projects.models import Project
from slmstudio.lib.cli import JsonCommand
from training.models import Build, ModelVersion
from training.recipes import DEFAULT_RECIPE, RECIPES
from training.services import build_start


class Command(JsonCommand):
    help = (
        "Start a build of a project (a worker runs it). With --wait, wait for it to end and print "
        '{"build": ID, "status": ..., "model_version": ID or null, "metrics": {step: {...}}}; '
        "exit 1 unless it succeeded."
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("project", help="project slug")
        parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES))
        parser.add_argument("--wait", action="store_true", help="wait until the build ends")
        parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait at most")
        parser.add_argument("--chunk-chars", type=int, help="rag: passage size in characters")
        parser.add_argument("--overlap-chars", type=int, help="rag: characters repeated between passages")

    def handle(  # type: ignore[no-untyped-def]
        self,
        *args,
        project: str,
        recipe: str,
        wait: bool,
        timeout: float,
        chunk_chars,
        overlap_chars,
        **options,
    ) -> None:
        target = Project.objects.filter(slug=project).first()
        if target is None:
            self.fail(f"No project {project!r}.")
        steps = RECIPES[recipe].step_list()
        rag_params = {k: v for k, v in (("chunk_chars", chunk_chars), ("overlap_chars", overlap_chars)) if v}
        for step in steps:
            if step["name"] == "rag":
                step["params"] = step["params"] | rag_params
        try:
            build = build_start(project=target, user=None, recipe=recipe, steps=steps)
        except ValidationError as exc:
            self.fail(" ".join(exc.messages))
        deadline = time.monotonic() + timeout
        while wait and not build.is_terminal and time.monotonic() < deadline:
            time.sleep(0.5)
            build.refresh_from_db()
        build.refresh_from_db()
        version = ModelVersion.objects.filter(build=build).first()
        payload = {
            "build": build.pk,
            "status": build.status,
            "model_version": version.pk if version else None,
            "metrics": {s.name: s.metrics for s in build.steps.all()},
        }
        if build.error:
            payload["error"] = build.error
        self.emit(payload)
        if wait and build.status != Build.Status.SUCCEEDED:
            raise SystemExit(1)
