from __future__ import annotations

from slmstudio.backups import BackupError, backup_create
from slmstudio.lib.cli import JsonCommand


class Command(JsonCommand):
    help = (
        "Write one archive of this installation: the database as portable JSON and the files under "
        "DATA_DIR its rows point at, keys included (keep it secret; docs/backups.md). Prints "
        '{"backup": PATH, "bytes": N, "projects": N, "documents": N, "pairs": N, "builds": N, '
        '"model_versions": N, "files": N, "warnings": [...]}.'
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument(
            "--out",
            required=True,
            help="the archive to write (.tar.gz), or a folder to write slmstudio-<date>-<time>.tar.gz into",
        )

    def handle(self, *args, out: str, **options) -> None:  # type: ignore[no-untyped-def]
        try:
            result = backup_create(out=out)
        except (BackupError, OSError) as exc:
            self.fail(str(exc))
        self.emit(
            {
                "backup": str(result.path),
                "bytes": result.bytes,
                **result.counts.as_dict(),
                "files": result.files,
                "warnings": result.warnings,
            }
        )
