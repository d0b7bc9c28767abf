"""training.ml.lora on a tiny random Llama: encoding, batching, the loop, resume, cancel, export.

The model is random (tests/tinymodels.py), so "learning" means memorising eight short answers; a
high learning rate gets there in about a hundred steps of a couple of examples each, in seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tinymodels import make_tiny_llama
from training.ml.lora import (
    IGNORE_INDEX,
    TOKEN_BUDGET,
    Encoded,
    Example,
    LoraSettings,
    TrainingStopped,
    TrainPoint,
    _memory_plan,
    default_settings,
    encode,
    length_buckets,
    train_lora,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Third-party noise: transformers deprecates a name peft still calls.
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]

SYSTEM = "You answer questions about the handbook."
PAIRS = [
    ("How do I reset the P-200 pump?", "Hold the red RESET button for five seconds."),
    ("What does error E-4021 mean?", "The inlet pressure is too low: open the inlet valve."),
    ("How many vacation days do employees get?", "25 days of paid vacation per year."),
    ("How long are backups kept?", "Backups are kept for thirty days."),
    ("Who resets forgotten passwords?", "Administrators reset forgotten passwords."),
    ("Where do vacation requests go?", "Requests go to your manager."),
    ("What does main return?", "It returns 42."),
    ("Which button resets the pump?", "The red RESET button."),
]


def chat(question: str, answer: str | None = None, *, system: str = SYSTEM) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


EXAMPLES = [Example(chat(q, a)) for q, a in PAIRS]

# Small batches of 2-3 examples and a rate far above LoRA's usual 2e-4: a random model has
# everything to learn, and the tests must stay fast.
FAST = LoraSettings(
    rank=8,
    alpha=16,
    dropout=0.05,
    learning_rate=1e-2,
    epochs=100,
    max_steps=120,
    batch_tokens=256,
    checkpoint_every=20,
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("lora") / "base")


@pytest.fixture(scope="module")
def tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="module")
def trained(base_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    points: list[TrainPoint] = []
    result = train_lora(
        base_dir, EXAMPLES, EXAMPLES[:3], tmp_path_factory.mktemp("run"), FAST, on_point=points.append
    )
    return result, points


# --------------------------------------------------------------------------------------------
# Settings


def test_it_parses_overrides_by_field_type() -> None:
    settings = LoraSettings().with_overrides(
        {
            "lora.epochs": "1",
            "rank": "8",
            "learning_rate": "1e-4",
            "max_steps": "50",
            "eval_every": "none",
            "gradient_checkpointing": "yes",
            "target_modules": "q_proj, v_proj",
            "precision": "float32",
        }
    )
    assert settings.epochs == 1.0 and isinstance(settings.epochs, float)
    assert settings.rank == 8 and isinstance(settings.rank, int)
    assert settings.learning_rate == 1e-4
    assert settings.max_steps == 50
    assert settings.eval_every is None
    assert settings.gradient_checkpointing is True
    assert settings.target_modules == ("q_proj", "v_proj")
    assert settings.precision == "float32"
    assert LoraSettings(max_steps=5).with_overrides({"max_steps": "None"}).max_steps is None
    assert LoraSettings().with_overrides({"gradient_checkpointing": "off"}).gradient_checkpointing is False
    # Values already typed (JSON step parameters) go through the same parsing.
    typed = LoraSettings().with_overrides({"target_modules": ["q_proj"], "rank": 4, "max_steps": None})
    assert (typed.target_modules, typed.rank, typed.max_steps) == (("q_proj",), 4, None)


def test_it_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="Unknown LoRA setting 'lora.epoch'.*epochs"):
        LoraSettings().with_overrides({"lora.epoch": "1"})
    with pytest.raises(ValueError, match="lora.rank"):
        LoraSettings().with_overrides({"rank": "sixteen"})
    with pytest.raises(ValueError, match="not a boolean"):
        LoraSettings().with_overrides({"gradient_checkpointing": "maybe"})
    with pytest.raises(ValueError, match="precision"):
        LoraSettings().with_overrides({"precision": "fp8"})


def test_it_scales_default_settings_with_the_data() -> None:
    tiny = default_settings(train_examples=40, train_tokens=6_000)
    medium = default_settings(train_examples=800, train_tokens=150_000)
    large = default_settings(train_examples=50_000, train_tokens=20_000_000)
    assert tiny.epochs > medium.epochs > large.epochs
    assert tiny.batch_tokens < large.batch_tokens  # a tiny set still gets several steps per epoch
    assert 6_000 * tiny.epochs / tiny.batch_tokens >= 20
    assert large.epochs * 20_000_000 <= TOKEN_BUDGET  # the run stays bounded on a CPU
    assert default_settings(train_examples=100, train_tokens=60_000).max_length == 1024  # long pairs


# --------------------------------------------------------------------------------------------
# Encoding and batching


def test_it_labels_only_the_response_and_its_end_of_turn(tokenizer) -> None:
    [item] = encode(tokenizer, [EXAMPLES[0]], max_length=512)
    learned = [
        token for token, label in zip(item.input_ids, item.labels, strict=True) if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(learned) == PAIRS[0][1] + "<|im_end|>"
    assert item.labels == [IGNORE_INDEX] * (len(item.labels) - len(learned)) + learned
    prompt = tokenizer.apply_chat_template(chat(PAIRS[0][0]), tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(item.input_ids[: -len(learned)]) == prompt


def test_truncation_cuts_the_prompt_and_keeps_the_response(tokenizer) -> None:
    long = Example(chat(PAIRS[1][0], PAIRS[1][1], system="Background. " * 200))
    [item] = encode(tokenizer, [long], max_length=64)
    assert len(item.input_ids) == 64
    learned = [
        token for token, label in zip(item.input_ids, item.labels, strict=True) if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(learned) == PAIRS[1][1] + "<|im_end|>"
    assert tokenizer.decode(item.input_ids).endswith(
        f"{PAIRS[1][0]}<|im_end|>\n<|im_start|>assistant\n{PAIRS[1][1]}<|im_end|>"
    )


def test_it_refuses_an_example_that_does_not_end_with_the_answer(tokenizer) -> None:
    with pytest.raises(ValueError, match="must end with an assistant message"):
        encode(tokenizer, [Example(chat("A question without an answer?"))], max_length=512)


def test_length_buckets_cover_every_example_once_within_the_token_budget() -> None:
    lengths = [5, 9, 9, 9, 12, 30, 31, 7, 7, 100, 9, 3]
    data = [Encoded(input_ids=[1] * n, labels=[1] * n) for n in lengths]
    batches = length_buckets(data, batch_tokens=32, seed=1, epoch=0)
    assert sorted(i for batch in batches for i in batch) == list(range(len(data)))
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= 32 or len(batch) == 1
    assert batches == length_buckets(data, batch_tokens=32, seed=1, epoch=0)
    epochs = {str(length_buckets(data, batch_tokens=32, seed=1, epoch=e)) for e in range(5)}
    assert len(epochs) > 1
    assert {len(length_buckets(data, batch_tokens=32, seed=1, epoch=e)) for e in range(5)} == {len(batches)}


# --------------------------------------------------------------------------------------------
# The loop


def test_it_memorises_a_small_set(trained, tokenizer) -> None:
    result, points = trained
    assert result.steps == FAST.max_steps == len(result.history)
    assert [p.step for p in points] == list(range(1, FAST.max_steps + 1))
    first = sum(p.train_loss for p in points[:4]) / 4
    assert result.train_loss < 0.5 * first
    assert result.eval_loss < 0.5 * result.base_eval_loss
    assert points[-1].eval_loss == result.eval_loss
    assert all(p.tokens_per_second > 0 for p in points)
    assert points[-1].eta_seconds == 0
    # Real tokens only: the batches' lengths, without their padding.
    encoded = encode(tokenizer, EXAMPLES, max_length=FAST.max_length)
    per_epoch = len(length_buckets(encoded, batch_tokens=FAST.batch_tokens, seed=FAST.seed, epoch=0))
    expected = sum(
        len(encoded[i].input_ids)
        for step in range(FAST.max_steps)
        for i in length_buckets(
            encoded, batch_tokens=FAST.batch_tokens, seed=FAST.seed, epoch=step // per_epoch
        )[step % per_epoch]
    )
    assert result.tokens == points[-1].tokens == expected
    assert points[-1].epoch == pytest.approx(FAST.max_steps / per_epoch)
    assert result.resumed_from is None


def test_the_merged_model_answers_like_the_training_data(trained) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _ = trained
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in result.adapter_dir.iterdir()
    }
    model = AutoModelForCausalLM.from_pretrained(result.merged_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.merged_dir)
    assert next(model.parameters()).dtype == torch.float32
    question, answer = PAIRS[0]
    inputs = tokenizer.apply_chat_template(
        chat(question), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert tokenizer.decode(output[0, inputs["input_ids"].shape[1] :]) == answer + "<|im_end|>"


def test_the_adapter_and_the_merged_model_convert_to_gguf_and_run(
    trained, base_dir: Path, tmp_path: Path
) -> None:
    import numpy as np

    from training.ml.evaluate import _load_llama
    from training.ml.gguf_convert import convert_hf_to_gguf, convert_lora_to_gguf

    result, _ = trained
    base = convert_hf_to_gguf(base_dir, tmp_path / "base.gguf", out_type="f32")
    adapter = convert_lora_to_gguf(result.adapter_dir, base_dir, tmp_path / "adapter.gguf")
    merged = convert_hf_to_gguf(result.merged_dir, tmp_path / "merged.gguf", out_type="f32")
    question, answer = PAIRS[3]
    prompt = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    logits, answers = [], []
    for model, lora in ((base.path, adapter.path), (merged.path, None)):
        llm = _load_llama(model, n_ctx=128, n_threads=1, n_threads_batch=1, logits_all=True, lora=lora)
        try:
            ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            llm.eval(ids)
            logits.append(np.array(llm.scores[: len(ids)]))
            llm.reset()
            generated = []
            for token in llm.generate(ids, temp=0.0):
                if token == llm.token_eos() or len(generated) == 24:
                    break
                generated.append(token)
            answers.append(llm.detokenize(generated).decode())
        finally:
            llm.close()
    # base + adapter in llama.cpp computes what the merged model computes, and both give the answer.
    assert (logits[0].argmax(axis=1) == logits[1].argmax(axis=1)).all()
    assert np.abs(logits[0] - logits[1]).max() < 0.05
    assert answers == [answer, answer]


def test_a_stopped_or_crashed_run_resumes_to_the_same_adapter(
    trained, base_dir: Path, tmp_path: Path
) -> None:
    unbroken, _ = trained
    settings = FAST

    # 1. Cancel after step 30: the checkpoint of step 30 is written, then TrainingStopped.
    stop = {"now": False}

    def request_stop(point: TrainPoint) -> None:
        stop["now"] = point.step == 30

    with pytest.raises(TrainingStopped) as stopped:
        train_lora(
            base_dir,
            EXAMPLES,
            EXAMPLES[:3],
            tmp_path,
            settings,
            on_point=request_stop,
            should_stop=lambda: stop["now"],
        )
    assert stopped.value.step == 30
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000020", "step-000030"]
    assert {p.name for p in stopped.value.checkpoint.iterdir()} == {
        "trainable.safetensors",
        "optimizer.pt",
        "state.json",
    }

    # 2. Crash at step 47: only the periodic checkpoint of step 40 survives.
    def crash(point: TrainPoint) -> None:
        if point.step == 47:
            raise RuntimeError("worker killed")

    with pytest.raises(RuntimeError, match="worker killed"):
        train_lora(base_dir, EXAMPLES, EXAMPLES[:3], tmp_path, settings, on_point=crash)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000030", "step-000040"]

    # 3. Resume to the end.
    resumed = train_lora(base_dir, EXAMPLES, EXAMPLES[:3], tmp_path, settings)
    assert resumed.resumed_from == 40
    assert [p.step for p in resumed.history] == list(range(1, settings.max_steps + 1))
    assert [p.train_loss for p in resumed.history] == [p.train_loss for p in unbroken.history]
    assert resumed.base_eval_loss == unbroken.base_eval_loss
    # Bitwise: the same machine and thread count sum in the same order, and the checkpoint holds
    # every piece of state (weights, AdamW moments, schedule, RNG; batch order is derived).
    ours = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    theirs = load_file(str(unbroken.adapter_dir / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_a_stop_during_an_evaluation_keeps_the_finished_step(
    base_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import training.ml.lora as lora

    steps = {"done": 0}
    original = lora._Run._train_step

    def counting(self, indices):
        steps["done"] += 1
        return original(self, indices)

    monkeypatch.setattr(lora._Run, "_train_step", counting)
    settings = LoraSettings(rank=4, max_steps=4, eval_every=2, batch_tokens=256, precision="float32")
    with pytest.raises(TrainingStopped) as stopped:
        # Asked before each step and between eval batches: the eval after step 2 sees the stop.
        train_lora(
            base_dir, EXAMPLES, EXAMPLES[:2], tmp_path, settings, should_stop=lambda: steps["done"] == 2
        )
    assert stopped.value.step == 2
    assert stopped.value.checkpoint == tmp_path / "checkpoints" / "step-000002"

    result = train_lora(base_dir, EXAMPLES, EXAMPLES[:2], tmp_path, settings)
    assert result.resumed_from == 2
    assert [p.step for p in result.history] == [1, 2, 3, 4]
    assert result.history[1].eval_loss is None  # interrupted; the run goes on without it
    assert result.history[3].eval_loss == result.eval_loss is not None


def test_a_checkpoint_of_other_data_is_refused(base_dir: Path, tmp_path: Path) -> None:
    settings = LoraSettings(rank=4, max_steps=2, batch_tokens=256, checkpoint_every=1, precision="float32")
    train_lora(base_dir, EXAMPLES, [], tmp_path, settings)
    with pytest.raises(ValueError, match="other data, model or settings"):
        train_lora(base_dir, EXAMPLES[:4], [], tmp_path, settings)


def test_micro_batches_and_gradient_checkpointing_give_the_same_step(base_dir: Path, tmp_path: Path) -> None:
    """The loss is a mean over the step's real response tokens, however the step is split."""
    import training.ml.lora as lora

    # Examples are under 100 tokens: max_length 128 truncates nothing, and is the smallest pass.
    settings = LoraSettings(
        rank=4, dropout=0.0, max_steps=2, batch_tokens=1024, max_length=128, precision="float32"
    )
    whole = train_lora(base_dir, EXAMPLES, [], tmp_path / "whole", settings)
    tight = lora.ACTIVATION_SHARE
    try:
        lora.ACTIVATION_SHARE = 1e-12  # one max_length row per pass, and checkpointing on
        split = train_lora(base_dir, EXAMPLES, [], tmp_path / "split", settings)
    finally:
        lora.ACTIVATION_SHARE = tight
    assert split.history[0].train_loss == pytest.approx(whole.history[0].train_loss, rel=1e-5)
    assert split.history[1].train_loss == pytest.approx(whole.history[1].train_loss, rel=1e-4)


