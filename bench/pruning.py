"""Pruning the bundled SmolLM2-135M-Instruct: perplexity, size and speed per method, in one run.

    cd /work/main && .venv/bin/python bench/pruning.py [--eval-tokens 8192] [--heal-steps 40]
        [--speed-repeats 2] [--variants dense,wanda_50,...] [--work DIR] [--out bench/results]

Text: the Debian FAQ (Debian package `debian-faq`), the stripped pages `bench/retrieval_debian_faq.py`
builds (navigation, tables of contents and question headings removed), read by the app's parser
(`projects.parsing.parse_file`) and cut into paragraphs as the app cuts documents
(`projects.services._paragraphs`: blocks separated by blank lines, a heading joined to its first
block). Each paragraph goes to training or held-out by a hash of its text: sha256(paragraph) % 100
below 80 trains. Calibration and healing read only the training paragraphs; every model is scored
only on the held-out ones (in document order, joined by blank lines).

Model: the bundled SmolLM2-135M-Instruct GGUF (Q4_1) dequantized to an fp32 Hugging Face folder
(`dequantize_gguf_to_hf`), as the other benches do. Every variant is pruned from that same dense
folder in this run, by `training/ml/prune.py` as the app's `prune` step calls it:

  dense                      no pruning (the baseline every ratio is against)
  magnitude_30, magnitude_50 |W| over each whole matrix, 30% / 50% of each decoder matrix zeroed
  wanda_30, wanda_50         |W|·||X||, per output row, calibrated
  magnitude_2_4, wanda_2_4   2 zeros in every 4 consecutive weights of a row (50%)
  structured_90, _75         MLP channels / query heads / layers removed to keep 90% / 75% of the
                             parameters (`prune_structured`, plan chosen on the calibration loss)
  structured_90_healed, _75_healed   the same structured models after a short LoRA fine-tune

Calibration: `PruneSettings` defaults (32 windows of 256 tokens, seed 0) drawn by
`calibration_from_texts` from the training paragraphs, the same windows for every method (magnitude
needs none). Healing: `train_lora` on plain-text examples (`Example(messages=[], text=...)`) of
about 1,024 characters each, cut from the training paragraphs as the app's `heal` step cuts them
(`training.pruning._text_windows`, at most 256 windows, a seeded tenth held back for the trainer's
validation loss), with `default_settings` for that data as the app computes them, except a fixed
step cap (--heal-steps, 40) and batches of 1,024 tokens, about 36,000 training tokens (the defaults
would run 3 epochs of 2,048-token batches, about twice as many tokens, 8+ minutes per heal on 2
cores), then the merged model. Structured models have no
zeros to restore; the unstructured ones are not healed here.

Each variant is saved, converted to an F16 GGUF (`convert_hf_to_gguf`), and measured the way the
app's evaluation measures a version: perplexity and bits per byte on the held-out text
(`evaluate.score_text`, the first --eval-tokens tokens, n_ctx 512), with KL divergence and top-1
agreement against the dense F16 GGUF; generation tokens/s (`evaluate.measure_speed`, fresh process,
128-token prompt, 128 generated, the chat engine's threads) measured in pairs with the dense model
(dense then variant, the order reversed every round, --speed-repeats rounds): the speed ratio is the
median of the per-pair ratios, so load from other processes hits both sides alike. Also: file size,
parameters and non-zero parameters (`prune.count_parameters`, tied weights once).

Writes bench/results/pruning.{txt,json,svg}. No Django settings are needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (REPO_ROOT, REPO_ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import retrieval_debian_faq as faq  # noqa: E402 (needs the paths above)

RESULTS_DIR = REPO_ROOT / "bench" / "results"
RESULT_NAME = "pruning"

TRAIN_PERCENT = 80  # sha256(paragraph) % 100 below this: training (calibration, healing) text
N_CTX = 512  # score_text's windows (the app's evaluation default)
DEFAULT_EVAL_TOKENS = 8192
SPEED_PROMPT_TOKENS = 128
SPEED_GEN_TOKENS = 128
DEFAULT_SPEED_REPEATS = 2
# Healing: the app's heal step (training/pruning.py HEAL_WINDOW_CHARS, HEAL_MAX_WINDOWS).
HEAL_WINDOW_CHARS = 1024
HEAL_MAX_WINDOWS = 256
DEFAULT_HEAL_STEPS = 40
HEAL_BATCH_TOKENS = 1024
SEED = 0


@dataclass(frozen=True)
class Variant:
    name: str
    method: str  # dense | magnitude | wanda | structured
    settings: dict[str, Any]  # PruneSettings fields (empty for dense)
    heal: bool = False
    label: str = ""  # "30%", "2:4", "keep 90%"

    @property
    def source(self) -> str | None:
        """The unhealed variant a healed one starts from."""
        return self.name.removesuffix("_healed") if self.heal else None


VARIANTS = (
    Variant("dense", "dense", {}, label="0%"),
    Variant("magnitude_30", "magnitude", {"method": "magnitude", "sparsity": 0.3}, label="30%"),
    Variant("magnitude_50", "magnitude", {"method": "magnitude", "sparsity": 0.5}, label="50%"),
    Variant("wanda_30", "wanda", {"method": "wanda", "sparsity": 0.3}, label="30%"),
    Variant("wanda_50", "wanda", {"method": "wanda", "sparsity": 0.5}, label="50%"),
    Variant("magnitude_2_4", "magnitude", {"method": "magnitude_2_4"}, label="2:4"),
    Variant("wanda_2_4", "wanda", {"method": "wanda_2_4"}, label="2:4"),
    Variant("structured_90", "structured", {"method": "structured", "target": 0.90}, label="keep 90%"),
    Variant(
        "structured_90_healed",
        "structured",
        {"method": "structured", "target": 0.90},
        heal=True,
        label="keep 90% + heal",
    ),
    Variant("structured_75", "structured", {"method": "structured", "target": 0.75}, label="keep 75%"),
    Variant(
        "structured_75_healed",
        "structured",
        {"method": "structured", "target": 0.75},
        heal=True,
        label="keep 75% + heal",
    ),
)
BY_NAME = {v.name: v for v in VARIANTS}

# Published numbers for context (/work/shared/research/anchors-techniques.md A1, A2). Different
# models (7B-70B), text (WikiText-2), context (2048-4096 tokens) and calibration (128 C4 sequences):
# only the direction and the rough size of each ratio compare, never the values.
PUBLISHED_A1 = {
    "source": "locuslab/wanda README.md, LLaMA-2, WikiText-2 perplexity, 128 C4 calibration sequences "
    "(anchors-techniques.md A1, verified)",
    "columns": ["Llama-2-7B", "13B", "70B"],
    "rows": {
        "dense": [5.12, 4.57, 3.12],
        "magnitude 50%": [14.89, 6.37, 4.98],
        "SparseGPT 50%": [6.51, 5.63, 3.98],
        "Wanda 50%": [6.42, 5.56, 3.98],
        "magnitude 4:8": [16.48, 6.76, 5.58],
        "SparseGPT 4:8": [8.12, 6.60, 4.59],
        "Wanda 4:8": [7.97, 6.55, 4.47],
        "magnitude 2:4": [54.59, 8.33, 6.33],
        "SparseGPT 2:4": [10.17, 8.32, 5.40],
        "Wanda 2:4": [11.02, 8.27, 5.16],
    },
}
PUBLISHED_A2 = [
    (
        "LLM-Pruner, LLaMA-7B, ~20% of parameters removed (pruning_ratio 0.25), no recovery tuning, "
        "WikiText-2 ppl at seq len 128 (quoting the paper, anchors-techniques.md A2)",
        {
            "dense": 12.6,
            "block-wise Taylor (Element1)": 19.1,
            "L2 magnitude": 582.0,
            "random": 27.5,
            "channel-wise": 74.6,
        },
    ),
    (
        "LLM-Pruner on Llama-3-8B, 8.03B -> 6.61B parameters (82.3% kept), no tuning, WikiText-2 ppl at "
        "seq len 2048 (horseee/LLM-Pruner more_results/README.md, A2)",
        {"dense": 6.14, "L2": 34.13, "Taylor (param_first)": 12.86},
    ),
]
PUBLISHED_A2_NOTES = [
    "LLM-Pruner's recovery: LoRA r=8, 2 epochs, lr 1e-4 on 50k Alpaca samples (~3 hours); ours is "
    "a few minutes of LoRA on document text",
    "ShortGPT (layer removal by Block Influence): 'up to 25% reduction in parameters ... maintaining "
    "92% of the LLM's performance' (secondary source, A2)",
]


# --------------------------------------------------------------------------------------------
# Text


def faq_paragraphs(work: Path) -> list[tuple[str, str]]:
    """(page, paragraph) in document order, from the stripped FAQ pages, cut as the app cuts a
    parsed document into paragraphs (projects.services._paragraphs)."""
    from projects.parsing import parse_file

    files, _, _ = faq.build_gold(work / "faq")
    out = []
    for path in files:
        parsed = parse_file(path, path.name)
        for section in parsed.sections:
            blocks = [b.strip() for b in section.text.split("\n\n") if b.strip()]
            if section.heading:
                blocks = [section.heading + ("\n" + blocks[0] if blocks else "")] + blocks[1:]
            out.extend((path.name, block) for block in blocks)
    return out


def is_training(paragraph: str) -> bool:
    return int(hashlib.sha256(paragraph.encode("utf-8")).hexdigest(), 16) % 100 < TRAIN_PERCENT


def text_windows(texts: list[str]) -> list[str]:
    """Text cut at paragraph boundaries into pieces of about HEAL_WINDOW_CHARS: the app's heal
    step's `_text_windows` (training/pruning.py imports Django, so it is restated here)."""
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


