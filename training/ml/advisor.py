"""The decision matrix of the four approaches, as code: from a team's situation to one recipe,
the reasons, and the alternatives. Django-free; `training/wizard.py` fills in what the project
and the machine already tell, and the estimates.

The matrix (the seed article's, in our words):

| situation                                   | approach                  | needs                      |
|---------------------------------------------|---------------------------|----------------------------|
| answers must come from changing documents   | RAG (retrieval)           | documents                  |
| a tone, format or task to learn from pairs  | LoRA fine-tuning          | ~50+ instruction pairs     |
| documents and pairs, accuracy first         | RAFT (RAG-aware LoRA)     | documents and pairs        |
| a stronger model may teach a smaller one    | distillation              | a teacher                  |
| must run small/fast (laptop, edge, memory)  | quantization (Q4_K_M/Q8_0)| nothing extra              |
| must be smaller still, quality may give     | pruning (+ healing)       | documents to calibrate     |
| already have a fine-tuned model             | skip training; compress   | that model as the base     |

and its combination scenarios: "maximum compression" (rag, lora, prune, quantize:q4_k_m),
"knowledge transfer + efficiency" (distill, quantize:q4_k_m), "fastest path to production"
(rag, quantize:q4_k_m).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PRIORITIES = ("accuracy", "speed", "size", "budget", "privacy")
TARGETS = ("cpu", "gpu", "edge")
MIN_PAIRS_FOR_TRAINING = 50

SCENARIOS: dict[str, dict] = {
    "maximum-compression": {
        "label": "Maximum compression",
        "recipe": "rag,lora,prune,heal,quantize:q4_k_m",
        "why": "Fine-tune on your pairs, remove what your documents need least, heal, then compress to 4 bits: "
        "the smallest model that still knows your domain.",
    },
    "knowledge-transfer": {
        "label": "Knowledge transfer + efficiency",
        "recipe": "distill,quantize:q4_k_m",
        "why": "A stronger teacher teaches the small model, which is then compressed to run cheaply.",
    },
    "fastest-path": {
        "label": "Fastest path to production",
        "recipe": "rag,quantize:q4_k_m",
        "why": "Index your documents and compress the base model: no training, answers cite your documents "
        "from the first build.",
    },
}

APPROACHES: dict[str, dict[str, str]] = {
    "rag": {
        "label": "Answer from your documents (RAG)",
        "does": "Finds the passages of your documents that match a question and has the model answer from them, "
        "citing them.",
        "needs": "Documents.",
        "costs": "Minutes to index; nothing to train. Answers are only as good as what retrieval finds.",
    },
    "lora": {
        "label": "Fine-tune on your pairs (LoRA)",
        "does": "Teaches the model your answers' facts, tone and format with a small add-on trained on your "
        "instruction pairs.",
        "needs": f"Instruction pairs (at least {MIN_PAIRS_FOR_TRAINING} to be worth it).",
        "costs": "Minutes to an hour on this server; no larger model.",
    },
    "raft": {
        "label": "Fine-tune to use your documents (RAFT)",
        "does": "Fine-tunes on your pairs shown with retrieved passages, some unrelated, so the model learns to "
        "use the right passage and ignore the rest.",
        "needs": "Documents and instruction pairs.",
        "costs": "Longer training than LoRA (longer examples).",
    },
    "distill": {
        "label": "Learn from a teacher (distillation)",
        "does": "A larger model's answers (or predictions) become the small model's training data.",
        "needs": "A teacher: a larger local model or an API you may use.",
        "costs": "The teacher's time or API calls, then a LoRA training.",
    },
    "prune": {
        "label": "Make it smaller (pruning)",
        "does": "Removes the parts of the model your documents need least; structured pruning makes the file "
        "smaller and faster.",
        "needs": "Documents to measure what matters.",
        "costs": "Some quality, partly won back by a short healing training.",
    },
    "quantize": {
        "label": "Compress (quantization)",
        "does": "Stores the weights in 4 or 8 bits: a file 2-4x smaller that runs faster on a CPU.",
        "needs": "Nothing.",
        "costs": "A little quality: 8-bit is near lossless, 4-bit loses a few percent.",
    },
}


@dataclass(frozen=True)
class Situation:
    """What the wizard knows: read from the project and the machine, or answered by the team."""

    documents: int = 0
    pairs: int = 0
    teachers: int = 0
    has_finetuned_model: bool = False  # "we already have a trained model" (registered as the base)
    target: str = "cpu"  # cpu | gpu | edge
    memory_limit_mb: int | None = None  # edge devices: what the model may use
    priority: str = "accuracy"  # accuracy | speed | size | budget | privacy
    teacher_allowed: bool = True  # an external API may be used (privacy may forbid it)
    hours: float | None = None  # how long the team can wait for a build

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target is one of {', '.join(TARGETS)}, not “{self.target}”.")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority is one of {', '.join(PRIORITIES)}, not “{self.priority}”.")


@dataclass
class Recommendation:
    recipe: list[str]
    why: list[str]
    scenario: str | None = None
    alternatives: list[dict] = field(default_factory=list)

    @property
    def recipe_string(self) -> str:
        return ",".join(self.recipe)


def recommend(s: Situation) -> Recommendation:
    """One recipe for the situation, with the matrix rows that chose it, and alternatives."""
    why: list[str] = []
    items: list[str] = []
    enough_pairs = s.pairs >= MIN_PAIRS_FOR_TRAINING
    can_teach = s.teachers > 0 and (s.teacher_allowed or s.priority != "privacy")
    small = s.target == "edge" or s.priority in ("size", "speed") or s.memory_limit_mb is not None
    quick = s.priority == "budget" or (s.hours is not None and s.hours < 0.5)

    if s.documents:
        items.append("rag")
        why.append(f"You have {s.documents} document{'s' if s.documents != 1 else ''}: retrieval lets answers come from them, with citations, "
                   "and stays current when they change.")  # fmt: skip
    if s.has_finetuned_model:
        why.append(
            "You already have a fine-tuned model: no need to train again; it is compressed for where it runs."
        )
    elif quick:
        why.append("Time and budget come first: no training step; the build finishes in minutes.")
    elif can_teach and (s.priority == "accuracy" or not enough_pairs):
        items.append("distill")
        why.append("A stronger teacher is available: its answers teach the small model what your pairs alone "
                   "cannot (knowledge transfer).")  # fmt: skip
    elif enough_pairs and s.documents and s.priority == "accuracy":
        items.append("raft")
        why.append(f"Accuracy first, with {s.documents} documents and {s.pairs} pairs: RAFT trains the model to "
                   "answer from retrieved passages and ignore unrelated ones.")  # fmt: skip
    elif enough_pairs:
        items.append("lora")
        why.append(
            f"{s.pairs} instruction pairs are enough to teach your answers' facts, tone and format (LoRA)."
        )
    elif s.pairs:
        why.append(f"{s.pairs} pairs are too few to train on (about {MIN_PAIRS_FOR_TRAINING} make a difference); "
                   "they still measure the model's quality.")  # fmt: skip

    if small and s.documents and s.priority == "size" and not quick:
        items += ["prune", "heal"]
        why.append("Size matters most: structured pruning removes what your documents need least (then a short "
                   "healing training), making the file smaller and faster.")  # fmt: skip
    if s.target == "gpu" and not small:
        items.append("quantize:q8_0")
        why.append(
            "On a GPU server memory is ample: 8-bit keeps quality near the original while halving the file."
        )
    else:
        items.append("quantize:q4_k_m")
        place = {"cpu": "a CPU server or laptop", "edge": "an edge device", "gpu": "a GPU server"}[s.target]
        why.append(f"It runs on {place}: 4-bit compression (Q4_K_M) makes it 2-4x smaller and faster, for a few "
                   "percent of quality.")  # fmt: skip
        if not quick and s.documents:
            items.append("imatrix")
            why.append("Your documents guide the compression (importance matrix), which keeps more quality.")
    if not items or items == ["quantize:q4_k_m"] and not s.documents and not s.has_finetuned_model:
        why.append("Add documents or instruction pairs for a model that knows your domain; until then this "
                   "only compresses the base model.")  # fmt: skip
    rec = Recommendation(recipe=items, why=why, scenario=_scenario(items))
    rec.alternatives = _alternatives(s, rec)
    return rec


def _scenario(items: list[str]) -> str | None:
    recipe = set(items)
    if {"lora", "prune"} <= recipe or {"prune", "quantize:q4_k_m"} <= recipe:
        return "maximum-compression"
    if "distill" in recipe:
        return "knowledge-transfer"
    if recipe <= {"rag", "quantize:q4_k_m", "quantize:q8_0", "imatrix"} and "rag" in recipe:
        return "fastest-path"
    return None


def _alternatives(s: Situation, chosen: Recommendation) -> list[dict]:
    """The seed's scenarios the project could run, other than the recommendation."""
    out = []
    for key, scenario in SCENARIOS.items():
        if scenario["recipe"] == chosen.recipe_string:
            continue
        missing = missing_for(scenario["recipe"].split(","), s)
        out.append({"scenario": key, "label": scenario["label"], "recipe": scenario["recipe"].split(","),
                    "why": scenario["why"], "possible": not missing, "missing": missing})  # fmt: skip
    return out


def missing_for(items: list[str], s: Situation) -> list[str]:
    """What the project lacks for a recipe, in plain words (empty when it can run)."""
    missing = []
    if ("rag" in items or "raft" in items or "prune" in items) and not s.documents:
        missing.append("documents")
    if any(i in items for i in ("lora", "raft")) and not s.pairs:
        missing.append("instruction pairs")
    if "distill" in items and not s.teachers:
        missing.append("a teacher")
    return missing
