"""Answer quality of base, RAG, LoRA, RAG+LoRA and RAFT on held-out Debian FAQ questions.

    cd /work/main && .venv/bin/python bench/finetune_quality.py [--max-steps N] [--limit N]

Corpus and pairs: the Debian FAQ (Debian package `debian-faq`) as `bench/retrieval_debian_faq.py`
builds it: every numbered section heading is a question, the text under it its answer, and the
indexed pages are a stripped copy without the question headings. The 144 pairs are split 70/30
by a hash of the question (sha256 of the question text; a value below 70 of 100 trains). A
135M-parameter model cannot learn page-long answers in a few minutes, so every answer is
shortened to its first sentence, plus the second when the first has fewer than 12 words, and cut
at 60 words (`short_answer`); that short answer is both the training target and the reference
the predictions are scored against.

Systems, each answering every held-out question once, greedily (temperature 0, 96 new tokens,
the app's evaluation settings), with the prompt `training.ml.prompt.build_messages` builds and the
app's engine (`inference.engines.llama.LlamaEngine`, Django-free; what `inference.services.
answer_from` runs: same token counting, sampler settings and n_ctx 2048):
  base       the bundled SmolLM2-135M-Instruct Q4_1 GGUF, no passages (a version without index)
  rag        the same model with the hybrid index's top 4 passages (the app's `rag` recipe)
  lora       LoRA trained on the train pairs in the no-passage prompt, served without passages
  rag+lora   the LoRA model served with the top 4 passages
  raft       LoRA trained on `raft_examples` of the train pairs and the index, served with them
Both LoRA runs use the same `LoraSettings` (from `default_settings` on the RAFT examples, with a
step cap) on the bundled GGUF dequantized to fp32 (`dequantize_gguf_to_hf`); each merged model is
converted to an F16 GGUF with `convert_hf_to_gguf`, the app's default for a fine-tuned model.

Scores per answer against the short reference: token F1 and ROUGE-L (`training.ml.evaluate`), and
the cosine similarity of the MiniLM embeddings of answer and reference (the bundled
all-MiniLM-L6-v2, as the app's evaluation computes `embedding_similarity`). Means with 95%
bootstrap intervals, paired differences against base and against rag. Writes
bench/results/finetune_quality.{txt,json,svg}. No Django settings are needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import retrieval_debian_faq as faq  # noqa: E402 (needs the paths above)

RESULTS_DIR = REPO_ROOT / "bench" / "results"
RESULT_NAME = "finetune_quality"

TRAIN_PERCENT = 70  # sha256(question) % 100 below this trains
SHORT_MAX_WORDS = 60
SHORT_MIN_WORDS = 12  # a first sentence shorter than this gets the second one added
# What the app serves and evaluates with (inference.services.N_CTX and ChatSettings.top_k;
# settings.EVAL_ANSWER_TOKENS; training.tuning.SERVE_MAX_NEW_TOKENS). Copied: those modules import
# Django.
N_CTX = 2048
TOP_K = 4
ANSWER_TOKENS = 96
TRAIN_ANSWER_ROOM = 256
# Measured on the 2-core machine (see bench/README.md): keeps the whole run near 15 minutes.
DEFAULT_MAX_STEPS = 12
EVAL_EXAMPLES = 8  # held-out examples the trainer scores (loss) before and after; kept few for time
BOOTSTRAP = 2000

SYSTEMS = ("base", "rag", "lora", "rag+lora", "raft")
SYSTEM_LABELS = {
    "base": "base (no retrieval)",
    "rag": "RAG only",
    "lora": "LoRA only",
    "rag+lora": "RAG + LoRA",
    "raft": "RAFT",
}

_ABBREVIATION = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|cf|approx|resp|incl|no|Dr|Mr|Ms)\.|\b[A-Za-z]\.)$")
_SENTENCE_GAP = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9/])")


# --------------------------------------------------------------------------------------------
# Pairs


def sentences(text: str) -> list[str]:
    """Sentences of a whitespace-collapsed text: split after . ! ? before a capital, digit or path,
    but not after a common abbreviation (e.g., i.e., etc.) or an initial."""
    out: list[str] = []
    start = 0
    for gap in _SENTENCE_GAP.finditer(text):
        piece = text[start : gap.start()].rstrip("\"')]")
        if _ABBREVIATION.search(piece):
            continue
        out.append(text[start : gap.start()].strip())
        start = gap.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def short_answer(answer: str) -> str:
    """First sentence (plus the second when the first has fewer than SHORT_MIN_WORDS words),
    cut at SHORT_MAX_WORDS words."""
    parts = sentences(" ".join(answer.split()))
    chosen = parts[:1]
    if len(parts) > 1 and len(chosen[0].split()) < SHORT_MIN_WORDS:
        chosen.append(parts[1])
    words = " ".join(chosen).split()
    return " ".join(words[:SHORT_MAX_WORDS])


@dataclass(frozen=True)
class Pair:
    qid: str
    question: str
    reference: str  # the short answer: training target and scoring reference
    answer: str  # the full gold answer (for the retrieval hit rule)
    train: bool


def split_pairs(questions: Sequence[faq.Question]) -> list[Pair]:
    pairs = []
    for q in questions:
        bucket = int(hashlib.sha256(q.query.encode("utf-8")).hexdigest(), 16) % 100
        pairs.append(Pair(q.qid, q.query, short_answer(q.answer), q.answer, bucket < TRAIN_PERCENT))
    return pairs


# --------------------------------------------------------------------------------------------
# Training


def hf_chat_counter(tokenizer: Any) -> Callable[[list[dict]], int]:
    """Prompt tokens of chat messages, generation prompt included, by the HF tokenizer.

    `return_dict=False`: transformers 5 returns a BatchEncoding (len() == 2) by default.
    """

    def count(messages: list[dict]) -> int:
        ids = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        return len(ids)

    return count


def plain_examples(pairs: Sequence[Pair], count: Callable[[list[dict]], int], n_ctx: int) -> list[Any]:
    """The no-passage serving prompt + the short answer (what training.tuning's lora step builds)."""
    from training.ml.lora import Example
    from training.ml.prompt import build_messages

    return [
        Example(
            messages=build_messages(
                p.question, [], [], count_tokens=count, n_ctx=n_ctx, max_new_tokens=TRAIN_ANSWER_ROOM
            )
            + [{"role": "assistant", "content": p.reference}]
        )
        for p in pairs
    ]


def example_tokens(examples: Sequence[Any], tokenizer: Any) -> list[int]:
    return [
        len(tokenizer.apply_chat_template(e.messages, tokenize=True, return_dict=False)) for e in examples
    ]


def train_and_convert(
    name: str, base_hf: Path, train: list[Any], held: list[Any], settings: Any, work: Path, say: Any
) -> dict[str, Any]:
    from training.ml.gguf_convert import convert_hf_to_gguf
    from training.ml.lora import train_lora

    def on_point(point: Any) -> None:
        say(
            f"  {name} step {point.step}/{point.total_steps}: train loss {point.train_loss:.3f}"
            + (f", eval loss {point.eval_loss:.3f}" if point.eval_loss is not None else "")
            + f", {point.tokens_per_second:.0f} tokens/s"
        )

    shutil.rmtree(work / name, ignore_errors=True)  # a kept --work folder: train afresh, never resume
    started = time.perf_counter()
    result = train_lora(base_hf, train, held, work / name, settings, on_point=on_point)
    train_wall = time.perf_counter() - started
    started = time.perf_counter()
    converted = convert_hf_to_gguf(result.merged_dir, work / f"{name}.f16.gguf", out_type="f16", name=name)
    convert_seconds = time.perf_counter() - started
    gc.collect()
    return {
        "gguf": converted.path,
        "train_wall_seconds": train_wall,
        "train_loop_seconds": result.history[-1].seconds if result.history else 0.0,
        "convert_seconds": convert_seconds,
        "steps": result.steps,
        "tokens": result.tokens,
        "tokens_per_second": result.tokens_per_second,
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "base_eval_loss": result.base_eval_loss,
        "history": [dataclasses.asdict(p) for p in result.history],
        "gguf_bytes": converted.size_bytes,
    }


# --------------------------------------------------------------------------------------------
# Answering (inference.services.answer_from without Django)


def answer_questions(
    gguf: Path, pairs: Sequence[Pair], index: Any, *, with_passages: bool, say: Any, label: str
) -> dict[str, Any]:
    from inference.engines.llama import GenerationConfig, LlamaEngine
    from training.ml.prompt import Passage, build_messages

    started = time.perf_counter()
    engine = LlamaEngine(gguf, n_ctx=N_CTX)
    load_seconds = time.perf_counter() - started
    config = GenerationConfig(max_tokens=ANSWER_TOKENS, temperature=0.0)
    rows = []
    try:
        # Warm-up (not timed): the first decode pages the weights in.
        engine.chat([{"role": "user", "content": "Hello"}], GenerationConfig(max_tokens=2, temperature=0.0))
        for n, pair in enumerate(pairs, start=1):
            started = time.perf_counter()
            hits = index.search(pair.question, k=TOP_K) if with_passages else []
            passages = [
                Passage(i, hit.chunk.document_title, hit.chunk.location, hit.chunk.text)
                for i, hit in enumerate(hits, start=1)
            ]
            messages = build_messages(
                pair.question,
                passages,
                [],
                count_tokens=engine.count_chat_tokens,
                n_ctx=engine.n_ctx,
                max_new_tokens=ANSWER_TOKENS,
            )
            result = engine.chat(messages, config)
            seconds = time.perf_counter() - started
            shown = messages[-1]["content"].count('<passage n="')
            rows.append(
                {
                    "qid": pair.qid,
                    "answer": result.text.strip(),
                    "seconds": seconds,
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "finish_reason": result.finish_reason,
                    "passages_shown": shown,
                    "gold_in_passages": any(
                        faq.is_hit(faq.Gold(pair.answer), p.text) for p in passages[:shown]
                    ),
                }
            )
            if n % 10 == 0 or n == len(pairs):
                say(f"  {label}: {n}/{len(pairs)} answered, {sum(r['seconds'] for r in rows):.0f}s")
    finally:
        engine.close()
    return {"load_seconds": load_seconds, "rows": rows}


# --------------------------------------------------------------------------------------------
# Scores


def bootstrap_ci(values: Sequence[float], seed: str) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(BOOTSTRAP))
    return means[int(0.025 * BOOTSTRAP)], means[int(0.975 * BOOTSTRAP) - 1]