# --------------------------------------------------------------------------------------------
# Building the variants


def save_model(model: Any, tokenizer: Any, source: Path, out: Path) -> None:
    from training.ml.lora import atomic_dir, copy_licence

    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        copy_licence(source, tmp)


def prune_variant(variant: Variant, base_hf: Path, windows: list[list[int]], out: Path) -> dict[str, Any]:
    """Prune a fresh copy of the dense model; save it to `out`; what prune.py reports."""
    from training.ml import prune
    from training.ml.base_models import load_causal_lm

    settings = prune.PruneSettings(**variant.settings, seed=SEED)
    model, tokenizer = load_causal_lm(base_hf)
    if settings.scoring == "structured":
        model, result = prune.prune_structured(model, settings, windows)
    else:
        result = prune.prune_unstructured(model, settings, windows if settings.needs_calibration else [])
    save_model(model, tokenizer, base_hf, out)
    del model
    gc.collect()
    return result.as_metrics() | {"settings": dataclasses.asdict(settings)}


def heal_variant(
    pruned_hf: Path,
    train: list[Any],
    held: list[Any],
    settings: Any,
    work: Path,
    say: Callable[[str], None],
    label: str,
) -> tuple[Path, dict[str, Any]]:
    from training.ml.lora import train_lora

    def on_point(point: Any) -> None:
        if point.step == 1 or point.step % 8 == 0 or point.eval_loss is not None:
            say(
                f"    {label} heal step {point.step}/{point.total_steps}: train loss {point.train_loss:.3f}"
                + (f", validation loss {point.eval_loss:.3f}" if point.eval_loss is not None else "")
                + f", {point.tokens_per_second:.0f} tokens/s"
            )

    shutil.rmtree(work, ignore_errors=True)  # a kept --work folder: train afresh, never resume
    started = time.perf_counter()
    result = train_lora(pruned_hf, train, held, work, settings, on_point=on_point)
    return result.merged_dir, {
        "wall_seconds": round(time.perf_counter() - started, 1),
        "steps": result.steps,
        "tokens": result.tokens,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "train_loss": result.train_loss,
        "validation_loss_before": result.base_eval_loss,
        "validation_loss_after": result.eval_loss,
    }


