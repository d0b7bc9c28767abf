from __future__ import annotations

from django.core.exceptions import ValidationError

from slmstudio.lib.cli import JsonCommand
from training import registry


class Command(JsonCommand):
    help = (
        "List the base models builds can start from, or register one with --add PATH_OR_HUB_ID "
        '[--name NAME]; prints {"base_models": [{"slug", "name", "kind", "source", "info"}]}.'
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--add", help="a safetensors folder, a .gguf file or (online) a hub id")
        parser.add_argument("--name", default="")

    def handle(self, *args, add: str | None, name: str, **options) -> None:  # type: ignore[no-untyped-def]
        if add:
            try:
                registry.base_model_register(source=add, name=name)
            except ValidationError as exc:
                self.fail(" ".join(exc.messages))
        self.emit(
            {
                "base_models": [
                    {"slug": b.slug, "name": b.name, "kind": b.kind, "source": b.source, "info": b.info}
                    for b in registry.base_models_list()
                ]
            }
        )