def score(rows: list[dict], pairs: Sequence[Pair], embedder: Any) -> dict[str, list[float]]:
    from training.ml.evaluate import rouge_l, token_f1

    answers = [r["answer"] for r in rows]
    references = [p.reference for p in pairs]
    vectors = embedder.embed(answers + references)
    similarity = (vectors[: len(rows)] * vectors[len(rows) :]).sum(axis=1)
    return {
        "f1": [token_f1(a, r) for a, r in zip(answers, references, strict=True)],
        "rouge_l": [rouge_l(a, r) for a, r in zip(answers, references, strict=True)],
        "similarity": [float(s) for s in similarity],
    }


# --------------------------------------------------------------------------------------------
# Report


def svg_chart(rows: list[dict[str, Any]]) -> str:
    """Grouped bars: F1, ROUGE-L and similarity per system, with the bootstrap intervals."""
    metrics = [
        ("f1", "token F1", "#4472c4"),
        ("rouge_l", "ROUGE-L", "#ed7d31"),
        ("similarity", "similarity", "#70ad47"),
    ]
    width, height, left, top, bottom = 760, 360, 50, 40, 60
    plot_w, plot_h = width - left - 20, height - top - bottom
    group = plot_w / len(rows)
    bar = group / (len(metrics) + 1)

    def y(v: float) -> float:
        return top + plot_h * (1 - v)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="20" font-size="14">Debian FAQ, held-out questions '
        f"(n={rows[0]['n']}): answer quality, 95% bootstrap intervals</text>",
    ]
    for tick in range(0, 11, 2):
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
                f'height="{plot_h * value:.1f}" fill="{color}"/>'
            )
            cx = x + bar * 0.45
            out.append(
                f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(hi):.1f}" y2="{y(lo):.1f}" stroke="black"/>'
            )
            out.append(
                f'<text x="{cx:.1f}" y="{y(hi) - 4:.1f}" text-anchor="middle" font-size="9">{value:.2f}</text>'
            )
        out.append(
            f'<text x="{left + g * group + group / 2:.1f}" y="{top + plot_h + 18}" '
            f'text-anchor="middle">{SYSTEM_LABELS[row["system"]]}</text>'
        )
    for m, (_, label, color) in enumerate(metrics):
        lx = left + m * 120
        out.append(f'<rect x="{lx}" y="{height - 22}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{lx + 16}" y="{height - 12}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def ascii_chart(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for key, label in (("f1", "token F1"), ("similarity", "similarity")):
        lines.append(f"{label} (each # = 0.02)")
        for row in rows:
            lines.append(
                f"  {SYSTEM_LABELS[row['system']]:<20} {'#' * round(row[key] / 0.02):<50} {row[key]:.3f}"
            )
    return lines


def package_versions() -> dict[str, str]:
    versions = {}
    for name in ("llama_cpp_python", "torch", "transformers", "peft", "sentence-transformers", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:  # noqa: PLR0915 (one linear script)
    from transformers import AutoTokenizer

    from training.ml.base_models import dequantize_gguf_to_hf
    from training.ml.bundled import bundled_embedding_dir, bundled_llm_gguf
    from training.ml.lora import default_settings
    from training.ml.raft import RaftSettings, index_search, raft_examples
    from training.ml.rag import HybridIndex, SentenceTransformerEmbedder

    printed: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        printed.append(line)

    t_total = time.perf_counter()
    started_at = datetime.now(UTC)
    load_start = os.getloadavg()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="finetune_quality_"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    try:
        # ---- corpus, pairs, index
        t = time.perf_counter()
        files, questions, _ = faq.build_gold(work / "faq")
        pairs = split_pairs(questions)
        train_pairs = [p for p in pairs if p.train]
        test_pairs = [p for p in pairs if not p.train][: args.limit]
        embedder = SentenceTransformerEmbedder(bundled_embedding_dir().path)
        index_dir = work / "index"
        if not index_dir.exists():
            faq.ingest_ours(files, index_dir, embedder)
        timings["corpus_and_index"] = time.perf_counter() - t
        ref_words = [len(p.reference.split()) for p in pairs]
        say(
            f"Debian FAQ: {len(questions)} question/answer pairs, {len(train_pairs)} train, "
            f"{len(test_pairs)} held out (sha256 of the question, {TRAIN_PERCENT}/{100 - TRAIN_PERCENT}); "
            f"short references: median {statistics.median(ref_words):.0f} words (max {max(ref_words)}); "
            f"index built in {timings['corpus_and_index']:.0f}s"
        )

        # ---- base model as a Hugging Face folder (what a LoRA build trains)
        t = time.perf_counter()
        gguf = bundled_llm_gguf().path
        base_hf = work / "base_hf"
        if not base_hf.exists():
            dequantize_gguf_to_hf(gguf, base_hf)
        tokenizer = AutoTokenizer.from_pretrained(str(base_hf), local_files_only=True)
        count = hf_chat_counter(tokenizer)
        timings["dequantize"] = time.perf_counter() - t

        index = HybridIndex.open(index_dir, embedder)
        try:
            # ---- training examples and the shared settings
            t = time.perf_counter()
            raft_settings = RaftSettings()
            search = index_search(index)
            train_qa = [(p.question, p.reference) for p in train_pairs]
            held_qa = [(p.question, p.reference) for p in test_pairs[:EVAL_EXAMPLES]]
            # First as the app's raft step builds them (n_ctx 2048, 256 tokens of answer room)...
            app_raft, _ = raft_examples(
                train_qa, search, count_tokens=count, n_ctx=N_CTX, max_new_tokens=TRAIN_ANSWER_ROOM,
                settings=raft_settings,
            )  # fmt: skip
            app_tokens = example_tokens(app_raft, tokenizer)
            # The app's estimate of the training tokens (training.tuning._train): characters / 4.
            rough_tokens = sum(len(m["content"]) for e in app_raft for m in e.messages) // 4
            defaults = default_settings(train_examples=len(app_raft), train_tokens=rough_tokens)
            # ...then as raft.py asks: n_ctx = the training length, so the trainer cuts no prompt.
            room = answer_room(tokenizer, train_pairs + test_pairs)
            raft_train, raft_stats = raft_examples(
                train_qa, search, count_tokens=count, n_ctx=defaults.max_length, max_new_tokens=room,
                settings=raft_settings,
            )  # fmt: skip
            raft_held, _ = raft_examples(
                held_qa, search, count_tokens=count, n_ctx=defaults.max_length, max_new_tokens=room,
                settings=raft_settings,
            )  # fmt: skip
            timings["raft_examples"] = time.perf_counter() - t
            plain_train = plain_examples(train_pairs, count, N_CTX)
            plain_held = plain_examples(test_pairs[:EVAL_EXAMPLES], count, N_CTX)
            raft_tokens = example_tokens(raft_train, tokenizer)
            plain_tokens = example_tokens(plain_train, tokenizer)
            settings = dataclasses.replace(defaults, max_steps=args.max_steps, eval_every=args.max_steps)
            say(
                f"training examples: plain {len(plain_train)} (mean {statistics.fmean(plain_tokens):.0f} tokens), "
                f"RAFT {len(raft_train)} (mean {statistics.fmean(raft_tokens):.0f}, max {max(raft_tokens)}); "
                f"RAFT: {raft_stats.with_oracle} with oracle, {raft_stats.without_oracle} oracle left out, "
                f"{raft_stats.oracle_not_found} without oracle, {raft_stats.passages_dropped} distractors "
                f"dropped to fit {defaults.max_length} tokens; built in {timings['raft_examples']:.0f}s"
            )
            say(
                f"  built as the app's raft step does (n_ctx {N_CTX}, {TRAIN_ANSWER_ROOM} tokens of answer room) "
                f"{sum(n > defaults.max_length for n in app_tokens)}/{len(app_tokens)} RAFT examples would be longer "
                f"than max_length {defaults.max_length} and lose the start of their prompt in the trainer"
            )
            say(
                "LoRA settings (both runs): default_settings(train_examples="
                f"{len(app_raft)}, train_tokens={rough_tokens}) (the RAFT examples, tokens estimated as "
                f"the app does: characters / 4) with max_steps={args.max_steps}, "
                f"eval_every={args.max_steps}:"
            )
            say("  " + json.dumps(dataclasses.asdict(settings), default=list))
            say(
                f"  default total steps would be: plain {steps_for(plain_tokens, defaults)}, "
                f"RAFT {steps_for(raft_tokens, defaults)}"
            )

            # ---- answers
            runs: dict[str, dict[str, Any]] = {}
            trained: dict[str, dict[str, Any]] = {}
            say()
            runs["base"] = answer_questions(
                gguf, test_pairs, index, with_passages=False, say=say, label="base"
            )
            runs["rag"] = answer_questions(gguf, test_pairs, index, with_passages=True, say=say, label="rag")
            trained["lora"] = train_and_convert("lora", base_hf, plain_train, plain_held, settings, work, say)
            runs["lora"] = answer_questions(
                trained["lora"]["gguf"], test_pairs, index, with_passages=False, say=say, label="lora"
            )
            runs["rag+lora"] = answer_questions(
                trained["lora"]["gguf"], test_pairs, index, with_passages=True, say=say, label="rag+lora"
            )
            trained["raft"] = train_and_convert("raft", base_hf, raft_train, raft_held, settings, work, say)
            runs["raft"] = answer_questions(
                trained["raft"]["gguf"], test_pairs, index, with_passages=True, say=say, label="raft"
            )
        finally:
            index.close()

        # ---- scores
        rows = []
        scores = {}
        for system in SYSTEMS:
            scores[system] = score(runs[system]["rows"], test_pairs, embedder)
            answer_rows = runs[system]["rows"]
            seconds = sum(r["seconds"] for r in answer_rows)
            row: dict[str, Any] = {"system": system, "n": len(answer_rows)}
            for key, values in scores[system].items():
                row[key] = statistics.fmean(values)
                row[f"{key}_ci"] = bootstrap_ci(values, f"{system}:{key}")
            row |= {
                "answers_per_second": len(answer_rows) / seconds,
                "mean_prompt_tokens": statistics.fmean(r["prompt_tokens"] for r in answer_rows),
                "mean_answer_words": statistics.fmean(len(r["answer"].split()) for r in answer_rows),
                "stopped_share": sum(r["finish_reason"] == "stop" for r in answer_rows) / len(answer_rows),
                "cites_share": sum(bool(re.search(r"\[\d", r["answer"])) for r in answer_rows)
                / len(answer_rows),
                "load_seconds": runs[system]["load_seconds"],
                "train_seconds": (
                    trained[system.split("+")[-1]]["train_wall_seconds"]
                    + trained[system.split("+")[-1]]["convert_seconds"]
                    if system in ("lora", "rag+lora", "raft")
                    else None
                ),
            }
            rows.append(row)

        def paired(a: str, b: str, key: str) -> dict[str, float]:
            diffs = [x - y for x, y in zip(scores[a][key], scores[b][key], strict=True)]
            lo, hi = bootstrap_ci(diffs, f"{a}-{b}:{key}")
            return {"mean": statistics.fmean(diffs), "ci_low": lo, "ci_high": hi}

        comparisons = {
            f"{a} - {b}": {key: paired(a, b, key) for key in ("f1", "rouge_l", "similarity")}
            for a, b in (
                ("rag", "base"),
                ("lora", "base"),
                ("rag+lora", "rag"),
                ("raft", "rag"),
                ("raft", "rag+lora"),
            )
        }
        gold_rank = [r["gold_in_passages"] for r in runs["rag"]["rows"]]

        say()
        header = (
            f"{'system':<20} {'F1':>6} {'95% CI':>13} {'ROUGE-L':>8} {'similarity':>10} {'95% CI':>13} "
            f"{'answers/s':>9} {'words':>6} {'stops':>6} {'cites':>6} {'train s':>8}"
        )
        say(header)
        say("-" * len(header))
        for row in rows:
            train_s = f"{row['train_seconds']:8.0f}" if row["train_seconds"] is not None else f"{'–':>8}"
            say(
                f"{SYSTEM_LABELS[row['system']]:<20} {row['f1']:6.3f} "
                f"{'[' + format(row['f1_ci'][0], '.3f') + ', ' + format(row['f1_ci'][1], '.3f') + ']':>13} "
                f"{row['rouge_l']:8.3f} {row['similarity']:10.3f} "
                f"{'[' + format(row['similarity_ci'][0], '.3f') + ', ' + format(row['similarity_ci'][1], '.3f') + ']':>13} "
                f"{row['answers_per_second']:9.3f} {row['mean_answer_words']:6.1f} "
                f"{100 * row['stopped_share']:5.0f}% {100 * row['cites_share']:5.0f}% {train_s}"
            )
        say(
            "(words: mean answer length; stops: answers that ended by themselves within "
            f"{ANSWER_TOKENS} tokens; train s: train_lora wall time, evaluation and merge included, "
            "plus the F16 conversion; the LoRA model serves both lora and rag+lora)"
        )
        say()
        say("paired differences (mean, 95% bootstrap interval):")
        for name, by_key in comparisons.items():
            say(
                f"  {name:<16} "
                + "; ".join(
                    f"{key} {v['mean']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"
                    for key, v in by_key.items()
                )
            )
        say()
        say(
            f"retrieval: the gold answer is in the top {TOP_K} passages for {sum(gold_rank)}/{len(gold_rank)} "
            "held-out questions (the retrieval benchmark's hit rule, against the full answer)"
        )
        for system in ("rag", "rag+lora", "raft"):
            hit = [f for f, g in zip(scores[system]["f1"], gold_rank, strict=True) if g]
            miss = [f for f, g in zip(scores[system]["f1"], gold_rank, strict=True) if not g]
            say(
                f"  {SYSTEM_LABELS[system]:<12} F1 when the gold is retrieved {statistics.fmean(hit) if hit else 0:.3f}, "
                f"when not {statistics.fmean(miss) if miss else 0:.3f}"
            )
        for name in ("lora", "raft"):
            tr = trained[name]
            say(
                f"{name} training: {tr['steps']} steps, {tr['tokens']} tokens at {tr['tokens_per_second']:.0f} tokens/s, "
                f"train loss (last epoch's steps) {tr['train_loss']:.3f}, held-out loss {tr['base_eval_loss']:.3f} "
                f"-> {tr['eval_loss']:.3f} ({EVAL_EXAMPLES} examples); loop {tr['train_loop_seconds']:.0f}s, "
                f"train_lora {tr['train_wall_seconds']:.0f}s, F16 conversion {tr['convert_seconds']:.0f}s"
            )
        say()
        for line in ascii_chart(rows):
            say(line)
        say()
        say("examples (first 3 held-out questions):")
        for i, pair in enumerate(test_pairs[:3]):
            say(f"  Q {pair.qid}: {pair.question}")
            say(f"    reference: {pair.reference}")
            for system in SYSTEMS:
                say(f"    {system:<9}: {runs[system]['rows'][i]['answer'][:300]!r}")
        load_end = os.getloadavg()
        total = time.perf_counter() - t_total
        say()
        say(
            f"machine: {os.cpu_count()} cpus, load average start {load_start[0]:.2f}, end {load_end[0]:.2f}; "
            f"total run {total:.0f}s"
        )

        per_question = []
        for i, pair in enumerate(test_pairs):
            entry: dict[str, Any] = {
                "qid": pair.qid,
                "question": pair.question,
                "reference": pair.reference,
                "gold_in_top4": gold_rank[i],
            }
            for system in SYSTEMS:
                r = runs[system]["rows"][i]
                entry[system] = {
                    "answer": r["answer"],
                    "f1": round(scores[system]["f1"][i], 4),
                    "rouge_l": round(scores[system]["rouge_l"][i], 4),
                    "similarity": round(scores[system]["similarity"][i], 4),
                    "seconds": round(r["seconds"], 3),
                    "prompt_tokens": r["prompt_tokens"],
                    "completion_tokens": r["completion_tokens"],
                    "finish_reason": r["finish_reason"],
                }
            per_question.append(entry)
        result = {
            "benchmark": RESULT_NAME,
            "started_at": started_at.isoformat(timespec="seconds"),
            "total_seconds": total,
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "loadavg_start": load_start,
                "loadavg_end": load_end,
            },
            "packages": package_versions(),
            "corpus": {
                "source": str(faq.FAQ_DIR),
                "debian_faq_version": faq._dpkg_version("debian-faq"),
                "pairs": len(pairs),
                "train": len(train_pairs),
                "test": len(test_pairs),
                "split": f"sha256(question) % 100 < {TRAIN_PERCENT} trains",
                "reference": f"first sentence (+ the second if the first has < {SHORT_MIN_WORDS} words), "
                f"cut at {SHORT_MAX_WORDS} words",
                "reference_words_median": statistics.median(ref_words),
                "train_qids": [p.qid for p in train_pairs],
                "test_qids": [p.qid for p in test_pairs],
            },
            "serving": {
                "engine": "inference.engines.llama.LlamaEngine (what inference.services.answer_from uses)",
                "n_ctx": N_CTX,
                "top_k": TOP_K,
                "max_tokens": ANSWER_TOKENS,
                "temperature": 0.0,
                "base_gguf": gguf.name,
                "fine_tuned_gguf": "F16 (convert_hf_to_gguf of the merged fp32 model)",
            },
            "lora_settings": dataclasses.asdict(settings),
            "raft_settings": dataclasses.asdict(raft_settings),
            "raft_stats": dataclasses.asdict(raft_stats),
            "training_examples": {
                "plain_mean_tokens": statistics.fmean(plain_tokens),
                "raft_mean_tokens": statistics.fmean(raft_tokens),
                "raft_max_tokens": max(raft_tokens),
            },
            "timings": timings,
            "training": {
                k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items()}
                for k, v in trained.items()
            },
            "results": rows,
            "comparisons": comparisons,
            "gold_in_top4": sum(gold_rank),
            "per_question": per_question,
        }
        return result, printed
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def answer_room(tokenizer: Any, pairs: Sequence[Pair]) -> int:
    """Tokens the longest short answer takes in a RAFT example: its own, a citation (" [n]", up to
    4 tokens) and the end-of-turn token."""
    return max(len(tokenizer(p.reference, add_special_tokens=False)["input_ids"]) for p in pairs) + 6


