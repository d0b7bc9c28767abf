"""Named recipes: the ordered steps a build runs, and whether the build yields a model."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    name: str
    label: str
    description: str
    steps: tuple[str, ...]
    produces_model: bool
    params: dict[str, dict] = field(default_factory=dict)

    def step_list(self) -> list[dict]:
        return [{"name": s, "params": self.params.get(s, {})} for s in self.steps]


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="check",
            label="Check data",
            description="Reads every document and checks your instruction pairs. Makes no model.",
            steps=("parse", "validate"),
            produces_model=False,
        ),
        Recipe(
            name="rag",
            label="Answer from your documents",
            description=(
                "Indexes your documents for retrieval (exact terms and meaning) and answers with the "
                "bundled SmolLM2-135M model, citing the passages it used."
            ),
            steps=("parse", "rag"),
            produces_model=True,
        ),
    )
}
DEFAULT_RECIPE = "rag"
