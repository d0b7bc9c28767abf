"""What the commands that start a build (build, refresh, resumebuild) share: waiting for it, and
its JSON."""

from __future__ import annotations

import time

from training.models import Build, ModelVersion


def wait_for_end(build: Build, *, wait: bool, timeout: float) -> None:
    """With `wait`, poll until the build ends or `timeout` seconds pass; `build` is then fresh."""
    deadline = time.monotonic() + timeout
    while wait and not build.is_terminal and time.monotonic() < deadline:
        time.sleep(0.5)
        build.refresh_from_db()
    build.refresh_from_db()


def build_payload(build: Build, versions: list[ModelVersion]) -> dict:
    """{"build", "status", "model_version" (the first it made), "metrics" (per step; quantize
    steps told apart by type, evaluate holding each model's numbers)}."""
    return {
        "build": build.pk,
        "status": build.status,
        "model_version": versions[0].pk if versions else None,
        "metrics": {
            f"{s.name}:{s.params['type']}" if s.name == "quantize" else s.name: s.metrics
            for s in build.steps.all()
        },
    }
