"""Measuring a model version: perplexity, fidelity to its parent, answer quality and speed.

Django-free on purpose (see `training/ml/__init__.py`). Every model version is measured by the same
code with the same settings, so numbers compare across versions of one base model:

* `score_text`: token perplexity and bits per byte of a held-out text, evaluated by llama.cpp on
  the GGUF itself (what the chat will run), plus mean KL(parent || model) and top-1 agreement when
  the parent GGUF is given.
* `token_f1` and `rouge_l`: a generated answer against a reference answer.
* `measure_speed`: load time, prompt and generation tokens per second and peak memory, measured in a
  fresh process so that nothing else the caller loaded counts.

Scoring convention (fixed; changing it changes every number). The text is tokenized without special
tokens and cut into consecutive, non-overlapping windows of `n_ctx` tokens. A model that asks for
a BOS token (llama.cpp's add_bos flag) gets one at the start of every window, taking one slot.
Every token of a window is scored except its first token, which has no context to be predicted
from. Windows are thus independent, and tokens early in a window see little context: perplexity is
higher than with llama.cpp's `llama-perplexity`, which scores only the second half of each window,
but four times cheaper for the same number of scored tokens, which matters on CPU. The last window
may be shorter. Bits per byte count the UTF-8 bytes of the scored tokens only.

llama_cpp is imported inside the functions that use it. Module import stays cheap and never imports
Django, so `python -m training.ml.evaluate --speed` runs alone.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import re
import string
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EvaluationStopped",
    "SpeedResult",
    "TextScore",
    "bits_per_byte",
    "kl_from_logits",
    "measure_speed",
    "nll_from_logits",
    "perplexity",
    "rouge_l",
    "score_text",
    "token_f1",
]

ROWS_PER_BLOCK = 64  # logit rows turned into float64 at once: 64 x 49,152 x 8 bytes = 25 MB
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The prompt measure_speed feeds the model, repeated and cut to the requested number of tokens.
SPEED_PROMPT = (
    "The maintenance manual describes how to reset the pump, read its error codes and replace the "
    "filter. Before opening the housing, switch off the power supply and close both valves. "
)
SPEED_TIMEOUT_SECONDS = 600


class EvaluationStopped(Exception):
    """should_stop() asked score_text to stop between two windows."""


# --------------------------------------------------------------------------------------------
# Logit arithmetic


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def nll_from_logits(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood in nats of each target under its row of logits, shape (rows,)."""
    logits = np.asarray(logits)
    targets = np.asarray(targets, dtype=np.int64)
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError("Expected logits of shape (tokens, vocab) and targets of shape (tokens,).")
    out = np.empty(len(targets), dtype=np.float64)
    for start in range(0, len(targets), ROWS_PER_BLOCK):
        block = slice(start, start + ROWS_PER_BLOCK)
        log_probs = _log_softmax(logits[block])
        out[block] = -log_probs[np.arange(len(log_probs)), targets[block]]
    return out


