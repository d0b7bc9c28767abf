"""Shared shape of the JSON-printing management commands (the CLI twins of UI actions)."""

from __future__ import annotations

import json
from typing import Any, NoReturn

from django.core.management.base import BaseCommand


class JsonCommand(BaseCommand):
    """A command prints exactly one JSON document on stdout; failures exit non-zero.

    An error the user can act on is printed as {"error": "..."} so scripts can read it too.
    """

    def emit(self, payload: dict[str, Any]) -> None:
        self.stdout.write(json.dumps(payload, ensure_ascii=False))

    def fail(self, message: str, **extra: Any) -> NoReturn:
        self.stdout.write(json.dumps({"error": message, **extra}, ensure_ascii=False))
        raise SystemExit(1)
