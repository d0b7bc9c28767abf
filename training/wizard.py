"""The wizard's server side: what the project and this machine already tell (so the team is not
asked), the recommendation (`ml/advisor.py`), and estimates for a recipe on this project and this
machine, taken from what earlier builds here measured.

Estimates are marked as such. Where this installation has measured nothing yet for a step, the
estimate falls back to the reference numbers measured on the 2-core development machine
(bench/results, FACTS.md) and says so (`basis: "reference"`), never a silent constant.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, replace
from typing import Any

from projects.models import DataReport, Document, InstructionPair, Project

from .ml.advisor import MIN_PAIRS_FOR_TRAINING, Situation, recommend
from .models import BuildStep
from .recipes import RecipeError, recipe_plan
from .registry import base_model_default

# Reference throughputs (2 cores, bench/results of this repository), used only until this
# installation has measured its own.
REFERENCE = {
    "rag_chunks_per_second": 10.0,  # bench/results/retrieval_debian_faq.txt (ingestion)
    "train_tokens_per_second": 139.0,  # bench/results/lora_throughput.txt ("ours")
    "convert_seconds": 10.0,
    "quantize_seconds": 15.0,
    "prune_seconds": 60.0,
    "evaluate_seconds": 120.0,
}
# Bits per weight of each type on the bundled model, measured (bench/results/quantization.txt).
REFERENCE_BITS = {
    "q8_0": 8.5,
    "q6_k": 7.0,
    "q5_k_m": 6.0,
    "q5_0": 5.5,
    "q4_k_m": 6.17,
    "q4_0": 4.5,
    "q4_1": 5.0,
}
# Perplexity change against the unquantized model, measured on the bundled model.
REFERENCE_QUALITY = {"q8_0": 0.0055, "q4_k_m": 0.0555, "q4_0": 0.08, "q5_k_m": 0.02, "q6_k": 0.01}
TRAINING_STEPS = ("lora", "raft", "distill", "heal")
# Perplexity change of structured pruning to 75% with healing on the bundled model, until builds
# here have measured their own (bench/results/pruning.txt).
REFERENCE_PRUNE_COST = 0.65  # structured_75_healed: perplexity 41.51 against 25.19 dense


def machine() -> dict[str, Any]:
    """Cores, memory and GPU of the machine that will train: the GPU worker when training goes to
    GPU workers, else the largest CPU worker, as the workers announced themselves
    (ops.services.training_hardware); this machine before any worker has started."""
    from ops.services import training_hardware

    hw = training_hardware()
    return {
        "cores": hw.get("cores") or 1,
        "memory_bytes": hw.get("memory_bytes"),
        "gpu": hw.get("gpu"),
        "source": hw.get("source", "this machine"),
    }


def project_situation(project: Project, answers: dict[str, Any]) -> Situation:
    """The team's answers, completed with what the project holds (counts are read, not asked)."""
    known = set(Situation.__dataclass_fields__)
    unknown = sorted(set(answers) - known - {"documents", "pairs", "teachers"})
    if unknown:
        raise ValueError(f"Unknown answer “{unknown[0]}”; known: {', '.join(sorted(known))}.")
    read = {
        "documents": project.documents.exclude(
            status=Document.Status.FAILED
        ).count(),  # pending ones are read by the build
        "pairs": project.pairs.usable().filter(split=InstructionPair.Split.TRAIN).count(),
        "teachers": project.teachers.count(),
    }
    if "target" not in answers and machine()["gpu"]:
        read["target"] = "gpu"
    return Situation(**(read | {k: v for k, v in answers.items() if k in known - set(read)}))


