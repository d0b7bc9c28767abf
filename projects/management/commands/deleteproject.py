from __future__ import annotations

from django.core.exceptions import ValidationError

from projects.management.commands._lookup import project_by_slug
from projects.services import project_delete
from slmstudio.lib.cli import JsonCommand


class Command(JsonCommand):
    help = (
        "Delete a project with all its data and files (refused while a build or pair generation "
        'is queued or running). Needs --yes. Prints {"deleted": SLUG}.'
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("project", help="project slug")
        parser.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")

    def handle(self, *args, project: str, yes: bool, **options) -> None:  # type: ignore[no-untyped-def]
        target = project_by_slug(project)
        if target is None:
            self.fail(f"No project {project!r}.")
        if not yes:
            # The web page asks for the project's name; a script says --yes.
            self.fail(f"Deleting {project!r} cannot be undone: run again with --yes.")
        try:
            project_delete(project=target, actor=None)
        except ValidationError as exc:
            self.fail(" ".join(exc.messages))
        self.emit({"deleted": project})
