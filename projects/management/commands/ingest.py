from __future__ import annotations

from pathlib import Path

from projects.management.commands._lookup import project_by_slug
from projects.services import documents_ingest_paths
from slmstudio.lib.cli import JsonCommand


class Command(JsonCommand):
    help = (
        "Add documents (files or folders, recursively) to a project and parse them. Prints "
        '{"added": N, "duplicates": N, "failed": [{"path": ..., "error": ...}]}; exits 1 if any failed.'
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("project", help="project slug")
        parser.add_argument("paths", nargs="+", type=Path)

    def handle(self, *args, project: str, paths: list[Path], **options) -> None:  # type: ignore[no-untyped-def]
        target = project_by_slug(project)
        if target is None:
            self.fail(f"No project {project!r}.")
        result = documents_ingest_paths(project=target, paths=paths)
        self.emit({"added": result.added, "duplicates": result.duplicates, "failed": result.failed})
        if result.failed:
            raise SystemExit(1)
