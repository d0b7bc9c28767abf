from __future__ import annotations

from inference.evaluation import CONTRACT_KEYS, version_evaluate
from slmstudio.lib.cli import JsonCommand
from training.models import ModelVersion


class Command(JsonCommand):
    help = (
        "Measure a model version on its project's held-out data (the build's own evaluation, run "
        'again) and keep the numbers on it; prints {"perplexity", "bits_per_byte", "kl_divergence", '
        '"answer_f1", "tokens_per_second", "size_bytes", "peak_memory_bytes", ...}; a number that '
        "does not apply is null."
    )

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("version", type=int, help="model version id")

    def handle(self, *args, version: int, **options) -> None:  # type: ignore[no-untyped-def]
        target = ModelVersion.objects.select_related("project", "base").filter(pk=version).first()
        if target is None:
            self.fail(f"No model version {version}.")
        if not target.gguf_file.is_file():
            self.fail(f"The model file of {target.name} is missing: {target.gguf_file}")
        metrics = version_evaluate(version=target)
        # The contract's keys first, in their order; the other measurements after them.
        self.emit({key: metrics[key] for key in CONTRACT_KEYS} | metrics)
