"""Logit distillation and full fine-tuning in training.ml.lora, on tiny random Llamas.

Two tiny models made with different seeds share their tokenizer exactly, so one can teach the
other. The loss is checked against hand computations, the teacher's cached top-k log-probabilities
against its live logits, and the loop end to end: the student moves towards the teacher, the teacher runs
once per work folder, and a full fine-tune resumes to the same weights as an unbroken run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.tinymodels import make_tiny_llama, make_tokenizer
from training.ml.base_models import load_causal_lm
from training.ml.lora import (
    IGNORE_INDEX,
    TEACHER_CACHE,
    Distillation,
    Example,
    LoraSettings,
    TrainingStopped,
    TrainPoint,
    distillation_loss_sum,
    encode,
    length_buckets,
    teacher_topk,
    train_lora,
)

# Third-party noise: transformers deprecates a name peft still calls.
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]

PAIRS = [
    ("How do I reset the P-200 pump?", "Hold the red RESET button for five seconds."),
    ("What does error E-4021 mean?", "The inlet pressure is too low: open the inlet valve."),
    ("How many vacation days do employees get?", "25 days of paid vacation per year."),
    ("How long are backups kept?", "Backups are kept for thirty days."),
    ("Who resets forgotten passwords?", "Administrators reset forgotten passwords."),
    ("Where do vacation requests go?", "Requests go to your manager."),
]
EXAMPLES = [
    Example([{"role": "system", "content": "You answer questions about the handbook."}, {"role": "user", "content": q}, {"role": "assistant", "content": a}])
    for q, a in PAIRS
]  # fmt: skip

# fp32 everywhere: the comparisons below are exact or within float rounding.
SETTINGS = LoraSettings(
    rank=8, alpha=16, learning_rate=1e-2, epochs=100, max_steps=20, batch_tokens=256, checkpoint_every=10,
    precision="float32",
)  # fmt: skip


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("distill") / "student", seed=0)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("distill") / "teacher", seed=1)


@pytest.fixture(scope="module")
def models(student_dir: Path, teacher_dir: Path):
    student, tokenizer = load_causal_lm(student_dir)
    teacher, _ = load_causal_lm(teacher_dir)
    return student, teacher, tokenizer


@pytest.fixture(scope="module")
def encoded(models):
    _, _, tokenizer = models
    return encode(tokenizer, EXAMPLES, max_length=SETTINGS.max_length)


def live_logits(model, item) -> tuple[torch.Tensor, torch.Tensor]:
    """One example alone, no padding: (logits at the positions that predict a response token,
    the gold tokens there)."""
    labels = torch.tensor(item.labels)
    selected = labels[1:] != IGNORE_INDEX
    with torch.no_grad():
        logits = model(torch.tensor([item.input_ids])).logits[0, :-1][selected]
    return logits, labels[1:][selected]


def full_kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, *, t: float, alpha: float
):
    """The textbook loss over the whole vocabulary, summed: what top_k = vocab must equal."""
    kl = F.kl_div(
        F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="sum"
    )
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, targets, reduction="sum")


def mean_kl(model_dir: Path, teacher, encoded) -> float:
    """Mean KL(teacher || model) per response token at temperature 1, over the training examples."""
    model, _ = load_causal_lm(model_dir)
    total, count = 0.0, 0
    for item in encoded:
        s, _ = live_logits(model, item)
        t, _ = live_logits(teacher, item)
        total += float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum"))
        count += len(s)
    return total / count


# --------------------------------------------------------------------------------------------
# The loss


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def test_the_loss_matches_a_hand_computation() -> None:
    student = torch.tensor(
        [[1.0, 0.5, -1.0, 2.0, 0.0], [0.2, -0.3, 1.5, 0.0, 0.7], [-1.0, 0.0, 0.3, 0.1, 2.2]]
    )
    targets = torch.tensor([3, 2, 0])
    teacher = torch.tensor(
        [[0.4, -1.0, 0.1, 2.5, 1.0], [-0.2, 0.3, 1.0, 0.0, 0.8], [0.0, -0.5, 1.1, 0.2, 3.0]]
    )
    teacher_ids = torch.tensor([[3, 4], [2, 4], [4, 2]], dtype=torch.int32)  # its top 2 per row
    t, alpha = 2.0, 0.3

    kl, ce = 0.0, 0.0
    for row in range(3):
        q = softmax([v / t for v in student[row].tolist()])  # the student over the whole vocabulary
        p = softmax([v / t for v in teacher[row].tolist()])  # the teacher over the whole vocabulary
        ids = teacher_ids[row].tolist()
        rest_p = 1 - sum(p[j] for j in ids)  # every other token is one outcome
        rest_q = 1 - sum(q[j] for j in ids)
        kl += sum(p[j] * (math.log(p[j]) - math.log(q[j])) for j in ids)
        kl += rest_p * (math.log(rest_p) - math.log(rest_q))
        ce -= math.log(softmax(student[row].tolist())[int(targets[row])])
    teacher_log_probs = F.log_softmax(teacher / t, -1).gather(1, teacher_ids.long())
    loss = distillation_loss_sum(student, targets, teacher_ids, teacher_log_probs, temperature=t, alpha=alpha)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(alpha * t * t * kl + (1 - alpha) * ce, rel=1e-6)
    # T^2 scaling: with alpha = 1 the loss is T^2 = 4 times the KL at T = 2.
    pure = distillation_loss_sum(student, targets, teacher_ids, teacher_log_probs, temperature=t, alpha=1.0)
    assert float(pure) == pytest.approx(4 * kl, rel=1e-6)
    # alpha = 0 is exactly the summed cross-entropy.
    plain = distillation_loss_sum(student, targets, teacher_ids, teacher_log_probs, temperature=t, alpha=0.0)
    assert torch.equal(plain, F.cross_entropy(student, targets, reduction="sum"))


def test_a_student_that_matches_the_teacher_has_no_distillation_loss() -> None:
    """The rest bucket is what makes this hold with k < V: renormalising the teacher over its k
    tokens would still push a perfect student towards putting all its mass on them."""
    torch.manual_seed(2)
    teacher = torch.randn(6, 50) * 0.5  # flat: much of the mass lies outside the top 4
    targets = torch.randint(0, 50, (6,))
    for t in (1.0, 4.0):
        log_p = F.log_softmax(teacher / t, -1)
        log_probs, ids = log_p.topk(4, dim=-1)
        assert float(log_probs.exp().sum(-1).max()) < 0.5
        student = teacher.clone().requires_grad_(True)
        loss = distillation_loss_sum(student, targets, ids, log_probs, temperature=t, alpha=1.0)
        assert abs(float(loss.detach())) < 1e-5
        loss.backward()
        assert float(student.grad.abs().max()) < 1e-5
        # Anything else costs something.
        other = distillation_loss_sum(teacher.roll(1, 0), targets, ids, log_probs, temperature=t, alpha=1.0)
        assert float(other) > 0.1


def test_ignored_positions_never_count() -> None:
    torch.manual_seed(0)
    student = torch.randn(4, 7)
    teacher = torch.randn(4, 7)
    values, ids = F.log_softmax(teacher / 3.0, -1).topk(3, dim=-1)
    targets = torch.tensor([1, IGNORE_INDEX, 5, IGNORE_INDEX])
    kept = [0, 2]
    loss = distillation_loss_sum(student, targets, ids, values, temperature=3.0, alpha=0.6)
    only_kept = distillation_loss_sum(
        student[kept], targets[kept], ids[kept], values[kept], temperature=3.0, alpha=0.6
    )
    assert float(loss) == pytest.approx(float(only_kept), rel=1e-6)
    # Whatever sits at an ignored position changes nothing, gradients included.
    other = student.clone()
    other[[1, 3]] = 100.0 * torch.randn(2, 7)
    other.requires_grad_(True)
    moved = distillation_loss_sum(other, targets, ids, values, temperature=3.0, alpha=0.6)
    assert float(moved.detach()) == pytest.approx(float(loss), rel=1e-6)
    moved.backward()
    assert other.grad is not None and torch.all(other.grad[[1, 3]] == 0)


def test_with_every_token_it_is_the_full_kl_divergence() -> None:
    torch.manual_seed(1)
    student, teacher = torch.randn(5, 11) * 2, torch.randn(5, 11) * 2
    targets = torch.randint(0, 11, (5,))
    for t, alpha in ((1.0, 1.0), (4.0, 1.0), (2.0, 0.5)):
        values, ids = F.log_softmax(teacher / t, -1).topk(11, dim=-1)
        ours = distillation_loss_sum(student, targets, ids, values, temperature=t, alpha=alpha)
        assert float(ours) == pytest.approx(
            float(full_kd_loss(student, teacher, targets, t=t, alpha=alpha)), rel=1e-5
        )


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="temperature"):
        Distillation(Path("t"), temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        Distillation(Path("t"), alpha=1.5)
    with pytest.raises(ValueError, match="top_k"):
        Distillation(Path("t"), top_k=0)
    assert Distillation("t").teacher_dir == Path("t")  # type: ignore[arg-type]
    # A history point from a checkpoint written before distill_loss existed still loads.
    point = TrainPoint(1, 2, 0.5, 1.0, None, 10, 5.0, 2.0, 2.0)
    assert point.distill_loss is None


# --------------------------------------------------------------------------------------------
# The teacher's cached log-probabilities


def test_the_cache_holds_the_teachers_log_probs_at_the_learned_positions(models, encoded) -> None:
    student, teacher, _ = models
    vocab = teacher.config.vocab_size
    # Batched and padded here, one example at a time below: the same rows.
    every = teacher_topk(teacher, encoded, top_k=vocab, temperature=4.0, batch_tokens=256)
    few = teacher_topk(teacher, encoded, top_k=16, temperature=4.0, batch_tokens=256)
    for item, (ids, values), (few_ids, few_values) in zip(encoded, every, few, strict=True):
        live, targets = live_logits(teacher, item)
        live_log_p = F.log_softmax(live / 4.0, -1)
        assert ids.shape == values.shape == (item.response_tokens, vocab)
        assert ids.dtype == torch.int32 and values.dtype == torch.float32
        assert torch.allclose(values, live_log_p.gather(1, ids.long()), atol=1e-5)
        # A smaller k keeps the teacher's true top-k tokens, most likely first, still normalised
        # over the whole vocabulary (not over the k).
        assert torch.equal(few_ids.long(), live.topk(16, dim=-1).indices)
        assert torch.allclose(few_values, live_log_p.topk(16, dim=-1).values, atol=1e-5)
        assert float(few_values.exp().sum(-1).max()) < 1.0

        # The loss from the cache is the loss from the live teacher.
        s, _ = live_logits(student, item)
        cached = distillation_loss_sum(s, targets, ids, values, temperature=4.0, alpha=0.5)
        assert float(cached) == pytest.approx(
            float(full_kd_loss(s, live, targets, t=4.0, alpha=0.5)), rel=1e-5
        )


def test_a_larger_top_k_comes_closer_to_the_full_loss(models, encoded) -> None:
    """A random tiny model's distribution is flat, so a few tokens hold little of its mass; real
    models are far more peaked. What must hold everywhere: more tokens, closer."""
    student, teacher, _ = models
    gaps = []
    exact = None
    for k in (16, 64, 256, teacher.config.vocab_size):
        total = 0.0
        for item, (ids, values) in zip(encoded, teacher_topk(teacher, encoded, top_k=k), strict=True):
            s, targets = live_logits(student, item)
            total += float(distillation_loss_sum(s, targets, ids, values, temperature=1.0, alpha=1.0))
        exact = total
        gaps.append(total)
    gaps = [abs(g - exact) / exact for g in gaps]
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] == 0
    assert gaps[2] < 0.02


def test_the_first_step_trains_on_the_teachers_logits_however_the_step_is_split(
    models, encoded, student_dir: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    """The loop's first step (the adapter starts as a no-op) against the live teacher and student:
    the cached rows line up with the student's positions, also when micro-batches reorder rows."""
    import training.ml.lora as lora

    student, teacher, _ = models
    distill = Distillation(teacher_dir, temperature=2.0, alpha=0.5, top_k=teacher.config.vocab_size)
    settings = LoraSettings(rank=4, max_steps=1, batch_tokens=1024, max_length=128, precision="float32")
    batch = length_buckets(encoded, batch_tokens=settings.batch_tokens, seed=settings.seed, epoch=0)[0]
    assert len(batch) > 1
    total = 0.0
    for index in batch:
        s, targets = live_logits(student, encoded[index])
        t, _ = live_logits(teacher, encoded[index])
        total += float(full_kd_loss(s, t, targets, t=2.0, alpha=0.5))
    expected = total / sum(encoded[i].response_tokens for i in batch)

    whole = train_lora(student_dir, EXAMPLES, [], tmp_path / "whole", settings, distill=distill)
    tight = lora.ACTIVATION_SHARE
    try:
        lora.ACTIVATION_SHARE = 1e-12  # one row per pass, taken shortest first
        split = train_lora(student_dir, EXAMPLES, [], tmp_path / "split", settings, distill=distill)
    finally:
        lora.ACTIVATION_SHARE = tight
    assert whole.history[0].train_loss == pytest.approx(expected, rel=1e-5)
    assert split.history[0].train_loss == pytest.approx(expected, rel=1e-5)
    assert whole.history[0].distill_loss is not None


