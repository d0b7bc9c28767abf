"""Pruning (training/ml/prune.py) on hand-made matrices and tiny random Llamas: Wanda's mask,
sparsity per row and per matrix, N:M patterns, the calibration sampler, and structured pruning that
transformers and llama.cpp both load and agree on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tinymodels import TRAINING_TEXT, make_tiny_llama
from tests.training.test_gguf import hf_logits, llama_logits
from training.ml import base_models, gguf_convert, prune
from training.ml.prune import PruneSettings


def test_wanda_mask_matches_a_hand_computed_example():
    # |W| * ||X_j||: column norms 1, 10, 2, 5 change which weight of each row is smallest.
    weight = torch.tensor([[1.0, -0.2, 3.0, 0.5], [-4.0, 0.1, 0.3, 2.0]])
    sq_norms = torch.tensor([1.0, 100.0, 4.0, 25.0])
    scores = prune.wanda_scores(weight, sq_norms)
    # row 0: 1, 2, 6, 2.5 → the two lowest are columns 0 and 1; row 1: 4, 1, 0.6, 10 → columns 1, 2
    assert torch.allclose(scores, torch.tensor([[1.0, 2.0, 6.0, 2.5], [4.0, 1.0, 0.6, 10.0]]))
    mask = prune.prune_mask(weight, PruneSettings(method="wanda", sparsity=0.5), sq_norms)
    assert mask.tolist() == [[True, True, False, False], [False, True, True, False]]
    # Magnitude alone would zero -0.2, 0.1 and the next lowest of the whole matrix (0.3, 0.5).
    magnitude = prune.prune_mask(weight, PruneSettings(method="magnitude", sparsity=0.5), None)
    assert magnitude.tolist() == [[False, True, False, True], [False, True, True, False]]


def test_wanda_zeroes_the_same_count_in_every_row_and_magnitude_over_the_matrix():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 40, generator=generator)
    weight[0] *= 10  # one row of large weights: magnitude spares it, Wanda does not
    norms = torch.rand(40, generator=generator) + 0.1
    wanda = prune.prune_mask(weight, PruneSettings(method="wanda", sparsity=0.3), norms)
    assert wanda.sum(dim=1).tolist() == [12] * 16  # int(40 * 0.3) per row
    magnitude = prune.prune_mask(weight, PruneSettings(method="magnitude", sparsity=0.3), None)
    assert int(magnitude.sum()) == int(16 * 40 * 0.3)
    assert int(magnitude[0].sum()) < 12


@pytest.mark.parametrize(
    ("method", "n", "m"), [("wanda_2_4", 2, 4), ("wanda_4_8", 4, 8), ("magnitude_2_4", 2, 4)]
)
def test_n_m_pattern_has_exactly_n_zeros_in_every_group(method: str, n: int, m: int):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 34, generator=generator)  # 34: two columns past the last full group
    norms = torch.rand(34, generator=generator) + 0.1
    settings = PruneSettings(method=method)
    assert settings.pattern == (n, m) and settings.effective_sparsity == n / m
    mask = prune.prune_mask(weight, settings, norms if settings.scoring == "wanda" else None)
    groups = mask[:, :32].reshape(8, 32 // m, m)
    assert (groups.sum(dim=-1) == n).all()
    assert not mask[:, 32:].any()
    # The zeros are the lowest scores of each group.
    scores = prune.wanda_scores(weight, norms) if settings.scoring == "wanda" else weight.abs()
    grouped = scores[:, :32].reshape(8, -1, m)
    kept_min = grouped.masked_fill(groups, float("inf")).min(dim=-1).values
    zeroed_max = grouped.masked_fill(~groups, float("-inf")).max(dim=-1).values
    assert (zeroed_max <= kept_min).all()


def test_settings_are_checked():
    with pytest.raises(prune.PruneError, match="Unknown pruning method"):
        PruneSettings(method="sparsegpt")
    with pytest.raises(prune.PruneError, match="0 < N < M"):
        PruneSettings(method="wanda_4_4")
    with pytest.raises(prune.PruneError, match="up to"):
        PruneSettings(method="wanda", sparsity=1.0)
    with pytest.raises(prune.PruneError, match="Unknown pruning setting"):
        PruneSettings.from_strings({"ratio": "0.5"})
    assert PruneSettings.from_strings({"method": "Structured", "target": "0.7"}).target == 0.7


def test_calibration_windows_are_seeded_disjoint_and_equal_in_length():
    stream = list(range(1000))
    windows = prune.calibration_windows(stream, samples=5, length=64, seed=3)
    assert len(windows) == 5 and {len(w) for w in windows} == {64}
    starts = [w[0] for w in windows]
    assert starts == sorted(starts) and all(s % 64 == 0 for s in starts)  # whole slots, in order
    assert len({t for w in windows for t in w}) == 5 * 64  # no token twice
    assert windows == prune.calibration_windows(stream, samples=5, length=64, seed=3)
    assert windows != prune.calibration_windows(stream, samples=5, length=64, seed=4)
    # Fewer slots than asked: all of them. Shorter than one window: the stream itself.
    assert len(prune.calibration_windows(stream, samples=100, length=64, seed=0)) == 1000 // 64
    assert prune.calibration_windows(list(range(10)), samples=4, length=64, seed=0) == [list(range(10))]
    assert prune.calibration_windows([], samples=4, length=64, seed=0) == []


def test_calibration_from_texts_joins_with_end_of_sequence(tmp_path: Path):
    model_dir = make_tiny_llama(tmp_path / "tiny")
    _, tokenizer = base_models.load_causal_lm(model_dir)
    windows = prune.calibration_from_texts(tokenizer, TRAINING_TEXT * 5, samples=4, length=16, seed=0)
    assert len(windows) == 4 and all(len(w) == 16 for w in windows)
    stream: list[int] = []
    for text in TRAINING_TEXT * 5:  # read until there are 4x the tokens the windows need
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= 4 * 4 * 16:
            break
    assert windows == prune.calibration_windows(stream, samples=4, length=16, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 6 query heads over 2 KV heads (3 per group), 4 layers: room for every kind of structure.
    return make_tiny_llama(
        tmp_path_factory.mktemp("prune") / "tiny", hidden=96, heads=6, kv_heads=2, intermediate=256, layers=4
    )


@pytest.fixture(scope="module")
def windows(tiny: Path) -> list[list[int]]:
    _, tokenizer = base_models.load_causal_lm(tiny)
    return prune.calibration_from_texts(tokenizer, TRAINING_TEXT * 20, samples=8, length=32, seed=0)


def _linear_weights(model) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return [
        m.weight for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)
    ]


@pytest.mark.parametrize("method", ["wanda", "magnitude", "wanda_2_4"])
def test_unstructured_pruning_reaches_the_sparsity_and_leaves_embeddings(tiny: Path, windows, method: str):  # type: ignore[no-untyped-def]
    model, _ = base_models.load_causal_lm(tiny)
    embeddings = model.model.embed_tokens.weight.clone()
    result = prune.prune_unstructured(model, PruneSettings(method=method, sparsity=0.5), windows)
    for weight in _linear_weights(model):
        zeros = (weight == 0).float()
        if method == "wanda":
            assert (zeros.sum(dim=1) == weight.shape[1] // 2).all()
        else:
            assert abs(float(zeros.mean()) - 0.5) < 1e-3
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert abs(result.sparsity - 0.5) < 1e-3 and not result.shrinks_file
    assert result.parameters_after == result.parameters_before
    assert result.nonzero_after < result.nonzero_before
    assert result.calibration_tokens == (0 if method == "magnitude" else 8 * 32)


def test_wanda_calibrates_each_layer_on_the_pruned_layers_before_it(tiny: Path, windows):  # type: ignore[no-untyped-def]
    """Sequential: layer 2's activations come from pruned layers 0-1, so its mask differs from
    one computed on the dense model's activations."""
    model, _ = base_models.load_causal_lm(tiny)
    dense, _ = base_models.load_causal_lm(tiny)
    prune.prune_unstructured(model, PruneSettings(method="wanda", sparsity=0.5), windows)
    norms: dict[str, torch.Tensor] = {}
    proj = dense.model.layers[3].mlp.down_proj

    def record(module, args, output) -> None:  # type: ignore[no-untyped-def]
        norms["x"] = (args[0].reshape(-1, args[0].shape[-1]) ** 2).sum(0)

    proj.register_forward_hook(record)
    with torch.no_grad():
        dense(input_ids=torch.tensor(windows), use_cache=False)
    dense_mask = prune.prune_mask(proj.weight, PruneSettings(method="wanda", sparsity=0.5), norms["x"])
    assert not torch.equal(dense_mask, model.model.layers[3].mlp.down_proj.weight == 0)


