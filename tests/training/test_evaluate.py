"""training.ml.evaluate: logit arithmetic, answer metrics, and scoring and timing the bundled GGUF."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.ml import evaluate
from training.ml.bundled import bundled_llm_gguf
from training.ml.evaluate import (
    EvaluationStopped,
    bits_per_byte,
    kl_from_logits,
    measure_speed,
    nll_from_logits,
    perplexity,
    rouge_l,
    score_text,
    token_f1,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGLISH = (
    "The pump must be reset after every power failure. To reset it, hold the red button for five "
    "seconds until the green light blinks. If the light stays red, check the inlet valve and the fuse. "
    "Employees get twenty-five days of paid vacation per year, and requests go to their manager. "
) * 3


@pytest.fixture(scope="module")
def gguf() -> Path:
    return bundled_llm_gguf().path


# --- Logit arithmetic -------------------------------------------------------------------------


def test_it_gives_a_uniform_model_the_vocabulary_size_as_perplexity() -> None:
    vocab = 49_152
    targets = np.random.default_rng(0).integers(0, vocab, size=100)
    nll = nll_from_logits(np.zeros((100, vocab), dtype=np.float32), targets)
    assert np.allclose(nll, math.log(vocab), rtol=0, atol=1e-12)
    assert perplexity(float(nll.sum()), 100) == pytest.approx(vocab, rel=1e-9, abs=1e-6)


def test_it_computes_nll_by_hand_and_stays_finite_for_huge_logits() -> None:
    logits = np.array([[0.0, math.log(3.0)], [1000.0, 0.0]])  # probabilities (1/4, 3/4), then (1, e^-1000)
    nll = nll_from_logits(logits, np.array([1, 1]))
    assert nll[0] == pytest.approx(-math.log(0.75), abs=1e-12)
    assert nll[1] == pytest.approx(1000.0, abs=1e-9)


def test_it_rejects_mismatched_targets() -> None:
    with pytest.raises(ValueError):
        nll_from_logits(np.zeros((3, 5)), np.zeros(4, dtype=int))


def test_it_computes_kl_divergence() -> None:
    rng = np.random.default_rng(1)
    p = rng.normal(size=(200, 300)) * 4
    q = p + rng.normal(size=p.shape)
    assert np.array_equal(kl_from_logits(p, p), np.zeros(200))
    assert (kl_from_logits(p, q) > 0).all()
    # KL((1/2, 1/2) || (1/4, 3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3); logits are shift-invariant.
    hand = kl_from_logits(np.log([[0.5, 0.5]]) + 7.0, np.log([[0.25, 0.75]]))
    assert hand[0] == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)


def test_it_converts_nats_to_bits_per_byte() -> None:
    assert bits_per_byte(8 * math.log(2) * 5, 5) == pytest.approx(8.0)
    assert bits_per_byte(math.log(2), 4) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


# --- Answer metrics ---------------------------------------------------------------------------


def test_it_scores_answers_with_token_f1() -> None:
    assert token_f1("Hold the RESET button.", "hold the reset button") == 1.0
    assert token_f1("blue sky", "red car") == 0.0
    # Articles and punctuation go: "cat sat on mat" vs "cat sat on hat" share 3 of 4 tokens.
    assert token_f1("The cat sat on the mat!", "A cat sat on a hat") == pytest.approx(0.75)
    # Counts matter: "yes yes no" vs "yes": precision 1/3, recall 1, F1 = 1/2.
    assert token_f1("yes yes no", "yes") == pytest.approx(0.5)
    assert token_f1("“Naïve” café…", "naïve café") == 1.0  # Unicode punctuation goes too
    assert token_f1("", "") == 1.0
    assert token_f1("the", "answer") == 0.0


def test_it_scores_answers_with_rouge_l() -> None:
    assert rouge_l("The cat sat.", "the cat sat") == 1.0
    assert rouge_l("blue sky", "red car") == 0.0
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides.
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # LCS "a c" = 2: precision 2/4, recall 2/3, F = 4/7.
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l("d c b a", "a b c d") == pytest.approx(1 / 4)  # order matters, unlike token_f1
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "x") == 0.0


# --- The bundled GGUF -------------------------------------------------------------------------


def test_it_scores_a_text_against_itself_as_reference(gguf: Path) -> None:
    score = score_text(gguf, ENGLISH, reference=gguf, n_ctx=32, max_tokens=100)
    # Windows of 32, 32, 32 and 4 tokens; the first token of each is not scored.
    assert score.tokens == 100 - 4
    assert 0 < score.bytes < len(ENGLISH.encode())
    assert 1 < score.perplexity < 200  # the vocabulary has 49,152 tokens
    assert 0 < score.bits_per_byte < 3
    assert score.kl_divergence == pytest.approx(0.0, abs=1e-9)
    assert score.top1_agreement == 1.0
    assert score.seconds > 0

    whole = score_text(gguf, ENGLISH, n_ctx=512)
    assert whole.kl_divergence is None and whole.top1_agreement is None
    assert whole.perplexity < score.perplexity  # more context, better predictions


def test_it_refuses_a_reference_with_another_vocabulary(gguf: Path, monkeypatch) -> None:
    load = evaluate._load_llama

    class OtherVocabulary:
        def __init__(self, llm) -> None:
            self._llm = llm

        def __getattr__(self, name: str):
            return getattr(self._llm, name)

        def n_vocab(self) -> int:
            return self._llm.n_vocab() + 1

    loaded = []

    def load_second_with_another_vocabulary(*args, **kwargs):
        loaded.append(load(*args, **kwargs))
        return OtherVocabulary(loaded[-1]) if len(loaded) == 2 else loaded[-1]

    monkeypatch.setattr(evaluate, "_load_llama", load_second_with_another_vocabulary)
    with pytest.raises(ValueError, match="do not share a tokenizer"):
        score_text(gguf, ENGLISH, reference=gguf, n_ctx=32)
    assert len(loaded) == 2


def test_it_stops_when_asked(gguf: Path) -> None:
    with pytest.raises(EvaluationStopped):
        score_text(gguf, ENGLISH, n_ctx=32, should_stop=lambda: True)


def test_it_measures_speed_in_a_fresh_process(gguf: Path) -> None:
    speed = measure_speed(gguf, prompt_tokens=64, gen_tokens=16)
    assert speed.prompt_tokens_per_second > 0
    assert speed.tokens_per_second > 0
    assert speed.load_seconds > 0
    assert speed.size_bytes == gguf.stat().st_size
    assert speed.peak_memory_bytes > speed.size_bytes


def test_it_imports_without_django() -> None:
    code = "import sys, training.ml.evaluate; print(sorted(m for m in sys.modules if m.startswith('django')))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