def kl_from_logits(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(P || Q) in nats for each row, P the reference (parent) model, Q the model measured.

    Rounding can leave a value a hair below zero for near-identical rows; those are reported as 0.
    """
    p_logits, q_logits = np.asarray(p_logits), np.asarray(q_logits)
    if p_logits.shape != q_logits.shape or p_logits.ndim != 2:
        raise ValueError(f"Logit shapes differ or are not 2-D: {p_logits.shape} vs {q_logits.shape}.")
    out = np.empty(p_logits.shape[0], dtype=np.float64)
    for start in range(0, len(out), ROWS_PER_BLOCK):
        block = slice(start, start + ROWS_PER_BLOCK)
        log_p, log_q = _log_softmax(p_logits[block]), _log_softmax(q_logits[block])
        out[block] = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return np.maximum(out, 0.0)


def perplexity(nll_sum: float, tokens: int) -> float:
    if tokens <= 0:
        raise ValueError("Perplexity needs at least one scored token.")
    return math.exp(nll_sum / tokens)


def bits_per_byte(nll_sum: float, n_bytes: int) -> float:
    """Total NLL in nats converted to bits and spread over the UTF-8 bytes it covers."""
    if n_bytes <= 0:
        raise ValueError("Bits per byte need at least one byte.")
    return nll_sum / (n_bytes * math.log(2))


# --------------------------------------------------------------------------------------------
# llama.cpp


def _llama_cpp() -> Any:
    # Imported late: the package's __init__ has set libgomp's spin policy by now, and importing
    # this module must stay cheap for code that only wants the metric functions.
    import llama_cpp

    return llama_cpp


def _load_llama(
    gguf: Path,
    *,
    n_ctx: int,
    n_threads: int,
    n_threads_batch: int,
    logits_all: bool,
    lora: Path | None = None,
) -> Any:
    llama_cpp = _llama_cpp()
    from .llamacpp import without_extra_buffer_types  # the chat engine loads models the same way

    if not Path(gguf).is_file():
        raise FileNotFoundError(f"{gguf} does not exist.")
    with without_extra_buffer_types():
        return llama_cpp.Llama(
            model_path=str(gguf),
            n_ctx=n_ctx,
            n_batch=n_ctx,  # a whole window in one decode
            n_ubatch=min(n_ctx, 512),
            n_threads=n_threads,
            n_threads_batch=n_threads_batch,
            logits_all=logits_all,
            lora_path=str(lora) if lora else None,
            verbose=False,
        )


def _vocab(llm: Any) -> Any:
    return _llama_cpp().llama_model_get_vocab(llm.model)


def _piece_length(llm: Any, token: int) -> int:
    """Bytes of a token's text (no special-token rendering)."""
    llama_cpp = _llama_cpp()
    size = 64
    while True:
        buffer = (ctypes.c_char * size)()
        n = llama_cpp.llama_token_to_piece(_vocab(llm), token, buffer, size, 0, False)
        if n >= 0:
            return n
        size = -n


def _window_logits(llm: Any, tokens: list[int]) -> np.ndarray:
    """Logits for every position of tokens, evaluated from an empty context.

    A view of llama-cpp-python's buffer: valid until this model evaluates again.
    """
    llm.reset()
    llm.eval(tokens)
    return llm.scores[: len(tokens)]


# --------------------------------------------------------------------------------------------
# Scoring a text


@dataclass(frozen=True)
class TextScore:
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the scored tokens
    perplexity: float
    bits_per_byte: float
    kl_divergence: float | None  # mean KL(reference || model) in nats per token; None without reference
    top1_agreement: float | None  # share of positions where both models rank the same token first
    seconds: float  # wall time of the whole call, loading included


def score_text(
    gguf: Path,
    text: str,
    *,
    reference: Path | None = None,
    n_ctx: int = 512,
    max_tokens: int = 4096,
    threads: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TextScore:
    """Perplexity and bits per byte of text under the GGUF (see the module docstring).

    With `reference`, the unquantized parent GGUF sharing the tokenizer, the same windows are also
    evaluated by it, and the mean KL(reference || model) and top-1 agreement are reported.
    `should_stop()` is consulted before each window; True raises EvaluationStopped.
    """
    if n_ctx < 2:
        raise ValueError("n_ctx must be at least 2.")
    started = time.perf_counter()
    # Evaluating a window is one large batch: every core helps.
    cores = threads or os.cpu_count() or 1
    settings = {"n_ctx": n_ctx, "n_threads": cores, "n_threads_batch": cores, "logits_all": True}
    llm = _load_llama(gguf, **settings)
    ref = None
    try:
        ref = _load_llama(reference, **settings) if reference is not None else None
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:max_tokens]
        if ref is not None:
            if ref.n_vocab() != llm.n_vocab():
                raise ValueError(
                    f"The reference has {ref.n_vocab()} tokens in its vocabulary, the model "
                    f"{llm.n_vocab()}: they do not share a tokenizer."
                )
            if ref.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:max_tokens] != tokens:
                raise ValueError(
                    "The reference tokenizes the text differently: they do not share a tokenizer."
                )

        lib = _llama_cpp()
        bos = [llm.token_bos()] if lib.llama_vocab_get_add_bos(_vocab(llm)) else []
        span = n_ctx - len(bos)
        lengths: dict[int, int] = {}
        scored = n_bytes = agreed = 0
        nll_sum = kl_sum = 0.0
        for start in range(0, len(tokens), span):
            window = bos + tokens[start : start + span]
            if len(window) < 2:
                continue
            if should_stop is not None and should_stop():
                raise EvaluationStopped("Scoring was stopped.")
            targets = np.asarray(window[1:])
            logits = _window_logits(llm, window)[:-1]
            nll_sum += float(nll_from_logits(logits, targets).sum())
            scored += len(targets)
            for token in window[1:]:
                if token not in lengths:
                    lengths[token] = _piece_length(llm, token)
                n_bytes += lengths[token]
            if ref is not None:
                ref_logits = _window_logits(ref, window)[:-1]
                kl_sum += float(kl_from_logits(ref_logits, logits).sum())
                agreed += int((ref_logits.argmax(axis=-1) == logits.argmax(axis=-1)).sum())
        if scored == 0:
            raise ValueError("The text is too short to score: it needs at least two tokens.")
    finally:
        llm.close()
        if ref is not None:
            ref.close()
    return TextScore(
        tokens=scored,
        bytes=n_bytes,
        perplexity=perplexity(nll_sum, scored),
        bits_per_byte=bits_per_byte(nll_sum, n_bytes) if n_bytes else math.inf,
        kl_divergence=kl_sum / scored if reference is not None else None,
        top1_agreement=agreed / scored if reference is not None else None,
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------------------------
# Answer quality

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WORD = re.compile(r"\w+")


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def _answer_tokens(text: str) -> list[str]:
    """SQuAD's normalisation: lowercase, no punctuation (Unicode's too), no articles, split on blanks."""
    text = "".join(char for char in text.lower() if not _is_punctuation(char))
    return _ARTICLES.sub(" ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-tokens F1 of SQuAD; two answers that normalise to nothing count as equal."""
    predicted, expected = _answer_tokens(prediction), _answer_tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for item in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) on lowercased word tokens; two empty answers count as equal."""
    predicted, expected = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    if not predicted or not expected:
        return float(predicted == expected)
    lcs = _lcs_length(predicted, expected)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(predicted), lcs / len(expected)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------
# Speed


@dataclass(frozen=True)
class SpeedResult:
    prompt_tokens_per_second: float
    tokens_per_second: float  # greedy generation, one token per decode
    load_seconds: float
    peak_memory_bytes: int  # peak resident memory of the measuring process
    size_bytes: int  # the GGUF, plus the LoRA adapter if one is applied


def measure_speed(
    gguf: Path,
    *,
    prompt_tokens: int = 128,
    gen_tokens: int = 64,
    threads: int | None = None,
    lora: Path | None = None,
) -> SpeedResult:
    """Load the GGUF in a fresh Python process, read a fixed prompt and generate gen_tokens greedily.

    Threads follow the chat engine's choice (half the cores to generate, all to read the prompt)
    unless `threads` sets both. End-of-sequence tokens are fed back like any other, so exactly
    gen_tokens are generated whatever the model says.
    """
    if prompt_tokens < 1 or gen_tokens < 1:
        raise ValueError("prompt_tokens and gen_tokens must be at least 1.")
    job = {
        "gguf": str(Path(gguf).resolve()),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "threads": threads,
        "lora": str(Path(lora).resolve()) if lora else None,
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.pop("DJANGO_SETTINGS_MODULE", None)  # nothing in the child may reach for Django
    proc = subprocess.run(
        [sys.executable, "-m", "training.ml.evaluate", "--speed", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        timeout=SPEED_TIMEOUT_SECONDS,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise RuntimeError(
            f"Measuring the speed of {Path(gguf).name} failed (exit {proc.returncode}): {tail}"
        )
    return SpeedResult(**json.loads(lines[-1]))


def _speed_prompt(llm: Any, n_tokens: int) -> list[int]:
    piece = llm.tokenize(SPEED_PROMPT.encode("utf-8"), add_bos=False, special=False)
    return (piece * (n_tokens // len(piece) + 1))[:n_tokens]


def _peak_rss_bytes() -> int:
    """This process's peak resident memory.

    On Linux, getrusage's ru_maxrss survives execve: a child started by a parent holding 400 MB
    reports at least 400 MB. VmHWM belongs to the process image, so it is read instead.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    if match:
        return int(match.group(1)) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS says bytes, Linux KiB


def _measure_speed_here(job: dict) -> SpeedResult:
    """The child's side of measure_speed."""
    llama_cpp = _llama_cpp()
    gguf, lora = Path(job["gguf"]), Path(job["lora"]) if job.get("lora") else None
    prompt_tokens, gen_tokens, threads = job["prompt_tokens"], job["gen_tokens"], job.get("threads")
    cores = os.cpu_count() or 1

    started = time.perf_counter()
    llm = _load_llama(
        gguf,
        n_ctx=prompt_tokens + gen_tokens + 1,
        n_threads=threads or max(1, cores // 2),
        n_threads_batch=threads or cores,
        logits_all=False,
        lora=lora,
    )
    load_seconds = time.perf_counter() - started
    try:
        prompt = _speed_prompt(llm, prompt_tokens)
        # Warm-up (as llama-bench does): the first decode pages the weights in and sets buffers up.
        llm.eval(prompt[:2])
        llm.reset()

        started = time.perf_counter()
        llm.eval(prompt)
        prompt_seconds = time.perf_counter() - started

        n_vocab = llm.n_vocab()
        started = time.perf_counter()
        for _ in range(gen_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            llm.eval([int(logits.argmax())])
        gen_seconds = time.perf_counter() - started
    finally:
        llm.close()
    return SpeedResult(
        prompt_tokens_per_second=prompt_tokens / prompt_seconds,
        tokens_per_second=gen_tokens / gen_seconds,
        load_seconds=load_seconds,
        peak_memory_bytes=_peak_rss_bytes(),
        size_bytes=gguf.stat().st_size + (lora.stat().st_size if lora else 0),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SLM Studio model measurements (used by measure_speed).")
    parser.add_argument("--speed", metavar="JSON", required=True, help="the job measure_speed sends")
    args = parser.parse_args(argv)
    result = _measure_speed_here(json.loads(args.speed))
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
