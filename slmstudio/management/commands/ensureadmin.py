from __future__ import annotations

import secrets

from django.contrib.auth import get_user_model

from slmstudio.lib.cli import JsonCommand


class Command(JsonCommand):
    help = (
        "Create the first administrator if there is none, printing its password once. "
        'Prints {"created": bool, "username": ..., "password": ... (only when created)}.'
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--username", default="admin")

    def handle(self, *args, username: str, **options) -> None:  # type: ignore[no-untyped-def]
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            self.emit({"created": False})
            return
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email="", password=password)
        self.emit({"created": True, "username": username, "password": password})