def model_counts(hf: Path) -> tuple[int, int]:
    from training.ml import prune
    from training.ml.base_models import load_causal_lm

    model, _ = load_causal_lm(hf)
    counts = prune.count_parameters(model)
    del model
    gc.collect()
    return counts


# --------------------------------------------------------------------------------------------
# Report


def svg_chart(rows: list[dict[str, Any]], eval_tokens: int) -> str:
    """Perplexity (log scale) against the share of the model's non-zero parameters removed:
    lines for magnitude and Wanda (0/30/50%) and for structured with and without healing (0/90/75%
    kept), points for the two 2:4 variants, a dashed line at the dense perplexity."""
    by = {r["variant"]: r for r in rows}
    dense = by.get("dense")
    width, height, left, right, top, bottom = 820, 470, 70, 190, 50, 60
    plot_w, plot_h = width - left - right, height - top - bottom
    ppls = [r["perplexity"] for r in rows if math.isfinite(r["perplexity"])]
    steps = [m * 10**e for e in range(-1, 7) for m in (1, 2, 5)]  # the 1-2-5 gridlines
    lo = max(v for v in steps if v <= min(ppls))
    hi = min(v for v in steps if v >= max(ppls) * 1.15)  # room for the top label
    x_max = max(0.6, max(r.get("removed_share", 0.0) for r in rows) + 0.05)

    def x(v: float) -> float:
        return left + plot_w * v / x_max

    def y(v: float) -> float:
        return top + plot_h * (1 - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="22" font-size="14">Pruning SmolLM2-135M-Instruct: perplexity on held-out '
        f"Debian FAQ text ({eval_tokens} tokens, ctx {N_CTX})</text>",
    ]
    for v in steps:
        if lo <= v <= hi:
            decade = math.isclose(math.log10(v), round(math.log10(v)))
            out.append(
                f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                f'stroke="{"#ccc" if decade else "#eee"}"/>'
            )
            out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    tick = 0.0
    while tick <= x_max + 1e-9:
        out.append(
            f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top}" y2="{top + plot_h}" stroke="#eee"/>'
        )
        out.append(f'<text x="{x(tick):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{tick:.0%}</text>')
        tick += 0.1
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>')
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 18}" text-anchor="middle">share of the model\'s '
        "non-zero parameters removed (embeddings included in the total)</text>"
    )
    out.append(
        f'<text transform="translate(18 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
        "perplexity (log scale, lower is better)</text>"
    )
    if dense:
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(dense["perplexity"]):.1f}" '
            f'y2="{y(dense["perplexity"]):.1f}" stroke="#555" stroke-dasharray="4 4"/>'
        )
    # (legend, variants in order, colour, marker, where the value label goes: dx, dy, anchor)
    series = [
        ("magnitude", ["dense", "magnitude_30", "magnitude_50"], "#c0392b", "circle", (-8, -6, "end")),
        ("Wanda", ["dense", "wanda_30", "wanda_50"], "#2e86c1", "circle", (8, 14, "start")),
        ("structured", ["dense", "structured_90", "structured_75"], "#7d3c98", "square", (-8, -6, "end")),
        (
            "structured + heal",
            ["dense", "structured_90_healed", "structured_75_healed"],
            "#27ae60",
            "square",
            (8, 14, "start"),
        ),
        ("magnitude 2:4", ["magnitude_2_4"], "#c0392b", "diamond", (10, 4, "start")),
        ("Wanda 2:4", ["wanda_2_4"], "#2e86c1", "diamond", (10, 4, "start")),
    ]

    def marker(shape: str, cx: float, cy: float, color: str) -> str:
        if shape == "square":
            return f'<rect x="{cx - 4:.1f}" y="{cy - 4:.1f}" width="8" height="8" fill="{color}"/>'
        if shape == "diamond":
            return (
                f'<polygon points="{cx:.1f},{cy - 6:.1f} {cx + 6:.1f},{cy:.1f} {cx:.1f},{cy + 6:.1f} '
                f'{cx - 6:.1f},{cy:.1f}" fill="white" stroke="{color}" stroke-width="2"/>'
            )
        return f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{color}"/>'

    legend_y = top + 10
    for label, names, color, shape, (dx, dy, anchor) in series:
        points = [(by[n].get("removed_share", 0.0), by[n]["perplexity"], n) for n in names if n in by]
        if not points or all(n == "dense" for _, _, n in points):
            continue
        if len(points) > 1:
            path = " ".join(f"{x(px):.1f},{y(py):.1f}" for px, py, _ in points)
            dash = ' stroke-dasharray="6 3"' if "heal" in label else ""
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for px, py, n in points:
            if n == "dense":
                continue
            out.append(marker(shape, x(px), y(py), color))
            out.append(
                f'<text x="{x(px) + dx:.1f}" y="{y(py) + dy:.1f}" text-anchor="{anchor}" font-size="10" '
                f'fill="{color}">{py:.1f}</text>'
            )
        lx = left + plot_w + 15
        out.append(
            f'<line x1="{lx}" x2="{lx + 22}" y1="{legend_y}" y2="{legend_y}" stroke="{color}" stroke-width="2"/>'
            if len(points) > 1
            else ""
        )
        out.append(marker(shape, lx + 11, legend_y, color))
        out.append(f'<text x="{lx + 28}" y="{legend_y + 4}">{label}</text>')
        legend_y += 20
    if dense:
        lx = left + plot_w + 15
        out.append(
            f'<line x1="{lx}" x2="{lx + 22}" y1="{legend_y}" y2="{legend_y}" stroke="#555" stroke-dasharray="4 4"/>'
        )
        out.append(f'<text x="{lx + 28}" y="{legend_y + 4}">dense {dense["perplexity"]:.2f}</text>')
        legend_y += 20
    notes = ["x: 1 - non-zero after / before"]
    half = by.get("wanda_50") or by.get("magnitude_50") or by.get("wanda_2_4")
    if half and "removed_share" in half:
        notes += [
            "50% of each decoder matrix",
            f"is {half['removed_share']:.0%} of the model's weights:",
            "the embedding is not pruned.",
        ]
    notes += ["Healed = same structure + LoRA", "(same x as unhealed)."]
    for i, note in enumerate(notes):
        out.append(
            f'<text x="{left + plot_w + 15}" y="{legend_y + 14 + 14 * i}" font-size="10" fill="#555">{note}</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in ("llama_cpp_python", "torch", "transformers", "peft", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def fmt_int(n: int) -> str:
    return f"{n / 1e6:.1f}M"


# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:  # noqa: PLR0915 (one linear script)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from training.ml import evaluate, prune
    from training.ml.base_models import dequantize_gguf_to_hf
    from training.ml.bundled import bundled_llm_gguf
    from training.ml.gguf_convert import convert_hf_to_gguf
    from training.ml.lora import Example, default_settings, encode, length_buckets

    hf_logging.disable_progress_bar()
    printed: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        printed.append(line)

    variants = [BY_NAME[name] for name in args.variants]
    t_total = time.perf_counter()
    started_at = datetime.now(UTC)
    load_start = os.getloadavg()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_pruning_"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    try:
        # ---- text
        t = time.perf_counter()
        paragraphs = faq_paragraphs(work)
        train_texts = [p for _, p in paragraphs if is_training(p)]
        held_texts = [p for _, p in paragraphs if not is_training(p)]
        held_text = "\n\n".join(held_texts)
        overlap = set(train_texts) & set(held_texts)
        assert not overlap, "a paragraph is on both sides of the split"
        timings["text"] = time.perf_counter() - t

        # ---- dense model
        t = time.perf_counter()
        bundled = bundled_llm_gguf()
        base_hf = work / "dense_hf"
        if not base_hf.exists():
            dequantize_gguf_to_hf(bundled.path, base_hf)
        tokenizer = AutoTokenizer.from_pretrained(str(base_hf), local_files_only=True)
        timings["dequantize"] = time.perf_counter() - t
        train_tokens = len(tokenizer("\n\n".join(train_texts), add_special_tokens=False)["input_ids"])
        held_tokens = len(tokenizer(held_text, add_special_tokens=False)["input_ids"])
        say(
            f"Debian FAQ ({faq._dpkg_version('debian-faq')}): {len(paragraphs)} paragraphs of the stripped pages; "
            f"sha256(paragraph) % 100 < {TRAIN_PERCENT} trains: {len(train_texts)} training paragraphs "
            f"({train_tokens} tokens), {len(held_texts)} held out ({held_tokens} tokens, of which the first "
            f"{min(args.eval_tokens, held_tokens)} are scored)"
        )

        # ---- calibration (one set of windows for every calibrated method)
        t = time.perf_counter()
        defaults = prune.PruneSettings()
        windows = prune.calibration_from_texts(
            tokenizer,
            train_texts,
            samples=defaults.calibration_samples,
            length=defaults.calibration_length,
            seed=SEED,
        )
        timings["calibration_windows"] = time.perf_counter() - t
        say(
            f"calibration: {len(windows)} windows x {defaults.calibration_length} tokens of the training "
            f"paragraphs (PruneSettings defaults, seed {SEED}), the same for every calibrated method"
        )

        # ---- healing data and settings (the app's heal step, with a step cap)
        heal_windows = text_windows(train_texts)
        random.Random("heal:bench").shuffle(heal_windows)
        heal_held = heal_windows[: len(heal_windows) // 10]
        heal_train = heal_windows[len(heal_held) :]
        heal_train_ex = [Example(messages=[], text=w) for w in heal_train]
        heal_held_ex = [Example(messages=[], text=w) for w in heal_held]
        app_defaults = default_settings(
            train_examples=len(heal_train_ex), train_tokens=sum(len(w) for w in heal_train) // 4
        )
        heal_settings = dataclasses.replace(
            app_defaults,
            max_steps=args.heal_steps,
            batch_tokens=HEAL_BATCH_TOKENS,
            eval_every=args.heal_steps,
            checkpoint_every=args.heal_steps,
        )
        encoded = encode(tokenizer, heal_train_ex, max_length=app_defaults.max_length)
        heal_tokens = sum(len(e.input_ids) for e in encoded)

        def epoch_steps(batch_tokens: int) -> int:
            return len(length_buckets(encoded, batch_tokens=batch_tokens, seed=0, epoch=0))

        app_default_steps = math.ceil(app_defaults.epochs * epoch_steps(app_defaults.batch_tokens))
        heal_epochs = args.heal_steps / epoch_steps(HEAL_BATCH_TOKENS)
        if any(v.heal for v in variants):
            say(
                f"healing: {len(heal_train)} training windows of ~{HEAL_WINDOW_CHARS} characters ({heal_tokens} tokens; "
                f"{len(heal_held)} more held back for the trainer's validation loss, all from training paragraphs); "
                f"the app's default_settings would run {app_default_steps} steps ({app_defaults.epochs:g} epochs of "
                f"{app_defaults.batch_tokens}-token batches); used: max_steps {args.heal_steps} of {HEAL_BATCH_TOKENS}-token "
                f"batches ({heal_epochs:.2f} epochs), lr {heal_settings.learning_rate:g}, rank {heal_settings.rank}, "
                f"alpha {heal_settings.alpha}, max_length {heal_settings.max_length}"
            )

        # ---- build every variant
        t_build = time.perf_counter()
        builds: dict[str, dict[str, Any]] = {}
        ggufs: dict[str, Path] = {}
        hf_dirs: dict[str, Path] = {}
        say()
        for variant in variants:
            t = time.perf_counter()
            info: dict[str, Any] = {}
            if variant.name == "dense":
                hf = base_hf
            elif variant.heal:
                source = variant.source
                if source not in hf_dirs:  # asked for the healed one alone: prune first
                    hf_dirs[source] = work / f"{source}_hf"
                    builds.setdefault(source, {})["prune"] = prune_variant(
                        BY_NAME[source], base_hf, windows, hf_dirs[source]
                    )
                info["prune"] = builds[source]["prune"]
                merged, info["heal"] = heal_variant(
                    hf_dirs[source],
                    heal_train_ex,
                    heal_held_ex,
                    heal_settings,
                    work / f"{variant.name}_lora",
                    say,
                    variant.name,
                )
                hf = merged
            else:
                hf = work / f"{variant.name}_hf"
                info["prune"] = prune_variant(variant, base_hf, windows, hf)
            hf_dirs[variant.name] = hf
            build_seconds = time.perf_counter() - t
            t = time.perf_counter()
            converted = convert_hf_to_gguf(
                hf, work / f"{variant.name}.f16.gguf", out_type="f16", name=variant.name
            )
            ggufs[variant.name] = converted.path
            params, nonzero = model_counts(hf)
            info |= {
                "build_seconds": round(build_seconds, 1),
                "convert_seconds": round(time.perf_counter() - t, 1),
                "parameters": params,
                "nonzero": nonzero,
                "gguf_bytes": converted.size_bytes,
            }
            builds[variant.name] = info
            detail = ""
            if "prune" in info:
                p = info["prune"]
                detail = (
                    f"; {p['structure']['summary']}"
                    if "structure" in p
                    else f"; decoder sparsity {p['sparsity']:.1%}"
                ) + f"; pruned in {p['seconds']:.0f}s"
            if "heal" in info:
                h = info["heal"]
                detail += (
                    f"; healed {h['steps']} steps ({h['tokens']} tokens, {h['tokens_per_second']:.0f} tok/s) in "
                    f"{h['wall_seconds']:.0f}s, validation loss {h['validation_loss_before']:.3f} -> "
                    f"{h['validation_loss_after']:.3f}"
                )
            say(
                f"built {variant.name}: {fmt_int(params)} parameters, {fmt_int(nonzero)} non-zero, "
                f"F16 {converted.size_bytes / 1e6:.1f} MB{detail} ({build_seconds:.0f}s + convert "
                f"{info['convert_seconds']:.0f}s)"
            )
        timings["build"] = time.perf_counter() - t_build
        # Folders no longer needed (GGUFs stay until the end).
        if not args.work:
            for name, hf in hf_dirs.items():
                if name != "dense":
                    shutil.rmtree(hf, ignore_errors=True)

        # ---- perplexity
        t = time.perf_counter()
        scores: dict[str, Any] = {}
        dense_gguf = ggufs.get("dense")
        for variant in variants:
            reference = None if variant.name == "dense" or dense_gguf is None else dense_gguf
            scores[variant.name] = evaluate.score_text(
                ggufs[variant.name], held_text, reference=reference, n_ctx=N_CTX, max_tokens=args.eval_tokens
            )
            s = scores[variant.name]
            say(
                f"scored {variant.name}: ppl {s.perplexity:.3f}, {s.bits_per_byte:.4f} bits/byte over {s.tokens} "
                f"tokens in {s.seconds:.0f}s"
            )
        timings["score"] = time.perf_counter() - t

        # ---- speed, in pairs with the dense model
        t = time.perf_counter()
        speeds: dict[str, list[Any]] = {v.name: [] for v in variants}
        ratios: dict[str, list[float]] = {v.name: [] for v in variants if v.name != "dense"}
        others = [v.name for v in variants if v.name != "dense"]

        def speed(name: str) -> Any:
            result = evaluate.measure_speed(
                ggufs[name], prompt_tokens=SPEED_PROMPT_TOKENS, gen_tokens=SPEED_GEN_TOKENS
            )
            speeds[name].append(result)
            return result

        if dense_gguf is not None:
            for round_ in range(args.speed_repeats):
                for name in others if round_ % 2 == 0 else list(reversed(others)):
                    if round_ % 2 == 0:
                        d, v = speed("dense"), speed(name)
                    else:
                        v, d = speed(name), speed("dense")
                    ratios[name].append(v.tokens_per_second / d.tokens_per_second)
                if not others:
                    speed("dense")
                say(f"speed round {round_ + 1}/{args.speed_repeats}: load average {os.getloadavg()[0]:.2f}")
        else:
            for _ in range(args.speed_repeats):
                for name in others:
                    speed(name)
        timings["speed"] = time.perf_counter() - t

        # ---- table
        dense_info = builds.get("dense")
        dense_score = scores.get("dense")
        rows = []
        for variant in variants:
            info, s, runs = builds[variant.name], scores[variant.name], speeds[variant.name]
            tps = statistics.median(r.tokens_per_second for r in runs)
            prune_info = info.get("prune", {})
            row = {
                "variant": variant.name,
                "method": variant.method,
                "label": variant.label,
                "healed": variant.heal,
                "requested_sparsity": prune.PruneSettings(**variant.settings).effective_sparsity
                if variant.method in ("magnitude", "wanda")
                else (0.0 if variant.method == "dense" else None),
                "structured_target": variant.settings.get("target")
                if variant.method == "structured"
                else None,
                "decoder_sparsity": prune_info.get("sparsity", 0.0),
                "structure": prune_info.get("structure", {}).get("summary"),
                "parameters": info["parameters"],
                "nonzero": info["nonzero"],
                "size_mb": round(info["gguf_bytes"] / 1e6, 1),
                "gen_tokens_per_second": round(tps, 1),
                "prompt_tokens_per_second": round(
                    statistics.median(r.prompt_tokens_per_second for r in runs), 1
                ),
                "speed_runs": [round(r.tokens_per_second, 1) for r in runs],
                "peak_memory_mb": round(max(r.peak_memory_bytes for r in runs) / 1e6, 1),
                "perplexity": round(s.perplexity, 4),
                "bits_per_byte": round(s.bits_per_byte, 4),
                "kl_divergence": None if s.kl_divergence is None else round(s.kl_divergence, 4),
                "top1_agreement": None if s.top1_agreement is None else round(s.top1_agreement, 4),
                "eval_tokens": s.tokens,
                "build_seconds": info["build_seconds"],
                "prune_seconds": prune_info.get("seconds"),
                "heal": info.get("heal"),
            }
            if dense_info is not None and dense_score is not None:
                row |= {
                    "parameter_ratio": round(info["parameters"] / dense_info["parameters"], 4),
                    "nonzero_ratio": round(info["nonzero"] / dense_info["nonzero"], 4),
                    "removed_share": round(1 - info["nonzero"] / dense_info["nonzero"], 4),
                    "size_ratio": round(info["gguf_bytes"] / dense_info["gguf_bytes"], 3),
                    "speed_ratio": round(statistics.median(ratios[variant.name]), 3)
                    if variant.name != "dense"
                    else 1.0,
                    "speed_ratio_runs": [round(r, 3) for r in ratios.get(variant.name, [])],
                    "ppl_ratio": round(s.perplexity / dense_score.perplexity, 3),
                }
            rows.append(row)

        say()
        say(
            f"Held-out Debian FAQ text: {rows[0]['eval_tokens']} tokens scored per model (ctx {N_CTX} windows, "
            f"F16 GGUFs by llama.cpp). Generation: {SPEED_GEN_TOKENS} tokens after a {SPEED_PROMPT_TOKENS}-token "
            f"prompt, the chat engine's threads (1 of {os.cpu_count()} cores decodes), median of "
            f"{args.speed_repeats} runs; x dense speed = median of the ratios to the dense run next to it."
        )
        header = (
            f"{'variant':<21} {'method':<10} {'target':<15} {'params':>7} {'non-zero':>8} {'MB':>6} {'xsize':>6} "
            f"{'tok/s':>6} {'xspeed':>6} {'ppl':>8} {'xppl':>6} {'bits/B':>6} {'KL':>6}"
        )
        say(header)
        say("-" * len(header))
        for r in rows:
            kl = "–" if r["kl_divergence"] is None else f"{r['kl_divergence']:.3f}"
            say(
                f"{r['variant']:<21} {r['method']:<10} {r['label']:<15} {fmt_int(r['parameters']):>7} "
                f"{fmt_int(r['nonzero']):>8} {r['size_mb']:>6.1f} {r.get('size_ratio', math.nan):>6.3f} "
                f"{r['gen_tokens_per_second']:>6.1f} {r.get('speed_ratio', math.nan):>6.2f} "
                f"{r['perplexity']:>8.2f} {r.get('ppl_ratio', math.nan):>6.2f} {r['bits_per_byte']:>6.3f} {kl:>6}"
            )
        say(
            "(target: sparsity of each decoder matrix, or the share of parameters structured pruning keeps; "
            "params / non-zero: whole model, tied embedding once; MB: the F16 GGUF; KL: mean KL(dense || "
            "variant) per token, nats)"
        )
        say()
        for r in rows:
            if r["structure"]:
                say(f"{r['variant']}: {r['structure']}")
        for name in ("structured_90", "structured_75"):
            info = builds.get(name, {}).get("prune") or builds.get(f"{name}_healed", {}).get("prune")
            if info and "structure" in info:
                cands = "; ".join(
                    f"{c['summary']} loss {c['calibration_loss']}{' (chosen)' if c['chosen'] else ''}"
                    for c in info["structure"]["candidates"]
                )
                say(
                    f"  {name} candidates (calibration loss, dense {info['structure']['calibration_loss_before']}): {cands}"
                )

        # ---- targets
        by = {r["variant"]: r for r in rows}
        checks = []
        if "wanda_50" in by and "magnitude_50" in by:
            w, m = by["wanda_50"]["perplexity"], by["magnitude_50"]["perplexity"]
            checks.append(
                {
                    "target": "Wanda beats magnitude at 50% unstructured sparsity (lower held-out perplexity)",
                    "value": f"Wanda {w:.2f} vs magnitude {m:.2f}",
                    "pass": w < m,
                }
            )
        say()
        say("targets:")
        for c in checks:
            say(f"  {c['target']}: {c['value']} — {'PASS' if c['pass'] else 'MISS'}")
        observations = []
        pairs = [
            ("wanda_30", "magnitude_30", "Wanda vs magnitude at 30%"),
            ("wanda_2_4", "magnitude_2_4", "Wanda vs magnitude at 2:4"),
            ("structured_90_healed", "structured_90", "structured keep 90%: healed vs not"),
            ("structured_75_healed", "structured_75", "structured keep 75%: healed vs not"),
        ]
        for a, b, label in pairs:
            if a in by and b in by:
                pa, pb = by[a]["perplexity"], by[b]["perplexity"]
                observations.append(f"{label}: {pa:.2f} vs {pb:.2f} ({'lower' if pa < pb else 'not lower'})")
        if observations:
            say("other comparisons (no target):")
            for line in observations:
                say(f"  {line}")

        # ---- published numbers
        say()
        say(f"published, for context: {PUBLISHED_A1['source']}")
        say(f"  {'':<16} " + " ".join(f"{c:>11}" for c in PUBLISHED_A1["columns"]) + "   x dense (7B)")
        dense_pub = PUBLISHED_A1["rows"]["dense"][0]
        for name, values in PUBLISHED_A1["rows"].items():
            say(
                f"  {name:<16} "
                + " ".join(f"{v:>11.2f}" for v in values)
                + f"   {values[0] / dense_pub:>5.2f}"
            )
        for source, values in PUBLISHED_A2:
            base = values["dense"]
            say(f"published: {source}")
            say("  " + "; ".join(f"{k} {v:g} (x{v / base:.2f})" for k, v in values.items()))
        for note in PUBLISHED_A2_NOTES:
            say(f"  note: {note}")
        say(
            "  Those are 7B-70B models on WikiText-2 with 2048/4096-token context and 128 C4 calibration "
            "sequences; here a 135M model, FAQ text, 512-token windows scored from their first token, 32x256 "
            "calibration tokens. Only the direction (and the rough size) of each ratio compares."
        )

        total = time.perf_counter() - t_total
        load_end = os.getloadavg()
        say()
        say(
            "timings: "
            + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
            + f"; machine: {os.cpu_count()} cpus, load average start {load_start[0]:.2f}, end {load_end[0]:.2f}; "
            f"total run {total:.0f}s"
        )

        result = {
            "benchmark": RESULT_NAME,
            "started_at": started_at.isoformat(timespec="seconds"),
            "total_seconds": round(total, 1),
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "loadavg_start": load_start,
                "loadavg_end": load_end,
            },
            "packages": package_versions(),
            "model": {
                "bundled": bundled.path.name,
                "distribution": f"{bundled.distribution} {bundled.version}",
            },
            "text": {
                "source": str(faq.FAQ_DIR),
                "debian_faq_version": faq._dpkg_version("debian-faq"),
                "split": f"sha256(paragraph) % 100 < {TRAIN_PERCENT} trains",
                "paragraphs": len(paragraphs),
                "train_paragraphs": len(train_texts),
                "held_out_paragraphs": len(held_texts),
                "train_tokens": train_tokens,
                "held_out_tokens": held_tokens,
                "eval_tokens": args.eval_tokens,
                "n_ctx": N_CTX,
                "held_out_sha256": hashlib.sha256(held_text.encode()).hexdigest()[:16],
            },
            "calibration": {
                "windows": len(windows),
                "length": defaults.calibration_length,
                "seed": SEED,
            },
            "healing": {
                "train_windows": len(heal_train),
                "train_tokens": heal_tokens,
                "epochs": round(heal_epochs, 3),
                "app_default_steps": app_default_steps,
                "validation_windows": len(heal_held),
                "settings": {
                    k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in dataclasses.asdict(heal_settings).items()
                },
                "app_default_settings": {
                    k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in dataclasses.asdict(app_defaults).items()
                },
            },
            "speed": {
                "prompt_tokens": SPEED_PROMPT_TOKENS,
                "gen_tokens": SPEED_GEN_TOKENS,
                "threads": "the chat engine's (half the cores decode, all read the prompt)",
                "repeats": args.speed_repeats,
            },
            "timings": {k: round(v, 1) for k, v in timings.items()},
            "rows": rows,
            "builds": builds,
            "targets": checks,
            "observations": observations,
            "published": {
                "A1": PUBLISHED_A1,
                "A2": [{"source": s, "values": v} for s, v in PUBLISHED_A2],
                "notes": PUBLISHED_A2_NOTES,
            },
        }
        return result, printed
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS, help="held-out tokens scored")
    parser.add_argument(
        "--heal-steps", type=int, default=DEFAULT_HEAL_STEPS, help="LoRA step cap of each heal"
    )
    parser.add_argument(
        "--speed-repeats",
        type=int,
        default=DEFAULT_SPEED_REPEATS,
        help="speed runs per variant (paired with dense)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(v.name for v in VARIANTS),
        help="comma-separated subset of: " + ", ".join(v.name for v in VARIANTS),
    )
    parser.add_argument("--work", type=Path, default=None, help="keep intermediate files here")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the results")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the chart from the .json already in --out"
    )
    args = parser.parse_args(argv)
    if args.replot:
        saved = json.loads((args.out / f"{RESULT_NAME}.json").read_text())
        (args.out / f"{RESULT_NAME}.svg").write_text(
            svg_chart(saved["rows"], saved["rows"][0]["eval_tokens"])
        )
        print(f"wrote {args.out / RESULT_NAME}.svg")
        return 0
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    args.variants = [v.name for v in VARIANTS if v.name in names]  # the canonical order
    if args.eval_tokens < 2 or args.heal_steps < 1 or args.speed_repeats < 1:
        parser.error("--eval-tokens must be >= 2, --heal-steps and --speed-repeats >= 1")
    faq.faq_files()  # stops with the install hint when the FAQ is missing
    result, printed = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{RESULT_NAME}.json").write_text(
        json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n"
    )
    (args.out / f"{RESULT_NAME}.txt").write_text("\n".join(printed) + "\n")
    (args.out / f"{RESULT_NAME}.svg").write_text(svg_chart(result["rows"], result["rows"][0]["eval_tokens"]))
    print(f"\nwrote {args.out / RESULT_NAME}.json, .txt and .svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
