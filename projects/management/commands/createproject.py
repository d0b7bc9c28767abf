from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError

from projects.services import project_create
from slmstudio.lib.cli import JsonCommand


class Command(JsonCommand):
    help = 'Create a project owned by USERNAME. Prints {"project": SLUG}.'

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("name")
        parser.add_argument("--owner", required=True, help="username of the owner")
        parser.add_argument("--description", default="")

    def handle(self, *args, name: str, owner: str, description: str, **options) -> None:  # type: ignore[no-untyped-def]
        User = get_user_model()
        user = User.objects.filter(username=owner).first()
        if user is None:
            self.fail(f"No user called {owner!r}.")
        try:
            project = project_create(name=name, owner=user, description=description)
        except ValidationError as exc:
            self.fail(" ".join(exc.messages))
        self.emit({"project": project.slug})
