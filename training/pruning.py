"""The pruning steps: `prune` (Wanda, magnitude, N:M or structured, calibrated on the project's
documents) and `heal` (a short LoRA fine-tune of the pruned model). The pruning itself is
Django-free (`ml/prune.py`); this module feeds it the project's text, saves the pruned model as a
folder the later steps read like any other, and keeps the model from before pruning as a GGUF so
the evaluation can compare the two.
"""

from __future__ import annotations

import random
from pathlib import Path

from projects.models import InstructionPair
from projects.privacy import pairs_for_models
from projects.services import documents_held_out_text, documents_training_text

from .models import data_path
from .steps import BuildCancelled, StepContext, StepError, gguf_of, register
from .tuning import _chat_counter, _plain_examples, _train, _weights

# Healing reads document text in windows of about this many characters (~256 tokens), at most
# this many of them, a tenth held back for the validation loss.
HEAL_WINDOW_CHARS = 1024
HEAL_MAX_WINDOWS = 256


def _calibration_texts(ctx: StepContext) -> tuple[list[str], str]:
    """The texts pruning calibrates on, and where they came from. Documents' training sections
    (never the held-out ones the evaluation reads); a project with no documents falls back to
    its training pairs."""
    texts = documents_training_text(project=ctx.build.project)
    if texts:
        return texts, "documents"
    rows = pairs_for_models(project=ctx.build.project, split=InstructionPair.Split.TRAIN)
    pairs = ["\n\n".join(filter(None, [p.instruction, p.input, p.response])) for p in rows]
    return pairs, "instruction pairs" if pairs else "none"


@register("prune", "Prune", queue="gpu")
def prune_step(ctx: StepContext) -> dict:
    """Prune the model folder the earlier steps made; the result replaces it for later steps."""
    from .ml import base_models, prune
    from .ml.lora import atomic_dir, copy_licence

    weights = _weights(ctx)
    try:
        settings = prune.PruneSettings.from_strings(
            {k: v for k, v in ctx.step.params.items() if k in prune.PruneSettings.__dataclass_fields__}
        )
    except prune.PruneError as exc:
        raise StepError(str(exc)) from None
    ctx.progress(0, 1, "Loading the model", force=True)
    model, tokenizer = base_models.load_causal_lm(weights)
    windows: list[list[int]] = []
    source = "none"
    if settings.needs_calibration:
        texts, source = _calibration_texts(ctx)
        windows = prune.calibration_from_texts(
            tokenizer, texts, samples=settings.calibration_samples, length=settings.calibration_length,
            seed=settings.seed,
        )  # fmt: skip
        if not windows:
            raise StepError(
                f"{settings.method} needs text to calibrate on: add documents (or instruction pairs), or "
                "use prune.method=magnitude, which needs none."
            )
        tokens = sum(map(len, windows))
        ctx.log(f"Calibrating on {len(windows)} windows ({tokens} tokens) of your {source}.")
        if source == "documents" and not documents_held_out_text(project=ctx.build.project).held_out:
            # Too little text to keep a part apart: the evaluation then reads all of it, the
            # calibration text included, which flatters the pruned model's perplexity a little.
            ctx.log(
                "Your documents are too short to keep calibration text apart from the evaluation text; "
                "the perplexity below is measured partly on text pruning was calibrated on.",
                level="warning",
            )
        if len(windows) < settings.calibration_samples:
            ctx.log(
                f"Only {len(windows)} of the {settings.calibration_samples} calibration windows asked for fit "
                "in your text; the scores rest on less data.",
                level="warning",
            )
    label = "Structured pruning" if settings.scoring == "structured" else f"Pruning ({settings.method})"

    def progress(done: int, total: int) -> None:
        unit = "candidate structures scored" if settings.scoring == "structured" else "layers pruned"
        ctx.progress(done, total, f"{label}: {done} of {total} {unit}")

    try:
        if settings.scoring == "structured":
            model, result = prune.prune_structured(
                model, settings, windows, progress=progress, should_stop=ctx.cancel_requested
            )
        else:
            result = prune.prune_unstructured(
                model, settings, windows, progress=progress, should_stop=ctx.cancel_requested
            )
    except prune.PruneStopped:
        raise BuildCancelled from None
    except prune.PruneError as exc:
        raise StepError(str(exc)) from None

    out = ctx.workdir / "model"
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        copy_licence(
            weights, tmp, title=f"pruned ({settings.method})",
            summary=f"pruned by SLM Studio ({result.as_metrics()['parameter_ratio']:.0%} of its parameters kept, "
            f"{result.sparsity:.0%} of the layer weights zero)",
        )  # fmt: skip
    del model
    # The model before pruning, as the GGUF the evaluation compares the pruned one with.
    ctx.progress(0, 1, "Converting the unpruned model for comparison", force=True)
    unpruned, _ = gguf_of(ctx, weights, out_type="f16", out=ctx.workdir / "unpruned-f16.gguf")
    ctx.output("hf_dir", out)
    ctx.output("unpruned_gguf", unpruned)
    metrics = result.as_metrics() | {"calibration_source": source if settings.needs_calibration else None}
    if settings.scoring == "structured":
        ctx.log(
            f"Kept {result.parameters_after / result.parameters_before:.0%} of the parameters "
            f"({result.structure['summary']}); the model file and its memory shrink accordingly."
        )
    else:
        metrics["requested_sparsity"] = round(settings.effective_sparsity, 4)
        ctx.log(
            f"{result.sparsity:.0%} of the decoder weights are now zero ({result.nonzero_after:,} of "
            f"{result.parameters_after:,} parameters non-zero). The file stays the same size and llama.cpp "
            "runs it at the same speed: it stores and multiplies the zeros like any other weight."
        )
    ctx.progress(
        1,
        1,
        f"Kept {result.parameters_after / result.parameters_before:.0%} of the parameters ({result.structure['summary']})"
        if settings.scoring == "structured"
        else f"{result.sparsity:.0%} of the layer weights set to zero",
        force=True,
    )
    return metrics