def test_plan_candidates_respect_grouped_query_attention_and_alignment():
    shape = prune.Shape(
        layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152, tied=True
    )
    assert abs(shape.parameters() - 134_515_008) < 1000  # SmolLM2-135M
    plans = prune.plan_candidates(shape, target=0.75, layer_order=list(range(30)))
    assert plans
    for plan in plans:
        assert plan.intermediate % prune.WIDTH_ALIGN == 0
        assert plan.heads_per_group in (3, 2)
        kept = shape.parameters(
            layers=30 - len(plan.layers_removed),
            intermediate=plan.intermediate,
            heads=plan.heads_per_group * 3,
        )
        assert abs(kept / shape.parameters() - 0.75) < 0.01
    assert any(p.layers_removed for p in plans) and any(p.heads_per_group == 2 for p in plans)
    fixed = prune.plan_candidates(shape, target=0.9, layer_order=list(range(30)), layers=0, heads_per_group=3)
    assert [(p.layers_removed, p.heads_per_group) for p in fixed] == [((), 3)]
    # Too little left for the MLP: no plan.
    assert (
        prune.plan_candidates(shape, target=0.3, layer_order=list(range(30)), layers=0, heads_per_group=3)
        == []
    )


@pytest.mark.parametrize(("layers", "heads_per_group"), [(-1, -1), (1, 2)])
def test_structured_pruning_makes_a_smaller_model_transformers_and_llama_cpp_agree_on(
    tiny: Path, windows, tmp_path: Path, layers: int, heads_per_group: int
):  # type: ignore[no-untyped-def]
    model, tokenizer = base_models.load_causal_lm(tiny)
    settings = PruneSettings(method="structured", target=0.6, layers=layers, heads_per_group=heads_per_group)
    smaller, result = prune.prune_structured(model, settings, windows)
    assert result.shrinks_file and result.parameters_after < result.parameters_before
    assert abs(result.parameters_after / result.parameters_before - 0.6) < 0.08
    structure = result.structure
    assert sum(c["chosen"] for c in structure["candidates"]) == 1
    if layers == 1:
        assert structure["layers"] == 3 and structure["heads"] == 4
        # The layer removed is the one that changed its input least (lowest Block Influence).
        influence = structure["block_influence"]
        assert structure["layers_removed"] == [influence.index(min(influence))]
    out = tmp_path / "pruned"
    smaller.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    reloaded, _ = base_models.load_causal_lm(out)
    config = reloaded.config
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert config.intermediate_size == structure["intermediate_size"] and config.head_dim == 16
    ids = windows[0]
    with torch.no_grad():
        assert torch.allclose(
            reloaded(torch.tensor([ids])).logits, smaller(torch.tensor([ids])).logits, atol=1e-5
        )
    gguf = gguf_convert.convert_hf_to_gguf(out, tmp_path / "pruned.gguf", out_type="f32").path
    expected, got = hf_logits(out, ids), llama_logits(gguf, ids)
    assert np.abs(expected - got).max() < 5e-4
    assert np.array_equal(expected.argmax(-1), got.argmax(-1))
    assert (
        gguf.stat().st_size
        < 0.75
        * gguf_convert.convert_hf_to_gguf(tiny, tmp_path / "dense.gguf", out_type="f32").path.stat().st_size
    )


