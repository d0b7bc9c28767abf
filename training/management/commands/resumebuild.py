from __future__ import annotations

from slmstudio.lib.cli import JsonCommand
from training.management.commands._builds import wait_for_end
from training.models import Build
from training.services import build_resume


class Command(JsonCommand):
    help = (
        "Queue a timed-out build again; it continues from its last finished step and training "
        'checkpoint. Prints {"build": ID, "status": ...}; with --wait, waits for it to end and '
        "exits 1 unless it succeeded."
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("build", type=int, help="build id")
        parser.add_argument("--wait", action="store_true", help="wait until the build ends")
        parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait at most")

    def handle(self, *args, build: int, wait: bool, timeout: float, **options) -> None:  # type: ignore[no-untyped-def]
        target = Build.objects.filter(pk=build).first()
        if target is None:
            self.fail(f"No build {build}.")
        if not target.can_resume:
            self.fail(
                f"Build {build} is {target.get_status_display().lower()}; only a timed-out build can be resumed."
            )
        target = build_resume(build=target)
        wait_for_end(target, wait=wait, timeout=timeout)
        payload = {"build": target.pk, "status": target.status}
        if target.error:
            payload["error"] = target.error
        self.emit(payload)
        if wait and target.status != Build.Status.SUCCEEDED:
            raise SystemExit(1)