@register("heal", "Heal after pruning (LoRA)", queue="gpu")
def heal_step(ctx: StepContext) -> dict:
    """A short LoRA fine-tune of the pruned model on the project's training pairs and document
    text, which recovers much of what pruning cost. Weights that pruning set to zero stay zero."""
    from transformers import AutoTokenizer

    from .ml.lora import Example

    weights = _weights(ctx)
    count = _chat_counter(AutoTokenizer.from_pretrained(str(weights), local_files_only=True))
    rows = pairs_for_models(project=ctx.build.project)
    train_pairs = [(p.question, p.response) for p in rows if p.split != InstructionPair.Split.EVAL]
    held_pairs = [(p.question, p.response) for p in rows if p.split == InstructionPair.Split.EVAL]
    windows = _text_windows(documents_training_text(project=ctx.build.project))
    random.Random(f"heal:{ctx.build.pk}").shuffle(windows)
    held_text = windows[: len(windows) // 10]
    train_text = windows[len(held_text) :]
    train = _plain_examples(train_pairs, count) + [Example(messages=[], text=t) for t in train_text]
    held = _plain_examples(held_pairs, count) + [Example(messages=[], text=t) for t in held_text]
    if not train:
        raise StepError("Healing trains on your documents or instruction pairs; this project has neither.")
    ctx.log(
        f"Healing on {len(train_pairs)} instruction pairs and {len(train_text)} passages of document text."
    )
    metrics = _train(ctx, weights, train, held, {"pairs": len(train_pairs), "text_windows": len(train_text)})
    merged = ctx.step.outputs.get("hf_dir")
    pruned = ctx.build.steps.filter(name="prune").values_list("metrics", flat=True).first() or {}
    if merged and pruned.get("sparsity"):  # unstructured or N:M zeros, not a structured prune
        metrics["sparsity_restored"] = _restore_zeros(ctx, weights, Path(str(data_path(merged))))
        ctx.progress(
            1, 1, f"Healed; {metrics['sparsity_restored']:.0%} of the layer weights kept at zero", force=True
        )
    return metrics


def _text_windows(texts: list[str]) -> list[str]:
    """Document text cut at paragraph boundaries into pieces of about HEAL_WINDOW_CHARS."""
    windows: list[str] = []
    current = ""
    for text in texts:
        if current and len(current) + len(text) > HEAL_WINDOW_CHARS:
            windows.append(current)
            current = ""
        current = f"{current}\n\n{text}" if current else text
        while len(current) > 2 * HEAL_WINDOW_CHARS:
            windows.append(current[:HEAL_WINDOW_CHARS])
            current = current[HEAL_WINDOW_CHARS:]
        if len(windows) >= HEAL_MAX_WINDOWS:
            return windows[:HEAL_MAX_WINDOWS]
    if current:
        windows.append(current)
    return windows[:HEAL_MAX_WINDOWS]


def _restore_zeros(ctx: StepContext, pruned: Path, merged: Path) -> float:
    """Merging the LoRA update fills every zero of the pruned matrices; set them back to zero,
    so the healed model keeps the sparsity it was pruned to. Returns that sparsity."""
    import torch

    from .ml import base_models
    from .ml.lora import atomic_dir, copy_licence

    ctx.progress(0, 1, "Keeping the pruned weights at zero", force=True)
    sparse, _ = base_models.load_causal_lm(pruned)
    healed, tokenizer = base_models.load_causal_lm(merged)
    zeros = total = 0
    source = dict(sparse.named_parameters())
    with torch.no_grad():
        for name, param in healed.named_parameters():
            if ".layers." in name and name.endswith("proj.weight"):
                mask = source[name] == 0
                param[mask] = 0
                zeros += int(mask.sum())
                total += mask.numel()
    with atomic_dir(merged) as tmp:
        healed.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        copy_licence(
            pruned,
            tmp,
            title="healed",
            summary="healed by SLM Studio with a short LoRA fine-tune, its pruned weights kept at zero",
        )
    return round(zeros / total, 4) if total else 0.0
