from __future__ import annotations

from django.core.exceptions import ValidationError

from projects.models import Project
from slmstudio.lib.cli import JsonCommand
from training.management.commands._builds import build_payload, wait_for_end
from training.models import BaseModel, Build, ModelVersion
from training.recipes import DEFAULT_RECIPE
from training.services import build_start, step_settings


class Command(JsonCommand):
    help = (
        "Start a build of a project (a worker runs it). With --wait, wait for it to end and print "
        '{"build": ID, "status": ..., "model_version": ID or null, "metrics": {step: {...}}, '
        '"model_versions": [{"model_version": ID, "name", "type", "metrics": {...}}]} '
        "(a build makes one version per quantization type; model_version is the first); "
        "exit 1 unless it succeeded."
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("project", help="project slug")
        parser.add_argument(
            "--recipe",
            default=DEFAULT_RECIPE,
            help="comma-separated items: rag, quantize:<type> (e.g. quantize:q8_0,quantize:q4_k_m), or check",
        )
        parser.add_argument("--base", help="base model slug (default: the bundled SmolLM2-135M-Instruct)")
        parser.add_argument("--wait", action="store_true", help="wait until the build ends")
        parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait at most")
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="STEP.KEY=VALUE",
            help="a step setting, e.g. lora.epochs=1, lora.max_steps=20, lora.rank=8, raft.oracle_fraction=0.8",
        )
        parser.add_argument("--chunk-chars", type=int, help="rag: passage size in characters")
        parser.add_argument("--overlap-chars", type=int, help="rag: characters repeated between passages")

    def handle(  # type: ignore[no-untyped-def]
        self,
        *args,
        project: str,
        recipe: str,
        base,
        wait: bool,
        timeout: float,
        chunk_chars,
        overlap_chars,
        **options,
    ) -> None:
        target = Project.objects.filter(slug=project).first()
        if target is None:
            self.fail(f"No project {project!r}.")
        base_model = None
        if base:
            base_model = BaseModel.objects.filter(slug=base).first()
            if base_model is None:
                self.fail(f"No base model {base!r}; see python manage.py basemodels.")
        rag_params = {k: v for k, v in (("chunk_chars", chunk_chars), ("overlap_chars", overlap_chars)) if v}
        try:
            params = step_settings(options["set"])
        except ValueError as exc:
            self.fail(str(exc))
        params["rag"] = params.get("rag", {}) | rag_params
        try:
            build = build_start(project=target, user=None, recipe=recipe, base=base_model, params=params)
        except ValidationError as exc:
            self.fail(" ".join(exc.messages))
        wait_for_end(build, wait=wait, timeout=timeout)
        versions = list(ModelVersion.objects.filter(build=build).order_by("number"))
        payload = build_payload(build, versions) | {
            "model_versions": [
                {"model_version": v.pk, "name": v.name, "type": v.quant_type, "metrics": v.metrics}
                for v in versions
            ],
        }
        if build.error:
            payload["error"] = build.error
        self.emit(payload)
        if wait and build.status != Build.Status.SUCCEEDED:
            raise SystemExit(1)