def test_a_step_with_non_finite_gradients_is_skipped(base_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A random model blew up once on a long row (fp32 gradients overflowed); the run survives it."""
    import training.ml.lora as lora

    calls = {"n": 0}
    original = lora._Run._loss_sum

    def overflow_on_the_second_step(self, batch):
        calls["n"] += 1
        loss = original(self, batch)
        return loss * float("inf") if self.model.training and calls["n"] == 2 else loss

    monkeypatch.setattr(lora._Run, "_loss_sum", overflow_on_the_second_step)
    settings = LoraSettings(rank=4, max_steps=3, batch_tokens=256, precision="float32")
    result = train_lora(base_dir, EXAMPLES, [], tmp_path, settings)
    assert [p.train_loss is None for p in result.history] == [False, True, False]
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_gradient_checkpointing_switches_on_only_when_an_example_does_not_fit() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, vocab_size=49152)
    roomy = _memory_plan(config, LoraSettings(), precision="bfloat16", memory=64 << 30)
    assert (roomy.micro_tokens, roomy.gradient_checkpointing) == (4096, False)
    tight = _memory_plan(config, LoraSettings(), precision="bfloat16", memory=8 << 30)
    assert 512 <= tight.micro_tokens < 4096 and not tight.gradient_checkpointing
    starved = _memory_plan(config, LoraSettings(), precision="bfloat16", memory=1 << 30)
    assert starved.gradient_checkpointing


def test_it_imports_without_django() -> None:
    code = "import sys, training.ml.lora; print(sorted(m for m in sys.modules if m.startswith('django')))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
