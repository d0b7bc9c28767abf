from __future__ import annotations

from pathlib import Path

from projects.management.commands._lookup import project_by_slug
from projects.services import pairs_import
from slmstudio.lib.cli import JsonCommand


class Command(JsonCommand):
    help = (
        "Import instruction pairs from a JSONL/CSV file; only valid rows are added. Prints "
        '{"added": N, "rejected": [{"line": N, "error": ...}], "train": N, "eval": N}.'
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("project", help="project slug")
        parser.add_argument("file", type=Path)

    def handle(self, *args, project: str, file: Path, **options) -> None:  # type: ignore[no-untyped-def]
        target = project_by_slug(project)
        if target is None:
            self.fail(f"No project {project!r}.")
        try:
            data = file.read_bytes()
        except OSError as exc:
            self.fail(f"Cannot read {file}: {exc.strerror}.")
        report = pairs_import(project=target, data=data, filename=file.name)
        if report.file_error:
            self.fail(report.file_error, added=0, rejected=[], train=0, eval=0)
        self.emit(report.as_json())
