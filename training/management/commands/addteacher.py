from __future__ import annotations

import os

from django.core.exceptions import ValidationError

from projects.models import Project
from slmstudio.lib.cli import JsonCommand
from training.teachers import teacher_add


class Command(JsonCommand):
    help = (
        "Register a teacher for a project: an OpenAI-compatible endpoint (--endpoint URL --model NAME "
        "[--api-key-env VAR]) or a local Hugging Face folder / GGUF file (--path PATH). Prints "
        '{"teacher": ID, "name", "kind"}. The API key is read from the environment variable named by '
        "--api-key-env (never from the command line, where it would land in the shell history) and "
        "stored encrypted."
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("project", help="project slug")
        parser.add_argument("name", help="a name for the teacher, unique in the project")
        parser.add_argument("--endpoint", default="", help="base URL, e.g. http://127.0.0.1:8080/v1")
        parser.add_argument("--model", default="", help="the model name the endpoint serves")
        parser.add_argument("--api-key-env", default="", help="environment variable holding the API key")
        parser.add_argument("--path", default="", help="a local safetensors folder or .gguf file")
        parser.add_argument("--rate-limit", type=float, default=None, help="requests per minute at most")
        parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one answer")
        parser.add_argument("--concurrency", type=int, default=2, help="requests in flight at most")
        parser.add_argument("--check", action="store_true", help="also test the connection")

    def handle(self, *args, **o) -> None:  # type: ignore[no-untyped-def]
        project = Project.objects.filter(slug=o["project"]).first()
        if project is None:
            self.fail(f"No project {o['project']!r}.")
        api_key = ""
        if o["api_key_env"]:
            api_key = os.environ.get(o["api_key_env"], "")
            if not api_key:
                self.fail(f"The environment variable {o['api_key_env']} is empty or not set.")
        try:
            teacher = teacher_add(
                project=project, name=o["name"], user=None, endpoint=o["endpoint"], model=o["model"],
                api_key=api_key, path=o["path"], requests_per_minute=o["rate_limit"],
                timeout_seconds=o["timeout"], max_concurrency=o["concurrency"],
            )  # fmt: skip
        except ValidationError as exc:
            self.fail(" ".join(exc.messages))
        payload = {"teacher": teacher.pk, "name": teacher.name, "kind": teacher.kind}
        if o["check"]:
            from training.teachers import teacher_check

            payload["check"] = teacher_check(teacher=teacher)
        self.emit(payload)
