"""Recipes as data: YAML a team can read, edit, keep in version control and import again.

    name: Maximum compression
    steps:
      - rag
      - lora: {epochs: 1}
      - prune: {method: structured, target: 0.7}
      - heal
      - quantize: {type: q4_k_m}

Each step is an item name, or a one-key mapping from the item to its settings (the same settings
`--set STEP.KEY=VALUE` takes). Validation is `recipe_plan`'s, with its plain messages.
"""

from __future__ import annotations

from typing import Any

import yaml

from .recipes import RecipeError, recipe_plan


def recipe_to_yaml(name: str, recipe: str, settings: list[str]) -> str:
    per_step: dict[str, dict[str, Any]] = {}
    for assignment in settings:
        key, _, value = assignment.partition("=")
        step, _, field = key.partition(".")
        per_step.setdefault(step, {})[field] = value
    steps: list[Any] = []
    for item in recipe.split(","):
        if item.startswith("quantize:"):
            steps.append({"quantize": {"type": item.removeprefix("quantize:")}})
        elif per_step.get(item):
            steps.append({item: per_step[item]})
        else:
            steps.append(item)
    return yaml.safe_dump({"name": name, "steps": steps}, sort_keys=False, allow_unicode=True)


def recipe_from_yaml(text: str) -> tuple[str, str, list[str]]:
    """(name, recipe string, settings) from YAML; RecipeError with a plain message otherwise."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"The file is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
        raise RecipeError(
            "A recipe file has a name and a list of steps (see the example in the Recipes panel)."
        )
    name = str(data.get("name") or "Imported recipe").strip()[:200]
    items: list[str] = []
    settings: list[str] = []
    for step in data["steps"]:
        if isinstance(step, str):
            items.append(step.strip())
            continue
        if not (isinstance(step, dict) and len(step) == 1):
            raise RecipeError(f"Each step is a name or “name: {{settings}}”; this one is neither: {step!r}.")
        ((item, values),) = step.items()
        values = values or {}
        if not isinstance(values, dict):
            raise RecipeError(f"The settings of {item} are a mapping, e.g. {{epochs: 1}}.")
        if item == "quantize":
            if "type" not in values:
                raise RecipeError("A quantize step names its type, e.g. quantize: {type: q4_k_m}.")
            items.append(f"quantize:{values['type']}")
            continue
        items.append(str(item))
        settings += [f"{item}.{k}={v}" for k, v in values.items()]
    training = [i for i, item in enumerate(items) if item in ("lora", "raft", "distill", "prune", "heal")]
    quantized = [i for i, item in enumerate(items) if item.startswith("quantize:")]
    if training and quantized and min(quantized) < max(training):
        raise RecipeError(
            "Quantize comes after every training and pruning step: a compressed model is not trained "
            "further. Move the quantize steps to the end."
        )
    recipe = ",".join(items)
    recipe_plan(recipe)  # raises RecipeError with the reason
    return name, recipe, settings