def _measured(name: str, key: str, on: dict[str, Any] | None = None) -> list[float]:
    """A step's measured rates. With `on` (the hardware that will run it): only those measured on
    the same kind (with or without a GPU), and CPU rates scaled to its cores, since training and
    embedding on a CPU spread over every core."""
    values = []
    rows = BuildStep.objects.filter(name=name, status=BuildStep.Status.SUCCEEDED).order_by("-id")
    for metrics, hardware in rows.values_list("metrics", "hardware")[:50]:
        value = metrics.get(key) if isinstance(metrics, dict) else None
        if not (isinstance(value, int | float) and value > 0):
            continue
        if on is not None and hardware:
            if bool(hardware.get("gpu")) != bool(on.get("gpu")):
                continue
            if not on.get("gpu") and hardware.get("cores") and on.get("cores"):
                value = value * on["cores"] / hardware["cores"]
        values.append(float(value))
    return values


def _durations(name: str) -> list[float]:
    rows = BuildStep.objects.filter(
        name=name, status=BuildStep.Status.SUCCEEDED, started_at__isnull=False, ended_at__isnull=False
    ).values_list("started_at", "ended_at")[:50]
    return [(end - start).total_seconds() for start, end in rows]


def _rate(values: list[float], reference: float) -> tuple[float, str]:
    return (statistics.median(values), "measured") if values else (reference, "reference")


def _pruning_cost() -> float:
    """Relative perplexity change pruning caused in builds measured here (pruned against the model
    before pruning), else the reference: structured pruning to 75% with healing, on the bundled
    model (bench/results/pruning.txt)."""
    changes = []
    for metrics in BuildStep.objects.filter(name="evaluate", status=BuildStep.Status.SUCCEEDED).values_list(
        "metrics", flat=True
    )[:50]:
        baseline = (metrics or {}).get("baseline") or {}
        if baseline.get("kind") != "unpruned" or not baseline.get("perplexity"):
            continue
        for measured in (metrics.get("models") or {}).values():
            if measured.get("perplexity"):
                changes.append(measured["perplexity"] / baseline["perplexity"] - 1)
    return statistics.median(changes) if changes else REFERENCE_PRUNE_COST


