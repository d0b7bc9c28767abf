from __future__ import annotations

from django.core.exceptions import ValidationError

from slmstudio.lib.cli import JsonCommand
from training.management.commands._builds import build_payload, wait_for_end
from training.models import Build, ModelVersion
from training.services import version_changes, version_refresh


class Command(JsonCommand):
    help = (
        "Build a model version again from its project's current documents (the same recipe, base "
        "model and settings; unchanged passages come from the embedding cache). Prints "
        '{"refreshed": VERSION, "changes": {"documents_changed": N, "added": [...], "removed": [...], '
        '"changed": [...], "policy_changed": bool, "known": bool}, "build": ID, "status": ..., '
        '"model_version": ID or null, "metrics": {step: {...}}}; with --wait, waits for the build and '
        "exits 1 unless it succeeded. --check prints the changes only and starts nothing."
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("version", type=int, help="model version id")
        parser.add_argument("--check", action="store_true", help="only say what changed; build nothing")
        parser.add_argument("--wait", action="store_true", help="wait until the build ends")
        parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait at most")

    def handle(self, *args, version: int, check: bool, wait: bool, timeout: float, **options) -> None:  # type: ignore[no-untyped-def]
        target = ModelVersion.objects.select_related("project", "build", "base").filter(pk=version).first()
        if target is None:
            self.fail(f"No model version {version}.")
        payload: dict = {"refreshed": target.pk, "changes": version_changes(version=target).as_dict()}
        if check:
            self.emit(payload)
            return
        try:
            build = version_refresh(version=target, user=None)
        except ValidationError as exc:
            self.fail(" ".join(exc.messages))
        wait_for_end(build, wait=wait, timeout=timeout)
        payload |= build_payload(build, list(ModelVersion.objects.filter(build=build).order_by("number")))
        if build.error:
            payload["error"] = build.error
        self.emit(payload)
        if wait and build.status != Build.Status.SUCCEEDED:
            raise SystemExit(1)