# --------------------------------------------------------------------------------------------
# The loop


def test_the_student_moves_towards_the_teacher_which_runs_once(
    models, encoded, student_dir: Path, teacher_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import training.ml.lora as lora

    _, teacher, _ = models
    calls = {"teacher": 0}
    original = lora.teacher_topk

    def counting(*args, **kwargs):
        calls["teacher"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(lora, "teacher_topk", counting)
    distill = Distillation(teacher_dir, temperature=2.0, alpha=0.8, top_k=64)
    cache = tmp_path / TEACHER_CACHE

    # 1. A stop while the teacher runs: nothing is cached, the run can start again.
    with pytest.raises(TrainingStopped):
        train_lora(student_dir, EXAMPLES, [], tmp_path, SETTINGS, distill=distill, should_stop=lambda: True)
    assert not cache.exists()

    # 2. Stopped after step 10: the teacher ran once and its logits are cached.
    stop = {"now": False}

    def request_stop(point: TrainPoint) -> None:
        stop["now"] = point.step == 10

    with pytest.raises(TrainingStopped) as stopped:
        train_lora(
            student_dir, EXAMPLES, [], tmp_path, SETTINGS, distill=distill,
            on_point=request_stop, should_stop=lambda: stop["now"],
        )  # fmt: skip
    assert stopped.value.step == 10
    assert calls["teacher"] == 2 and cache.is_file()
    written = cache.stat().st_mtime_ns

    # 3. Resumed: the cache is read, the teacher does not run again.
    result = train_lora(student_dir, EXAMPLES, [], tmp_path, SETTINGS, distill=distill)
    assert result.resumed_from == 10 and result.steps == SETTINGS.max_steps
    assert calls["teacher"] == 2 and cache.stat().st_mtime_ns == written
    assert all(p.distill_loss is not None for p in result.history)
    before, after = mean_kl(student_dir, teacher, encoded), mean_kl(result.merged_dir, teacher, encoded)
    assert after < 0.8 * before

    # 4. Other distillation settings do not continue this run's checkpoint.
    other = Distillation(teacher_dir, temperature=1.0, alpha=0.8, top_k=64)
    with pytest.raises(ValueError, match="other data, model or settings"):
        train_lora(student_dir, EXAMPLES, [], tmp_path, SETTINGS, distill=other)


def test_a_teacher_with_another_vocabulary_is_refused(student_dir: Path, tmp_path: Path) -> None:
    teacher = make_tiny_llama(tmp_path / "teacher", seed=1)
    make_tokenizer(teacher, vocab_size=300)  # the same model files with another tokenizer
    with pytest.raises(ValueError, match="logit distillation needs a teacher with the student's tokenizer"):
        train_lora(student_dir, EXAMPLES, [], tmp_path / "run", SETTINGS, distill=Distillation(teacher))
    assert not (tmp_path / "run" / TEACHER_CACHE).exists()


# --------------------------------------------------------------------------------------------
# Full fine-tuning


def test_a_full_fine_tune_trains_every_weight_and_resumes_to_the_same_model(
    student_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    settings = LoraSettings(
        full_finetune=True, learning_rate=1e-3, epochs=100, max_steps=8, batch_tokens=256, checkpoint_every=4,
        precision="float32",
    )  # fmt: skip
    unbroken = train_lora(student_dir, EXAMPLES, EXAMPLES[:2], tmp_path / "unbroken", settings)
    assert unbroken.adapter_dir is None and not (tmp_path / "unbroken" / "adapter").exists()
    assert unbroken.eval_loss < unbroken.base_eval_loss
    base = load_file(str(student_dir / "model.safetensors"))
    trained = load_file(str(unbroken.merged_dir / "model.safetensors"))
    assert trained.keys() == base.keys()
    assert all(trained[name].dtype == torch.float32 for name in trained)
    assert all(not torch.equal(trained[name], base[name]) for name in base)  # norms and embeddings too
    model = AutoModelForCausalLM.from_pretrained(unbroken.merged_dir, dtype=torch.float32)
    assert (
        model.config.tie_word_embeddings
        and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    assert "full fine-tune" in (unbroken.merged_dir / "README.md").read_text()

    stop = {"now": False}

    def request_stop(point: TrainPoint) -> None:
        stop["now"] = point.step == 6

    work = tmp_path / "broken"
    with pytest.raises(TrainingStopped) as stopped:
        train_lora(
            student_dir, EXAMPLES, EXAMPLES[:2], work, settings, on_point=request_stop,
            should_stop=lambda: stop["now"],
        )  # fmt: skip
    # Every weight is in the checkpoint: the tied output layer once, under the embeddings' name.
    saved = load_file(str(stopped.value.checkpoint / "trainable.safetensors"))
    assert saved.keys() == base.keys()
    resumed = train_lora(student_dir, EXAMPLES, EXAMPLES[:2], work, settings)
    assert resumed.resumed_from == 6 and resumed.adapter_dir is None
    assert [p.train_loss for p in resumed.history] == [p.train_loss for p in unbroken.history]
    ours = load_file(str(resumed.merged_dir / "model.safetensors"))
    assert all(torch.equal(ours[name], trained[name]) for name in trained)