def estimate(project: Project, recipe: str) -> dict[str, Any]:
    """Build time per step, file size, memory to run it and the expected quality change."""
    plan = recipe_plan(recipe)
    default = base_model_default()
    parameters = int(default.info.get("parameters") or 134_515_008)
    chars = sum(project.documents.filter(status=Document.Status.PARSED).values_list("char_count", flat=True))
    pairs = list(
        project.pairs.usable()
        .filter(split=InstructionPair.Split.TRAIN)
        .values_list("instruction", "response")
    )
    steps: list[dict[str, Any]] = []
    bases: set[str] = set()

    def add(step: str, seconds: float, basis: str) -> None:
        steps.append({"step": step, "seconds": round(seconds, 1), "basis": basis})
        bases.add(basis)

    # Every training step runs the same loop: one measured rate serves them all, measured on
    # hardware like the worker that will train (ops: workers announce theirs). The reference was
    # measured on 2 CPU cores; on a GPU it overstates the time.
    hardware = machine()
    reference_rate = REFERENCE["train_tokens_per_second"] * (1 if hardware["gpu"] else hardware["cores"] / 2)
    train_rate = _rate(
        [v for name in TRAINING_STEPS for v in _measured(name, "tokens_per_second", on=hardware)],
        reference_rate,
    )
    if plan.rag:
        rate, basis = _rate(_measured("rag", "chunks_per_second"), REFERENCE["rag_chunks_per_second"])
        add("rag", max(1, chars / 800) / rate, basis)
    if plan.tune:
        from .ml.lora import default_settings

        tokens = sum(len(q) + len(a) for q, a in pairs) // 4 + 120 * len(pairs)  # + the serving prompt
        if plan.tune == "raft":
            tokens *= 6  # passages in every example (measured ~6x longer on the Debian FAQ)
        rate, basis = train_rate
        epochs = default_settings(train_examples=max(1, len(pairs)), train_tokens=max(1, tokens)).epochs
        add(plan.tune, tokens * epochs / rate, basis)
    if plan.prune:
        add("prune", *_rate(_durations("prune"), REFERENCE["prune_seconds"]))
    if plan.heal:
        from .ml.lora import default_settings
        from .pruning import HEAL_MAX_WINDOWS, HEAL_WINDOW_CHARS

        # Healing reads the pairs and up to HEAL_MAX_WINDOWS windows of document text (~4 chars a token).
        windows = min(HEAL_MAX_WINDOWS, chars // HEAL_WINDOW_CHARS + 1)
        tokens = (
            windows * HEAL_WINDOW_CHARS // 4 + sum(len(q) + len(a) for q, a in pairs) // 4 + 120 * len(pairs)
        )
        rate, basis = train_rate
        epochs = default_settings(
            train_examples=max(1, windows + len(pairs)), train_tokens=max(1, tokens)
        ).epochs
        add("heal", tokens * epochs / rate, basis)
    if plan.tune or plan.prune or plan.quantize:
        add("convert", *_rate(_durations("convert"), REFERENCE["convert_seconds"]))
    for qtype in plan.quantize:
        add(f"quantize:{qtype}", *_rate(_durations("quantize"), REFERENCE["quantize_seconds"]))
    evaluations = max(1, len(plan.quantize)) + (1 if plan.tune or plan.prune else 0)
    per_eval, basis = _rate(_durations("evaluate"), REFERENCE["evaluate_seconds"])
    add("evaluate", per_eval * evaluations / (2 if _durations("evaluate") else 1), basis)

    kept = 0.75 if plan.prune else 1.0  # structured pruning's default target
    qtype = plan.quantize[-1] if plan.quantize else ("f16" if plan.tune or plan.prune else "q4_1")
    bits_measured = [
        m.get("bits_per_weight")
        for m in BuildStep.objects.filter(name="quantize", params__type=qtype, status="succeeded").values_list("metrics", flat=True)
        if isinstance(m, dict) and m.get("bits_per_weight")
    ]  # fmt: skip
    bits = statistics.median(bits_measured) if bits_measured else REFERENCE_BITS.get(qtype, 16.0)
    size = parameters * kept * bits / 8
    quality = REFERENCE_QUALITY.get(qtype, 0.0) if plan.quantize else 0.0
    if plan.prune:
        quality += _pruning_cost()
    return {
        "seconds": round(sum(s["seconds"] for s in steps)),
        "steps": steps,
        "basis": "measured" if bases == {"measured"} else "reference" if bases == {"reference"} else "mixed",
        "size_bytes": int(size),
        "memory_bytes": int(size + 80e6),  # the context and runtime beside the weights (~80 MB measured)
        "perplexity_change": round(quality, 4),
        "is_estimate": True,
        # Where the training estimate applies: the worker that will train, as it announced itself.
        "hardware": hardware,
    }


def recommend_for(project: Project, answers: dict[str, Any]) -> dict[str, Any]:
    """The `recommend` command's JSON: recipe, why, estimates, alternatives."""
    situation = project_situation(project, answers)
    advice, data_notes = [], []
    report = DataReport.objects.filter(project=project).first()
    if report is not None:
        advice = list(report.data.get("advice") or [])
        pairs = report.data.get("pairs") or {}
        # Repeated pairs teach nothing new: count the distinct ones against the training minimum,
        # so a project of 60 pairs that are 30 twice is not sent to LoRA.
        repeated = int(pairs.get("duplicates", 0)) + int(pairs.get("near_duplicates", 0))
        distinct = max(0, situation.pairs - repeated)
        if repeated and distinct < MIN_PAIRS_FOR_TRAINING <= situation.pairs:
            situation = replace(situation, pairs=distinct)
            data_notes.append(
                f"{repeated} of your pairs repeat others (data quality report): the {distinct} distinct ones are "
                "what training can learn from."
            )
    rec = recommend(situation)
    rec.why = data_notes + rec.why
    support = (report.data.get("pairs") or {}).get("support") or {} if report is not None else {}
    if (
        "raft" in rec.recipe
        and support.get("scored")
        and support.get("unsupported", 0) / support["scored"] >= 0.3
    ):
        rec.why.append(
            f"{support['unsupported']} of {support['scored']} answers are not found in your documents: RAFT "
            "trains on your answers with passages, so add the documents they come from for the best result."
        )
    try:
        estimates = estimate(project, rec.recipe_string)
    except RecipeError as exc:  # never expected: every recommendation is a valid recipe
        estimates = {"error": str(exc)}
    limit = situation.memory_limit_mb
    if limit and estimates.get("memory_bytes", 0) > limit * 1_000_000:
        rec.why.append(
            f"Even so it needs about {estimates['memory_bytes'] / 1e6:.0f} MB to run, more than the {limit} MB "
            "you have: choose a smaller base model, or a device with more memory."
        )
    elif limit:
        rec.why.append(
            f"It fits the {limit} MB you have: about {estimates.get('memory_bytes', 0) / 1e6:.0f} MB to run."
        )
    return {
        "recipe": rec.recipe,
        "why": rec.why,
        "scenario": rec.scenario,
        "estimates": estimates,
        "alternatives": rec.alternatives,
        # The data quality report's advice (projects.quality.advice), shown with the recommendation.
        "advice": advice,
        "situation": asdict(situation),
        "machine": machine(),
    }


# --- The questions, one per screen ---------------------------------------------------------

QUESTIONS: list[dict[str, Any]] = [
    {
        "key": "has_finetuned_model",
        "question": "Do you already have a model trained for your domain?",
        "why": "If so, there is no need to train again: we only make it smaller and faster.",
        "choices": [
            (False, "No, start from the bundled small model"),
            (True, "Yes, it is registered as a base model"),
        ],
    },
    {
        "key": "target",
        "question": "Where will the model run?",
        "why": "A laptop or CPU server wants a compressed model; a GPU server has room for more; an edge "
        "device has a hard memory limit.",
        "choices": [
            ("cpu", "A laptop or a CPU server"),
            ("gpu", "A server with a GPU"),
            ("edge", "An edge device with little memory"),
        ],
    },
    {
        "key": "memory_limit_mb",
        "question": "How much memory may the model use where it runs?",
        "why": "Edge devices and shared servers have a limit; the model and its working memory must fit in it.",
        "choices": [
            (None, "No particular limit"),
            (256, "256 MB"),
            (512, "512 MB"),
            (1024, "1 GB"),
            (4096, "4 GB"),
        ],
    },
    {
        "key": "teacher_allowed",
        "question": "May a larger model help teach yours?",
        "why": "A stronger model (yours, or an API you are allowed to use) can write answers your small model "
        "learns from. Say no if your data must not leave your servers.",
        "choices": [(True, "Yes"), (False, "No, keep everything on our servers")],
    },
    {
        "key": "priority",
        "question": "What matters most?",
        "why": "Every approach trades something: this decides what we give up first.",
        "choices": [
            ("accuracy", "Accurate answers"),
            ("speed", "Fast answers"),
            ("size", "A small file"),
            ("budget", "Low cost and effort"),
            ("privacy", "Privacy"),
        ],
    },
    {
        "key": "hours",
        "question": "How long can the build take?",
        "why": "Training makes better models but takes longer on a CPU server.",
        "choices": [(0.25, "Minutes"), (1.0, "About an hour"), (4.0, "A few hours"), (24.0, "A day is fine")],
    },
]


def question_defaults(project: Project) -> dict[str, Any]:
    """Pre-selected answers from what the project and machine hold."""
    return {
        # A registered model is not necessarily a fine-tuned one: the team says so.
        "has_finetuned_model": False,
        "target": "gpu" if machine()["gpu"] else "cpu",
        "memory_limit_mb": None,
        "teacher_allowed": True,
        "priority": "accuracy",
        "hours": 1.0,
    }


def parse_answer(key: str, raw: str) -> Any:
    """A posted choice back to its typed value; ValueError for anything not offered."""
    question = next(q for q in QUESTIONS if q["key"] == key)
    for value, _label in question["choices"]:
        if str(value) == raw:
            return value
    raise ValueError(f"“{raw}” is not one of the choices.")
