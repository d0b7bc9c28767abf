from __future__ import annotations

import pytest

from training.recipes import RecipeError, recipe_label, recipe_plan


def names(plan) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        f"{s['name']}:{s['params']['type']}" if s["params"].get("type") else s["name"] for s in plan.steps
    ]


def test_rag_indexes_and_ends_with_evaluate() -> None:
    plan = recipe_plan("rag")
    assert names(plan) == ["parse", "rag", "evaluate"] and plan.produces_model and plan.rag


def test_quantize_types_convert_once_then_quantize_each() -> None:
    plan = recipe_plan("quantize:q8_0, quantize:Q4_K_M,quantize:q8_0")
    assert plan.recipe == "quantize:q8_0,quantize:q4_k_m"  # normalised, duplicates dropped
    assert names(plan) == ["parse", "base", "convert:f16", "quantize:q8_0", "quantize:q4_k_m", "evaluate"]
    assert plan.quantize == ("q8_0", "q4_k_m") and not plan.rag


def test_rag_with_quantize_and_a_base_without_gguf() -> None:
    assert names(recipe_plan("quantize:q4_0,rag")) == [
        "parse", "rag", "base", "convert:f16", "quantize:q4_0", "evaluate",
    ]  # fmt: skip
    assert recipe_plan("quantize:q4_0,rag").recipe == "rag,quantize:q4_0"
    # A safetensors-only base must be converted before it can serve, even without quantizing.
    assert names(recipe_plan("rag", base_has_gguf=False)) == [
        "parse",
        "rag",
        "base",
        "convert:f16",
        "evaluate",
    ]


def test_check_makes_no_model_and_stands_alone() -> None:
    plan = recipe_plan("check")
    assert names(plan) == ["parse", "validate"] and not plan.produces_model
    with pytest.raises(RecipeError, match="cannot be combined"):
        recipe_plan("check,rag")


@pytest.mark.parametrize(
    ("recipe", "message"),
    [("", "empty"), ("quantize:q3_k", "Unknown quantization type"), ("sparsify", "Unknown recipe item")],
)
def test_bad_recipes_say_what_is_wrong(recipe: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        recipe_plan(recipe)


def test_labels_are_plain_words() -> None:
    assert recipe_label("rag,quantize:q4_k_m") == "Answers from your documents; quantized to Q4_K_M"
    assert recipe_label("nonsense") == "nonsense"


def test_imatrix_guides_every_quantize_step() -> None:
    plan = recipe_plan("imatrix,quantize:q4_k_m,quantize:q4_0")
    assert plan.recipe == "quantize:q4_k_m,quantize:q4_0,imatrix" and plan.imatrix
    assert [s["params"] for s in plan.steps if s["name"] == "quantize"] == [
        {"type": "q4_k_m", "imatrix": True}, {"type": "q4_0", "imatrix": True},
    ]  # fmt: skip
    with pytest.raises(RecipeError, match="add at least one quantize"):
        recipe_plan("rag,imatrix")


def test_fine_tuning_trains_on_the_base_then_converts_what_it_made() -> None:
    assert names(recipe_plan("rag,lora,quantize:q4_k_m")) == [
        "parse", "rag", "base", "lora", "convert:f16", "quantize:q4_k_m", "evaluate",
    ]  # fmt: skip
    # RAFT needs the index: it brings the rag step with it.
    plan = recipe_plan("raft")
    assert plan.recipe == "rag,raft" and names(plan) == [
        "parse",
        "rag",
        "base",
        "raft",
        "convert:f16",
        "evaluate",
    ]
    with pytest.raises(RecipeError, match="Choose one of lora, raft or distill"):
        recipe_plan("lora,raft")
