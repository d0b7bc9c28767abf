from __future__ import annotations

from pathlib import Path

from slmstudio.backups import BackupError, backup_restore
from slmstudio.lib.cli import JsonCommand


class Command(JsonCommand):
    help = (
        "Restore an archive written by `backup` into this installation, which must be migrated and "
        "empty (no users, no projects); --replace --yes replaces everything in it instead. Stop the "
        "web and worker processes first. Prints "
        '{"restored": PATH, "projects": N, "documents": N, "pairs": N, "builds": N, "model_versions": N, '
        '"files": N, "warnings": [...]}.'
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("archive", type=Path)
        parser.add_argument(
            "--replace",
            action="store_true",
            help="delete this installation's rows and its projects' and builds' files first",
        )
        parser.add_argument("--yes", action="store_true", help="confirm --replace")

    def handle(self, *args, archive: Path, replace: bool, yes: bool, **options) -> None:  # type: ignore[no-untyped-def]
        if replace and not yes:
            # No prompt: the command prints JSON for scripts, so the confirmation is a flag.
            self.fail("--replace deletes everything in this installation first; add --yes to confirm.")
        try:
            result = backup_restore(archive=archive, replace=replace)
        except (BackupError, OSError) as exc:
            self.fail(str(exc))
        self.emit(
            {
                "restored": str(result.path),
                **result.counts.as_dict(),
                "files": result.files,
                "warnings": result.warnings,
            }
        )
