"""LoRA training throughput: our `train_lora` against the seed article's Trainer + PEFT recipe.

    cd /work/main && .venv/bin/python bench/lora_throughput.py [--steps 30] [--bf16-recipe] [--ours-variants]

Same process, same machine, same thread count, same model (the bundled SmolLM2-135M-Instruct GGUF
dequantized to fp32 with `training.ml.base_models.dequantize_gguf_to_hf`), same examples, same
number of optimizer steps, on the CPU. The systems train in threads that take turns one optimizer
step at a time (`Turns`): only one runs at any moment, and a change in the machine's background
load hits every system's steps alike.

Data: Debian FAQ question → answer pairs (`bench/retrieval_debian_faq.py` builds them from
/usr/share/doc/debian/FAQ/*.en.html), answers of at most 256 tokens, as chats [user: question,
assistant: answer] rendered with the model's chat template. A seeded 20% is held out for eval.

Systems:
  recipe        transformers.Trainer + peft LoraConfig(r=8, lora_alpha=32,
                target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"), fp32,
                per_device_train_batch_size=4, learning_rate 2e-4 (ours; Trainer's own default is
                5e-5), other TrainingArguments at their defaults (AdamW, linear decay, no warmup).
                Each chat is tokenized as one text; DataCollatorForLanguageModeling(mlm=False)
                pads every batch to its longest example and sets labels = input_ids with every
                pad-token position set to -100. SmolLM2's pad token is <|im_end|>, so that also
                masks every real <|im_end|>: the loss covers system prompt, question and answer,
                but never the token that ends a turn.
  recipe-bf16   with --bf16-recipe: the same with TrainingArguments(bf16=True) (FACTS.md measured
                130 vs 181 tokens/s); off by default to keep the default run within about 10 minutes
  ours          training.ml.lora.train_lora with LoraSettings() defaults (r=16, alpha 32, all seven
                linear layers, bf16 autocast where the CPU has it, response-only loss), except
                max_steps = the recipe's steps and batch_tokens = the smallest budget whose steps
                hold, on average, at least as many real tokens as the recipe's 4 chats a step.
  ours-…        with --ours-variants: ours with LoRA dropout 0 ("ours-dropout0"), and with the
                recipe's adapter, r=8 on q/k/v, and dropout 0 ("ours-r8-qkv")

Measured:
  real tokens/s   non-padding tokens fed to the optimizer steps / seconds inside those steps
                  (ours: LoraResult.tokens_per_second; the recipe: a TrainerCallback sums the
                  seconds from on_step_begin to on_step_end, the collator counts attention_mask).
                  Model loading, evaluation, checkpoints and export are outside ("own s" is all
                  the time a system ran, setup and export included).
  per CPU-second  the same tokens / process CPU seconds inside the steps: less sensitive to other
                  programs taking the cores than wall time.
  eval NLL        computed here, the same way for every model: mean negative log-likelihood per
                  response token over the held-out chats, fp32, no adapter dropout. The response is
                  the answer's tokens and the <|im_end|> that closes it, after the prompt rendered
                  with add_generation_prompt=True. "answer only" leaves the <|im_end|> out.

Targets: ours >= 1.5 x the recipe's real tokens/s; ours' eval NLL <= the recipe's.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
for path in (REPO_ROOT, REPO_ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS_DIR = REPO_ROOT / "bench" / "results"
RESULT_NAME = "lora_throughput"

MAX_ANSWER_TOKENS = 256
EVAL_SHARE = 0.2
RECIPE_BATCH = 4
RECIPE_LR = 2e-4
SPLIT_SEED = 0
THROUGHPUT_TARGET = 1.5
# LoraSettings changes for --ours-variants: which part of our defaults costs throughput.
OURS_VARIANTS: dict[str, dict[str, Any]] = {
    "ours": {},
    "ours-dropout0": {"dropout": 0.0},
    "ours-r8-qkv": {"rank": 8, "target_modules": ("q_proj", "k_proj", "v_proj"), "dropout": 0.0},
}


# --------------------------------------------------------------------------------------------
# Data


def faq_pairs(tokenizer: Any, work: Path) -> tuple[list[tuple[str, str]], int]:
    """(question, answer) pairs of the Debian FAQ with answers of at most MAX_ANSWER_TOKENS."""
    from retrieval_debian_faq import build_gold

    _, questions, _ = build_gold(work / "faq")
    pairs = [
        (q.query, q.answer)
        for q in questions
        if len(tokenizer(q.answer, add_special_tokens=False)["input_ids"]) <= MAX_ANSWER_TOKENS
    ]
    return pairs, len(questions)


def chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def recipe_texts(tokenizer: Any, pairs: list[tuple[str, str]]) -> list[str]:
    """What the recipe tokenizes: each whole chat rendered by the chat template."""
    return [tokenizer.apply_chat_template(chat(q, a), tokenize=False) for q, a in pairs]


def split(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    shuffled = list(pairs)
    random.Random(SPLIT_SEED).shuffle(shuffled)
    held_out = max(1, round(EVAL_SHARE * len(shuffled)))
    return shuffled[held_out:], shuffled[:held_out]


# --------------------------------------------------------------------------------------------
# Evaluation (the same for every model)


def response_tokens(tokenizer: Any, question: str, answer: str) -> tuple[list[int], int, bool]:
    """(prompt + response ids, where the response starts, whether it ends with the end-of-turn token)."""
    messages = chat(question, answer)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full.startswith(prompt), "the chat template must render the prompt as a prefix"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    closed = end in response_ids
    if closed:
        response_ids = response_ids[: response_ids.index(end) + 1]  # the template's newline is not generated
    return prompt_ids + response_ids, len(prompt_ids), closed


def eval_nll(model: Any, tokenizer: Any, pairs: list[tuple[str, str]]) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    model.eval()
    with_end = [0.0, 0]
    answer_only = [0.0, 0]
    with torch.no_grad():
        for question, answer in pairs:
            ids, start, closed = response_tokens(tokenizer, question, answer)
            input_ids = torch.tensor([ids])
            # Logits only where a response token is predicted (the output layer is a fifth of the model).
            keep = len(ids) - start + 1
            logits = model(input_ids=input_ids, logits_to_keep=keep).logits[0, :-1].float()
            nll = F.cross_entropy(logits, input_ids[0, start:], reduction="none")
            with_end[0] += float(nll.sum())
            with_end[1] += len(nll)
            answer_nll = nll[:-1] if closed else nll
            answer_only[0] += float(answer_nll.sum())
            answer_only[1] += len(answer_nll)
    return {
        "nll": with_end[0] / with_end[1],
        "nll_answer_only": answer_only[0] / answer_only[1],
        "response_tokens": with_end[1],
    }


# --------------------------------------------------------------------------------------------
# Taking turns


class Turns:
    """Trainings in threads that run one optimizer step at a time, round robin.

    Only the thread whose turn it is runs (its setup, a step, its export); the others wait. So no
    system competes with another for the cores, and on a machine whose background load changes,
    every system's steps see the same load, which running them one after the other cannot promise.
    """

    def __init__(self, names: list[str]) -> None:
        self._cond = threading.Condition()
        self._order = list(names)
        self._turn = self._order[0]
        self._done: set[str] = set()
        self._since = 0.0
        self.held = dict.fromkeys(names, 0.0)  # seconds each system ran

    def wait(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == name)
            self._since = time.perf_counter()

    def step_done(self, name: str) -> None:
        self._pass(name, done=False)
        self.wait(name)

    def finish(self, name: str) -> None:
        self._pass(name, done=True)

    def _pass(self, name: str, *, done: bool) -> None:
        with self._cond:
            if self._turn == name:
                self.held[name] += time.perf_counter() - self._since
            if done:
                self._done.add(name)
            if self._turn == name:
                start = self._order.index(name)
                ring = self._order[start + 1 :] + self._order[: start + 1]
                self._turn = next((n for n in ring if n not in self._done), name)
            self._cond.notify_all()


# --------------------------------------------------------------------------------------------
# The seed article's recipe


def run_recipe(
    model_dir: Path,
    train: list[tuple[str, str]],
    steps: int,
    out_dir: Path,
    *,
    bf16: bool,
    step_done: Callable[[], None],
) -> tuple[dict[str, Any], Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from training.ml.base_models import load_causal_lm

    model, tokenizer = load_causal_lm(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    dataset = [dict(tokenizer(text)) for text in recipe_texts(tokenizer, train)]

    lm_collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    collated: list[tuple[int, int, int]] = []  # (real, padded, learned) tokens of each batch, in order

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = lm_collator(features)
        real, padded = int(batch["attention_mask"].sum()), batch["input_ids"].numel()
        collated.append((real, padded, int((batch["labels"][:, 1:] != -100).sum())))
        return batch

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.seconds = self.cpu_seconds = 0.0
            self.started = self.cpu_started = 0.0
            self.losses: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self.started
            self.cpu_seconds += time.process_time() - self.cpu_started
            step_done()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    clock = StepClock()
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=RECIPE_BATCH,
        max_steps=steps,
        learning_rate=RECIPE_LR,
        bf16=bf16,
        logging_steps=max(1, steps // 6),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[clock])
    train_started = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - train_started
    # accelerate's data loader fetches one batch ahead; step i trains on batch i.
    used = collated[: trainer.state.global_step]
    counts = {name: sum(batch[i] for batch in used) for i, name in enumerate(("real", "padded", "learned"))}
    row = {
        "system": "recipe-bf16" if bf16 else "recipe",
        "precision": "bf16 autocast" if bf16 else "fp32",
        "steps": trainer.state.global_step,
        "batches_collated": len(collated),
        "real_tokens": counts["real"],
        "padded_tokens": counts["padded"],
        "learned_tokens": counts["learned"],
        "step_seconds": clock.seconds,
        "step_cpu_seconds": clock.cpu_seconds,
        "real_tokens_per_second": counts["real"] / clock.seconds,
        "real_tokens_per_cpu_second": counts["real"] / clock.cpu_seconds,
        "train_call_seconds": train_wall,
        "logged_losses": clock.losses,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    return row, trainer.model


# --------------------------------------------------------------------------------------------
# Ours


def run_ours(
    model_dir: Path,
    train: list[tuple[str, str]],
    steps: int,
    batch_tokens: int,
    work_dir: Path,
    *,
    step_done: Callable[[], None],
    system: str = "ours",
) -> tuple[dict[str, Any], Path]:
    """train_lora without an eval set: the bench scores every model itself, and train_lora's own
    evaluations (before, four times during and after the run) would only add wall time."""
    from training.ml.lora import Example, LoraSettings, train_lora

    settings = LoraSettings(max_steps=steps, batch_tokens=batch_tokens, **OURS_VARIANTS[system])
    # should_stop is asked right before each step and on_point called right after it (with no
    # eval set nothing else runs in between but a checkpoint every 25 steps): CPU time of the steps.
    cpu = {"seconds": 0.0, "started": 0.0}

    def before_step() -> bool:
        cpu["started"] = time.process_time()
        return False

    def after_step(point: Any) -> None:
        cpu["seconds"] += time.process_time() - cpu["started"]
        step_done()

    result = train_lora(
        model_dir,
        [Example(chat(q, a)) for q, a in train],
        [],
        work_dir,
        settings,
        on_point=after_step,
        should_stop=before_step,
        device="cpu",
    )
    step_seconds = result.history[-1].seconds if result.history else 0.0
    row = {
        "system": system,
        "precision": None,  # filled in by the caller from the CPU
        "steps": result.steps,
        "real_tokens": result.tokens,
        "padded_tokens": None,  # filled in by the caller (length buckets of the same encoding)
        "step_seconds": step_seconds,
        "step_cpu_seconds": cpu["seconds"],
        "real_tokens_per_second": result.tokens_per_second,
        "real_tokens_per_cpu_second": result.tokens / cpu["seconds"],
        "train_loss_last_epoch": result.train_loss,
        "step_losses": [p.train_loss for p in result.history],
        "settings": asdict(settings),
    }
    return row, result.merged_dir


def ours_batches(
    tokenizer: Any, train: list[tuple[str, str]], steps: int, batch_tokens: int
) -> dict[str, Any]:
    """Real and padded tokens of the batches train_lora runs (the same functions it calls)."""
    from training.ml.lora import Example, LoraSettings, encode, length_buckets

    settings = LoraSettings(max_steps=steps, batch_tokens=batch_tokens)
    encoded = encode(tokenizer, [Example(chat(q, a)) for q, a in train], max_length=settings.max_length)
    real = padded = learned = examples = done = epoch = 0
    per_epoch = len(length_buckets(encoded, batch_tokens=batch_tokens, seed=settings.seed, epoch=0))
    while done < steps:
        for batch in length_buckets(encoded, batch_tokens=batch_tokens, seed=settings.seed, epoch=epoch):
            if done == steps:
                break
            lengths = [len(encoded[i].input_ids) for i in batch]
            real += sum(lengths)
            padded += len(lengths) * max(lengths)
            learned += sum(encoded[i].response_tokens for i in batch)
            examples += len(batch)
            done += 1
        epoch += 1
    return {
        "real_tokens": real,
        "padded_tokens": padded,
        "learned_tokens": learned,
        "examples": examples,
        "steps_per_epoch": per_epoch,
        "truncated_examples": sum(1 for e in encoded if len(e.input_ids) >= settings.max_length),
    }


def matching_batch_tokens(tokenizer: Any, train: list[tuple[str, str]], steps: int, target: float) -> int:
    """The smallest batch_tokens (a padded budget) whose steps hold at least `target` real tokens
    on average: the recipe's 4 examples a step, in our length-bucketed batches."""
    budget = math.ceil(target)
    while (
        ours_batches(tokenizer, train, steps, budget)["real_tokens"] / steps < target and budget < 2 * target
    ):
        budget += 8
    return budget