def steps_for(tokens: list[int], settings: Any) -> int:
    """The step count train_lora would run for these example lengths without a cap."""
    import math

    from training.ml.lora import Encoded, length_buckets

    fake = [
        Encoded(input_ids=[0] * min(n, settings.max_length), labels=[0] * min(n, settings.max_length))
        for n in tokens
    ]
    per_epoch = len(length_buckets(fake, batch_tokens=settings.batch_tokens, seed=0, epoch=0))
    return max(1, math.ceil(settings.epochs * per_epoch))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="step cap of both LoRA runs")
    parser.add_argument("--limit", type=int, default=None, help="answer only the first N held-out questions")
    parser.add_argument("--work", type=Path, default=None, help="keep intermediate files here (reused)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the results")
    args = parser.parse_args(argv)
    if args.max_steps < 1:
        parser.error("--max-steps must be at least 1")
    faq.faq_files()  # stops with the install hint when the FAQ is missing
    result, printed = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{RESULT_NAME}.json").write_text(
        json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n"
    )
    (args.out / f"{RESULT_NAME}.txt").write_text("\n".join(printed) + "\n")
    (args.out / f"{RESULT_NAME}.svg").write_text(svg_chart(result["results"]))
    print(f"\nwrote {args.out / RESULT_NAME}.json, .txt and .svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