def test_structured_keeps_the_heads_and_channels_that_matter(tiny: Path, windows):  # type: ignore[no-untyped-def]
    """A head whose output projection is zero, and MLP channels whose down projection is zero,
    contribute nothing; they are the first to go."""
    model, _ = base_models.load_causal_lm(tiny)
    d = 16
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 1 * d : 2 * d] = 0  # head 1, in KV group 0
            layer.self_attn.o_proj.weight[:, 5 * d : 6 * d] = 0  # head 5, in KV group 1
            layer.mlp.down_proj.weight[:, :64] = 0
    settings = PruneSettings(method="structured", target=0.7, layers=0, heads_per_group=2)
    smaller, result = prune.prune_structured(model, settings, windows)
    assert result.structure["heads"] == 4
    original = model.model.layers[0].self_attn.q_proj.weight
    kept_q = smaller.model.layers[0].self_attn.q_proj.weight
    kept_heads = [
        h
        for h in range(6)
        for k in range(4)
        if torch.equal(original[h * d : (h + 1) * d], kept_q[k * d : (k + 1) * d])
    ]
    assert kept_heads == [0, 2, 3, 4]
    gate = model.model.layers[0].mlp.gate_proj.weight
    kept_rows = smaller.model.layers[0].mlp.gate_proj.weight
    kept_channels = {int(torch.argmin((gate - row).abs().sum(dim=1))) for row in kept_rows}
    assert not kept_channels & set(range(64))
