from __future__ import annotations

import json
from pathlib import Path

from projects.models import Project
from slmstudio.lib.cli import JsonCommand
from training.wizard import recommend_for


class Command(JsonCommand):
    help = (
        "Recommend a recipe for a project from the team's answers (a JSON file; see the README for "
        'its keys). Prints {"recipe": [...], "why": [...], "estimates": {...}, "alternatives": [...]}. '
        "Document, pair and teacher counts are read from the project."
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("project", help="project slug")
        parser.add_argument("--answers", help="a JSON file with the answers (default: none, all defaults)")

    def handle(self, *args, project: str, answers: str | None, **options) -> None:  # type: ignore[no-untyped-def]
        target = Project.objects.filter(slug=project).first()
        if target is None:
            self.fail(f"No project {project!r}.")
        given: dict = {}
        if answers:
            try:
                given = json.loads(Path(answers).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                self.fail(f"Cannot read the answers file: {exc}")
            if not isinstance(given, dict):
                self.fail("The answers file holds one JSON object.")
        try:
            self.emit(recommend_for(target, given))
        except (TypeError, ValueError) as exc:
            self.fail(str(exc))
