from __future__ import annotations

from projects.management.commands._lookup import project_by_slug
from projects.privacy import findings_summary, project_scan
from slmstudio.lib.cli import JsonCommand


class Command(JsonCommand):
    help = (
        "Scan a project's documents and instruction pairs for personal data and secrets (what is "
        'new, or everything with --rescan). Prints {"findings": {TYPE: N, ...}, "documents": N, '
        '"pairs": N} (documents and pairs scanned; findings marked as false alarms are not counted), '
        'plus "documents_with_findings", "pairs_with_findings", "unredacted" (findings the policy '
        'keeps as is) and "scanned_now": {"documents": N, "pairs": N}.'
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("project", help="project slug")
        parser.add_argument(
            "--rescan", action="store_true", help="scan everything again, not only what is new"
        )

    def handle(self, *args, project: str, rescan: bool, **options) -> None:  # type: ignore[no-untyped-def]
        target = project_by_slug(project)
        if target is None:
            self.fail(f"No project {project!r}.")
        scanned = project_scan(project=target, rescan=rescan)
        self.emit(
            findings_summary(project=target)
            | {"scanned_now": {"documents": scanned.documents, "pairs": scanned.pairs}}
        )
