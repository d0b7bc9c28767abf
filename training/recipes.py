"""Recipes: what a build does, written as a comma-separated list of items.

    rag                          index the documents; answer with the base model, citing them
    quantize:q8_0,quantize:q4_k_m  convert the base model and quantize it to each type
    quantize:q4_k_m,imatrix      the same, guided by an importance matrix from the documents
    rag,quantize:q4_k_m          both: the quantized models answer from the documents
    rag,lora,quantize:q4_k_m     also fine-tune on the instruction pairs first (LoRA)
    rag,raft                     fine-tune on retrieval-augmented examples (RAFT)
    prune                        prune the model (settings: --set prune.method=wanda ...)
    prune,heal                   prune, then a short LoRA fine-tune to recover quality
    distill                      learn from a teacher (--set distill.teacher=ID distill.mode=logits|sequence)
    rag,lora,prune,quantize:q4_k_m  the "maximum compression" chain
    check                        read documents and check pairs only (makes no model)

`recipe_plan` turns a recipe into the ordered steps a Build runs. Every recipe that makes a model
ends with `evaluate`, so every model version carries measured numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# llama.cpp types offered to users, best quality first. K-quants need rows divisible by 256;
# models like SmolLM2-135M (hidden 576) fall back to other types on most tensors, so the build
# reports the bits per weight it really got.
QUANTIZE_TYPES: dict[str, str] = {
    "q8_0": "Q8_0 · 8-bit, near lossless",
    "q6_k": "Q6_K · 6-bit",
    "q5_k_m": "Q5_K_M · 5-bit",
    "q5_0": "Q5_0 · 5-bit",
    "q4_k_m": "Q4_K_M · 4-bit, the usual choice",
    "q4_0": "Q4_0 · 4-bit, smallest",
    "q4_1": "Q4_1 · 4-bit",
}


@dataclass(frozen=True)
class Recipe:
    """A named recipe the builds page offers as a button."""

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
            steps=("parse", "rag", "evaluate"),
            produces_model=True,
        ),
    )
}
DEFAULT_RECIPE = "rag"


class RecipeError(ValueError):
    """A recipe string that names no valid build; the message says what is wrong."""


@dataclass(frozen=True)
class Plan:
    recipe: str  # normalised: "rag,quantize:q8_0,quantize:q4_k_m"
    steps: list[dict]
    produces_model: bool
    rag: bool
    quantize: tuple[str, ...]
    imatrix: bool = False
    tune: str = ""  # "lora", "raft", "distill" or "" (no fine-tuning)
    prune: bool = False
    heal: bool = False


def recipe_plan(recipe: str, *, base_has_gguf: bool = True) -> Plan:
    """The steps for `recipe`. `base_has_gguf`: whether the base model can be served as it is
    (the bundled GGUF can; a registered safetensors folder must be converted first)."""
    items = [item.strip().lower() for item in recipe.split(",") if item.strip()]
    if not items:
        raise RecipeError("The recipe is empty. Use rag, quantize:<type> or check.")
    if "check" in items:
        if items != ["check"] * len(items):
            raise RecipeError("“check” makes no model and cannot be combined with other items.")
        return Plan("check", RECIPES["check"].step_list(), produces_model=False, rag=False, quantize=())
    rag = imatrix = prune = heal = False
    tune = ""
    types: list[str] = []
    for item in items:
        if item == "rag":
            rag = True
        elif item == "imatrix":
            imatrix = True
        elif item == "prune":
            prune = True
        elif item == "heal":
            heal = True
        elif item in ("lora", "raft", "distill"):
            if tune and tune != item:
                raise RecipeError(
                    "Choose one of lora, raft or distill: each trains the model once, in its own way."
                )
            tune = item
        elif item.startswith("quantize:"):
            qtype = item.removeprefix("quantize:")
            if qtype not in QUANTIZE_TYPES:
                raise RecipeError(f"Unknown quantization type “{qtype}”. Known: {', '.join(QUANTIZE_TYPES)}.")
            if qtype not in types:
                types.append(qtype)
        else:
            raise RecipeError(
                f"Unknown recipe item “{item}”. Use rag, lora, raft, distill, prune, heal, quantize:<type>, "
                "imatrix or check."
            )
    # RAFT trains on retrieved passages, so it needs the index (and the model serves with it).
    rag = rag or tune == "raft"
    steps: list[dict] = [{"name": "parse", "params": {}}]
    if rag:
        steps.append({"name": "rag", "params": {}})
    if heal and not prune:
        raise RecipeError("“heal” fine-tunes a pruned model: add the prune item.")
    if types or tune or prune or not base_has_gguf:
        steps.append({"name": "base", "params": {}})
        if tune:
            steps.append({"name": tune, "params": {}})
        if prune:
            steps.append({"name": "prune", "params": {}})
        if heal:
            steps.append({"name": "heal", "params": {}})
        steps.append({"name": "convert", "params": {"type": "f16"}})
    if imatrix and not types:
        raise RecipeError("“imatrix” guides quantization: add at least one quantize:<type> item.")
    steps += [
        {"name": "quantize", "params": {"type": t} | ({"imatrix": True} if imatrix else {})} for t in types
    ]
    steps.append({"name": "evaluate", "params": {}})
    normalised = ",".join(
        (["rag"] if rag else [])
        + ([tune] if tune else [])
        + (["prune"] if prune else [])
        + (["heal"] if heal else [])
        + [f"quantize:{t}" for t in types]
        + (["imatrix"] if imatrix else [])
    )
    return Plan(
        normalised, steps, produces_model=True, rag=rag, quantize=tuple(types), imatrix=imatrix, tune=tune,
        prune=prune, heal=heal,
    )  # fmt: skip


def recipe_label(recipe: str) -> str:
    """Words for a recipe string, for pages and model cards."""
    try:
        plan = recipe_plan(recipe)
    except RecipeError:
        return recipe
    if not plan.produces_model:
        return RECIPES["check"].label
    parts = []
    if plan.rag:
        parts.append("answers from your documents")
    if plan.tune == "lora":
        parts.append("fine-tuned on your instruction pairs (LoRA)")
    elif plan.tune == "raft":
        parts.append("fine-tuned to answer from retrieved passages (RAFT)")
    elif plan.tune == "distill":
        parts.append("taught by a larger teacher model (distillation)")
    if plan.prune:
        parts.append("pruned and healed" if plan.heal else "pruned")
    if plan.quantize:
        # Whether an importance matrix was really used is the quantize step's to say (imatrix_tokens).
        parts.append("quantized to " + ", ".join(t.upper() for t in plan.quantize))
    text = "; ".join(parts)
    return text[:1].upper() + text[1:] if text else recipe