# --------------------------------------------------------------------------------------------
# Report


def package_versions() -> dict[str, str]:
    versions = {}
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def machine_info(threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = set(cpuinfo.split())
        info["bf16_flags"] = sorted(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return info


def fmt_table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'system':<14} {'precision':<14} {'steps':>5} {'real tok/step':>13} {'padded/step':>11} "
        f"{'step s':>7} {'real tok/s':>10} {'per CPU-s':>9} {'eval NLL':>8} {'ans. only':>9} {'own s':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        nll = f"{row['eval']['nll']:8.4f} {row['eval']['nll_answer_only']:9.4f}"
        if row["system"] == "base model":
            lines.append(
                f"{row['system']:<14} {'fp32':<14} {'':>5} {'':>13} {'':>11} {'':>7} {'':>10} {'':>9} {nll}"
            )
            continue
        steps = max(1, row["steps"])
        lines.append(
            f"{row['system']:<14} {row['precision']:<14} {row['steps']:5d} {row['real_tokens'] / steps:13.0f} "
            f"{row['padded_tokens'] / steps:11.0f} {row['step_seconds']:7.1f} "
            f"{row['real_tokens_per_second']:10.1f} {row['real_tokens_per_cpu_second']:9.1f} {nll} "
            f"{row['own_seconds']:7.1f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    import torch
    from transformers import AutoTokenizer

    from training.ml.base_models import dequantize_gguf_to_hf, load_causal_lm
    from training.ml.bundled import bundled_llm_gguf
    from training.ml.rag import resolve_precision

    started_at = datetime.now(UTC)
    load_start = os.getloadavg()
    t_total = time.perf_counter()
    printed: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        printed.append(line)

    def progress(line: str) -> None:  # printed, not kept in the .txt
        print(f"[{time.perf_counter() - t_total:5.0f}s] {line}", flush=True)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars; the step lines below say enough
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)  # what train_lora sets for itself on a CPU
    work = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    try:
        gguf = bundled_llm_gguf().path
        model_dir = dequantize_gguf_to_hf(gguf, work / "model")
        progress("model dequantized")
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        pairs, questions = faq_pairs(tokenizer, work)
        train, eval_pairs = split(pairs)
        lengths = [len(tokenizer(text)["input_ids"]) for text in recipe_texts(tokenizer, train)]
        batch_tokens = matching_batch_tokens(
            tokenizer, train, args.steps, RECIPE_BATCH * statistics.fmean(lengths)
        )
        say(
            f"Debian FAQ: {questions} questions, {len(pairs)} with answers <= {MAX_ANSWER_TOKENS} tokens; "
            f"train {len(train)}, held out {len(eval_pairs)}; mean training chat {statistics.fmean(lengths):.0f} "
            f"tokens (max {max(lengths)}). Model: {gguf.name} dequantized to fp32. Threads: {threads}. "
            f"Steps: {args.steps}; ours batch_tokens = {batch_tokens} (real tokens a step >= the recipe's 4 chats)."
        )

        rows: list[dict[str, Any]] = []
        base, _ = load_causal_lm(model_dir)
        rows.append({"system": "base model", "eval": eval_nll(base, tokenizer, eval_pairs)})
        progress("base model evaluated")
        del base

        systems = ["recipe", "ours"] + (["recipe-bf16"] if args.bf16_recipe else [])
        if args.ours_variants:
            systems += [name for name in OURS_VARIANTS if name != "ours"]
        progress(f"training {', '.join(systems)}, taking turns step by step …")
        turns = Turns(systems)
        outcomes: dict[str, Any] = {}

        def train_one(system: str) -> None:
            turns.wait(system)
            try:
                step_done = functools.partial(turns.step_done, system)
                if system.startswith("recipe"):
                    outcomes[system] = run_recipe(
                        model_dir,
                        train,
                        args.steps,
                        work / system,
                        bf16=system == "recipe-bf16",
                        step_done=step_done,
                    )
                else:
                    outcomes[system] = run_ours(
                        model_dir,
                        train,
                        args.steps,
                        batch_tokens,
                        work / system,
                        step_done=step_done,
                        system=system,
                    )
            except BaseException as exc:  # re-raised in the main thread
                outcomes[system] = exc
            finally:
                turns.finish(system)

        workers = [threading.Thread(target=train_one, args=(system,), name=system) for system in systems]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        for system in systems:
            if isinstance(outcomes[system], BaseException):
                raise outcomes[system]

        for system in systems:
            row, trained = outcomes.pop(system)
            row["own_seconds"] = turns.held[system]
            if system.startswith("ours"):
                row["precision"] = (
                    "bf16 autocast" if resolve_precision("auto", "cpu") == "bfloat16" else "fp32"
                )
                batches = ours_batches(tokenizer, train, args.steps, batch_tokens)
                if batches["real_tokens"] != row["real_tokens"]:
                    raise AssertionError(
                        f"the batch replay counts {batches['real_tokens']} tokens, train_lora {row['real_tokens']}"
                    )
                row |= {k: v for k, v in batches.items() if k != "real_tokens"}
                trained, _ = load_causal_lm(trained)  # the merged model folder
            row["eval"] = eval_nll(trained, tokenizer, eval_pairs)
            del trained
            shutil.rmtree(work / system, ignore_errors=True)
            progress(
                f"{system}: {row['real_tokens_per_second']:.1f} real tokens/s, eval NLL {row['eval']['nll']:.4f}"
            )
            rows.append(row)

        by = {row["system"]: row for row in rows}
        ratio = by["ours"]["real_tokens_per_second"] / by["recipe"]["real_tokens_per_second"]
        cpu_ratio = by["ours"]["real_tokens_per_cpu_second"] / by["recipe"]["real_tokens_per_cpu_second"]
        nll_delta = by["ours"]["eval"]["nll"] - by["recipe"]["eval"]["nll"]
        say()
        say(fmt_table(rows))
        say()
        say(
            f"ours / recipe real tokens/s: {ratio:.2f}x (target >= {THROUGHPUT_TARGET}x: "
            f"{'met' if ratio >= THROUGHPUT_TARGET else 'NOT met'}); per CPU-second: {cpu_ratio:.2f}x"
        )
        if "recipe-bf16" in by:
            ratio_bf16 = by["ours"]["real_tokens_per_second"] / by["recipe-bf16"]["real_tokens_per_second"]
            say(f"ours / recipe-bf16 real tokens/s: {ratio_bf16:.2f}x")
        else:
            ratio_bf16 = None
        say(
            f"eval NLL ours {by['ours']['eval']['nll']:.4f} vs recipe {by['recipe']['eval']['nll']:.4f} "
            f"(base {by['base model']['eval']['nll']:.4f}): ours - recipe = {nll_delta:+.4f} "
            f"(target <= 0: {'met' if nll_delta <= 0 else 'NOT met'})"
        )
        say(
            "learned tokens per step (what the loss covers): "
            + ", ".join(
                f"{r['system']} {r['learned_tokens'] / max(1, r['steps']):.0f}"
                for r in rows
                if "learned_tokens" in r
            )
        )
        load_end = os.getloadavg()
        total = time.perf_counter() - t_total
        say(
            f"machine: {os.cpu_count()} cpus, {threads} torch threads, load average start "
            f"{load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}, end "
            f"{load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}; total run {total:.0f}s"
        )
        return {
            "benchmark": RESULT_NAME,
            "started_at": started_at.isoformat(timespec="seconds"),
            "total_seconds": total,
            "machine": machine_info(threads) | {"loadavg_start": load_start, "loadavg_end": load_end},
            "packages": package_versions(),
            "data": {
                "source": "Debian FAQ (bench/retrieval_debian_faq.py build_gold)",
                "questions": questions,
                "pairs": len(pairs),
                "max_answer_tokens": MAX_ANSWER_TOKENS,
                "train": len(train),
                "eval": len(eval_pairs),
                "split_seed": SPLIT_SEED,
                "mean_train_chat_tokens": statistics.fmean(lengths),
            },
            "steps": args.steps,
            "ours_batch_tokens": batch_tokens,
            "recipe": {
                "lora": "LoraConfig(r=8, lora_alpha=32, target_modules=[q_proj, k_proj, v_proj], "
                "task_type=CAUSAL_LM)",
                "training_arguments": f"per_device_train_batch_size={RECIPE_BATCH}, max_steps={args.steps}, "
                f"learning_rate={RECIPE_LR}, defaults otherwise (bf16=True for recipe-bf16)",
                "collator": "DataCollatorForLanguageModeling(mlm=False): pad to longest, labels = input_ids "
                "with pad-token (= <|im_end|>) positions -100",
            },
            "results": rows,
            "targets": {
                "throughput_ratio": ratio,
                "throughput_ratio_per_cpu_second": cpu_ratio,
                "throughput_ratio_vs_recipe_bf16": ratio_bf16,
                "throughput_target": THROUGHPUT_TARGET,
                "throughput_target_met": ratio >= THROUGHPUT_TARGET,
                "eval_nll_ours_minus_recipe": nll_delta,
                "eval_target_met": nll_delta <= 0,
            },
        }, printed
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps for every system")
    parser.add_argument(
        "--bf16-recipe", action="store_true", help="also run the recipe with TrainingArguments(bf16=True)"
    )
    parser.add_argument(
        "--ours-variants",
        action="store_true",
        help=f"also run train_lora with {', '.join(n for n in OURS_VARIANTS if n != 'ours')} (what costs speed)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the .json and .txt results")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    result, printed = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{RESULT_NAME}.json").write_text(
        json.dumps(result, indent=2, ensure_ascii=False, default=_jsonable) + "\n"
    )
    (args.out / f"{RESULT_NAME}.txt").write_text("\n".join(printed) + "\n")
    print(f"\nwrote {args.out / (RESULT_NAME + '.json')} and .txt")
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


if __name__ == "__main__":
    sys.exit(main())
