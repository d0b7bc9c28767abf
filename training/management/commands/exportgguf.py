from __future__ import annotations

from pathlib import Path

from slmstudio.lib.cli import JsonCommand
from training.exports import EXPORT_TYPES, ExportError, version_export_gguf
from training.ml.gguf_convert import UnsupportedModel
from training.models import ModelVersion


class Command(JsonCommand):
    help = (
        "Write a model version as a GGUF file, as built or as another type; prints "
        '{"path", "type", "size_bytes", "bits_per_weight", "made"}.'
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("version", type=int, help="model version id")
        parser.add_argument("--out", required=True, help="the .gguf file to write")
        parser.add_argument("--type", choices=EXPORT_TYPES, help="default: the version's own type")

    def handle(self, *args, version: int, out: str, type: str | None, **options) -> None:  # type: ignore[no-untyped-def]
        target = ModelVersion.objects.select_related("project", "base").filter(pk=version).first()
        if target is None:
            self.fail(f"No model version {version}.")
        try:
            exported = version_export_gguf(version=target, out=Path(out), type=type)
        except (ExportError, UnsupportedModel) as exc:
            self.fail(str(exc))
        self.emit(
            {
                "path": str(exported.path.resolve()),
                "type": exported.type,
                "size_bytes": exported.size_bytes,
                "bits_per_weight": round(exported.bits_per_weight, 3),
                "made": exported.made,
            }
        )
