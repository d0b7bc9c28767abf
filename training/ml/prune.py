"""Pruning a Llama-family model: unstructured and N:M (Wanda, magnitude) and structured (MLP
channels, query heads, whole layers). Django-free; the `prune` build step calls it.

Unstructured sparsity zeroes weights inside dense matrices: the file llama.cpp loads stays the
same size and decodes at the same speed (its block formats store every zero). Only structured
pruning makes the saved model smaller and faster, because the matrices themselves shrink. Both
are reported as what they are (`PruneResult`).

Wanda follows `locuslab/wanda` (lib/prune.py `prune_wanda`): layer by layer, the squared L2 norm
of each input channel's activations over the calibration tokens; a weight's score is
|W_ij| * ||X_j||; the lowest scores are zeroed within each output row (or within each group of M
consecutive inputs for N:M); the layer is run again with its pruned weights so the next layer is
calibrated on what it will really receive. Magnitude is the baseline: |W_ij|, lowest zeroed over
each whole matrix. Embeddings and the output head are never pruned.

Structured pruning scores, on the same calibration windows:
- MLP channel k of a layer: ||W_down[:, k]|| * ||a_k|| (a_k: the input of down_proj, i.e. the
  gated activation), the Wanda statistic for a whole channel;
- query head h: ||W_o[:, h]|| * ||a_h|| over its head_dim columns of o_proj's input;
- layer: Block Influence (ShortGPT), the mean of 1 - cos(h_in, h_out) over tokens.
Every layer keeps the same MLP width and the same number of query heads per KV head, because
llama.cpp's `llama` architecture (and transformers' LlamaConfig) hold one size for all layers,
and grouped-query attention needs the same number of query heads in every group.
"""

from __future__ import annotations

import copy
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

# Structured widths are kept multiples of this: llama.cpp's quantized blocks hold 32 values, so a
# row of another length could not be quantized at all.
WIDTH_ALIGN = 32
# The MLP keeps at least this share of its channels; a target that needs more comes from heads
# and layers instead (or is refused).
MIN_MLP_KEEP = 0.125
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
METHODS = ("magnitude", "wanda", "structured")
_PATTERN = re.compile(r"^(magnitude|wanda)(?:_(\d+)_(\d+))?$")


class PruneError(ValueError):
    """Settings or a model this module cannot prune; the message says why."""


class PruneStopped(Exception):
    """should_stop() asked to stop; the model is left partly pruned and must be discarded."""


@dataclass(frozen=True)
class PruneSettings:
    method: str = "wanda"  # magnitude | wanda | magnitude_2_4 | wanda_2_4 | wanda_4_8 | structured
    sparsity: float = 0.5  # unstructured: the share of each matrix's weights set to zero
    target: float = 0.75  # structured: the share of parameters kept
    calibration_samples: int = 32  # token windows of the project's documents
    calibration_length: int = 256  # tokens per window
    layers: int = -1  # structured: layers to remove; -1 chooses on the calibration loss
    heads_per_group: int = -1  # structured: query heads kept per KV head; -1 chooses
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method != "structured" and not _PATTERN.match(self.method):
            raise PruneError(
                f"Unknown pruning method “{self.method}”. Use magnitude, wanda, wanda_2_4, wanda_4_8, "
                "magnitude_2_4 or structured."
            )
        pattern = self.pattern
        if pattern is not None and not 0 < pattern[0] < pattern[1]:
            raise PruneError(f"An N:M pattern needs 0 < N < M; got {pattern[0]}:{pattern[1]}.")
        if pattern is None and self.method != "structured" and not 0.0 <= self.sparsity < 1.0:
            raise PruneError("Sparsity is a share of the weights: from 0 up to (not including) 1.")
        if self.method == "structured" and not 0.05 <= self.target <= 1.0:
            raise PruneError("The structured target is the share of parameters to keep, from 0.05 to 1.")
        if self.calibration_samples < 1 or self.calibration_length < 8:
            raise PruneError("Calibration needs at least one window of at least 8 tokens.")

    @property
    def scoring(self) -> str:
        """ "wanda", "magnitude" or "structured"."""
        return self.method.split("_")[0]

    @property
    def pattern(self) -> tuple[int, int] | None:
        """(N, M) for N:M sparsity (N zeros in every M consecutive weights of a row), else None."""
        match = _PATTERN.match(self.method)
        if match and match.group(2):
            return int(match.group(2)), int(match.group(3))
        return None

    @property
    def needs_calibration(self) -> bool:
        return self.scoring != "magnitude"

    @property
    def effective_sparsity(self) -> float:
        pattern = self.pattern
        return pattern[0] / pattern[1] if pattern else self.sparsity

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> PruneSettings:
        """Settings from `--set prune.KEY=VALUE` strings, typed after the defaults."""
        defaults = cls()
        typed: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in cls.__dataclass_fields__:
                raise PruneError(
                    f"Unknown pruning setting “{key}”; known: {', '.join(cls.__dataclass_fields__)}."
                )
            kind = type(getattr(defaults, key))
            try:
                typed[key] = kind(str(raw).strip().lower() if kind is str else raw)
            except ValueError:
                raise PruneError(f"Pruning setting {key}: “{raw}” is not a {kind.__name__}.") from None
        return replace(defaults, **typed)


# --------------------------------------------------------------------------------------------
# Calibration


def calibration_windows(token_ids: Sequence[int], *, samples: int, length: int, seed: int) -> list[list[int]]:
    """`samples` windows of `length` tokens from one token stream, never overlapping.

    The stream is cut into consecutive slots of `length`; a seeded draw picks which slots, kept
    in stream order. A stream with fewer slots than asked gives all its slots; a stream shorter
    than one window gives itself as the only window. Every window has the same length, so the
    windows stack into one batch.
    """
    if samples < 1 or length < 1:
        raise ValueError("samples and length must be positive")
    if not token_ids:
        return []
    slots = len(token_ids) // length
    if slots == 0:
        return [list(token_ids)]
    chosen = sorted(random.Random(f"calibration:{seed}").sample(range(slots), min(samples, slots)))
    return [list(token_ids[s * length : (s + 1) * length]) for s in chosen]


def calibration_from_texts(
    tokenizer: Any, texts: Sequence[str], *, samples: int, length: int, seed: int
) -> list[list[int]]:
    """Windows from texts joined with the end-of-sequence token, as they are joined for training."""
    stream: list[int] = []
    eos = tokenizer.eos_token_id
    budget = max(samples * length * 4, length)  # enough slots to draw from, without tokenizing everything
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(eos)
        if len(stream) >= budget:
            break
    return calibration_windows(stream, samples=samples, length=length, seed=seed)


# --------------------------------------------------------------------------------------------
# Masks


def nm_mask(scores: Any, n: int, m: int) -> Any:
    """Boolean mask of the weights to zero: the n lowest scores in every m consecutive columns of
    each row. Columns beyond the last full group (in_features % m) are kept."""
    import torch

    rows, cols = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    full = cols - cols % m
    if full:
        groups = scores[:, :full].reshape(rows, full // m, m)
        lowest = torch.topk(groups, n, dim=-1, largest=False).indices
        group_mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True)
        mask[:, :full] = group_mask.reshape(rows, full)
    return mask


def row_mask(scores: Any, sparsity: float) -> Any:
    """Zero the lowest int(in_features * sparsity) scores of every row (Wanda's comparison group)."""
    import torch

    count = int(scores.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count:
        lowest = torch.topk(scores, count, dim=-1, largest=False).indices
        mask.scatter_(-1, lowest, True)
    return mask


def matrix_mask(scores: Any, sparsity: float) -> Any:
    """Zero the lowest int(numel * sparsity) scores of the whole matrix (magnitude pruning)."""
    import torch

    count = int(scores.numel() * sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count:
        lowest = torch.topk(scores.flatten(), count, largest=False).indices
        mask[lowest] = True
    return mask.reshape(scores.shape)


def wanda_scores(weight: Any, input_sq_norms: Any) -> Any:
    """|W_ij| * ||X_j||: input_sq_norms holds Σ x_j² per input column over the calibration tokens."""
    return weight.abs().float() * input_sq_norms.float().sqrt().unsqueeze(0)


def prune_mask(weight: Any, settings: PruneSettings, input_sq_norms: Any | None) -> Any:
    """Which weights of one matrix the settings zero."""
    if settings.scoring == "wanda":
        if input_sq_norms is None:
            raise PruneError("Wanda needs calibration activations.")
        scores = wanda_scores(weight, input_sq_norms)
    else:
        scores = weight.abs().float()
    pattern = settings.pattern
    if pattern is not None:
        return nm_mask(scores, *pattern)
    if settings.scoring == "wanda":
        return row_mask(scores, settings.sparsity)
    return matrix_mask(scores, settings.sparsity)


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class PruneResult:
    method: str
    parameters_before: int
    parameters_after: int  # what the saved model holds (smaller only for structured pruning)
    nonzero_before: int
    nonzero_after: int
    sparsity: float  # share of zeros in the pruned matrices (the decoder layers' linear weights)
    calibration_windows: int
    calibration_tokens: int
    seconds: float
    shrinks_file: bool  # only structured pruning makes the GGUF smaller and faster
    structure: dict[str, Any] = field(default_factory=dict)  # structured: what was kept and why

    def as_metrics(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "parameter_ratio": round(self.parameters_after / self.parameters_before, 4),
            "nonzero_before": self.nonzero_before,
            "nonzero_after": self.nonzero_after,
            "nonzero_ratio": round(self.nonzero_after / self.nonzero_before, 4),
            "sparsity": round(self.sparsity, 4),
            "calibration_windows": self.calibration_windows,
            "calibration_tokens": self.calibration_tokens,
            "seconds": round(self.seconds, 2),
            "shrinks_file": self.shrinks_file,
        } | ({"structure": self.structure} if self.structure else {})


def count_parameters(model: Any) -> tuple[int, int]:
    """(parameters, non-zero parameters), tied weights counted once."""
    seen: set[int] = set()
    total = nonzero = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        nonzero += int((param != 0).sum())
    return total, nonzero


# --------------------------------------------------------------------------------------------
# Unstructured and N:M


def _decoder_layers(model: Any) -> Any:
    model_type = getattr(model.config, "model_type", "")
    if model_type not in SUPPORTED_TYPES:
        raise PruneError(
            f"Pruning supports Llama-family models ({', '.join(SUPPORTED_TYPES)}); this one is “{model_type}”."
        )
    return model.model.layers


def _linears(layer: Any) -> dict[str, Any]:
    import torch

    return {name: module for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)}


class _Caught(Exception):
    pass


def _layer_inputs(model: Any, windows: list[list[int]], batch: int) -> list[tuple[Any, dict]]:
    """The hidden states (and the keyword arguments: rotary embeddings, mask) that enter the first
    decoder layer, per batch of windows, captured by stopping the forward pass there."""
    import torch

    layers = model.model.layers
    caught: list[tuple[Any, dict]] = []

    def catch(module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden, {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}))
        raise _Caught

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch):
            ids = torch.tensor(windows[start : start + batch], dtype=torch.long)
            try:
                with torch.no_grad():  # captured inputs need no autograd graph
                    model(input_ids=ids, use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    return caught


def _run_layer(layer: Any, hidden: Any, kwargs: dict) -> Any:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def prune_unstructured(
    model: Any,
    settings: PruneSettings,
    windows: list[list[int]],
    *,
    progress: Callable[[int, int], None] = lambda done, total: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> PruneResult:
    """Zero weights in place in every decoder layer's linear matrices (Wanda or magnitude)."""
    import torch

    started = time.monotonic()
    layers = _decoder_layers(model)
    if settings.needs_calibration and not windows:
        raise PruneError("Wanda needs calibration text; there is none.")
    total_before, nonzero_before = count_parameters(model)
    batch = 8
    inputs = _layer_inputs(model, windows, batch) if settings.needs_calibration else []
    zeros = size = 0
    with torch.no_grad():
        for index, layer in enumerate(layers):
            if should_stop():
                raise PruneStopped
            linears = _linears(layer)
            norms: dict[str, Any] = {}
            handles = []
            if inputs:

                def hook(name: str, norms: dict[str, Any] = norms) -> Callable[..., None]:
                    def accumulate(module: Any, args: tuple, output: Any) -> None:
                        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                        norms[name] = norms.get(name, 0) + (x * x).sum(dim=0)

                    return accumulate

                handles = [module.register_forward_hook(hook(name)) for name, module in linears.items()]
                try:
                    for hidden, kwargs in inputs:
                        _run_layer(layer, hidden, kwargs)
                finally:
                    for handle in handles:
                        handle.remove()
            for name, module in linears.items():
                mask = prune_mask(module.weight.data, settings, norms.get(name))
                module.weight.data[mask] = 0
                zeros += int((module.weight.data == 0).sum())
                size += module.weight.numel()
            if inputs:  # what the next layer receives from this pruned one
                inputs = [(_run_layer(layer, hidden, kwargs), kwargs) for hidden, kwargs in inputs]
            progress(index + 1, len(layers))
    total_after, nonzero_after = count_parameters(model)
    return PruneResult(
        method=settings.method,
        parameters_before=total_before,
        parameters_after=total_after,
        nonzero_before=nonzero_before,
        nonzero_after=nonzero_after,
        sparsity=zeros / size if size else 0.0,
        calibration_windows=len(windows) if settings.needs_calibration else 0,
        calibration_tokens=sum(map(len, windows)) if settings.needs_calibration else 0,
        seconds=time.monotonic() - started,
        shrinks_file=False,
    )


# --------------------------------------------------------------------------------------------
# Structured


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config: Any) -> Shape:
        heads = int(config.num_attention_heads)
        return cls(
            layers=int(config.num_hidden_layers),
            hidden=int(config.hidden_size),
            intermediate=int(config.intermediate_size),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            vocab=int(config.vocab_size),
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def per_group(self) -> int:
        return self.heads // self.kv_heads

    def layer_parameters(self, *, intermediate: int | None = None, heads: int | None = None) -> int:
        """Weights of one decoder layer (norms included; biases, which few Llama models have, not)."""
        i = self.intermediate if intermediate is None else intermediate
        h = self.heads if heads is None else heads
        attention = self.hidden * self.head_dim * (2 * h + 2 * self.kv_heads)
        return attention + 3 * self.hidden * i + 2 * self.hidden

    def parameters(
        self, *, layers: int | None = None, intermediate: int | None = None, heads: int | None = None
    ) -> int:
        n = self.layers if layers is None else layers
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden
        return embeddings + n * self.layer_parameters(intermediate=intermediate, heads=heads)


@dataclass(frozen=True)
class StructurePlan:
    layers_removed: tuple[int, ...]  # indices in the original model
    heads_per_group: int
    intermediate: int

    def describe(self, shape: Shape) -> str:
        parts = [f"MLP {shape.intermediate}→{self.intermediate} channels"]
        if self.heads_per_group != shape.per_group:
            parts.append(f"{shape.heads}→{self.heads_per_group * shape.kv_heads} query heads")
        if self.layers_removed:
            parts.append(f"{shape.layers}→{shape.layers - len(self.layers_removed)} layers")
        return ", ".join(parts)


def plan_candidates(
    shape: Shape, *, target: float, layer_order: Sequence[int], layers: int = -1, heads_per_group: int = -1
) -> list[StructurePlan]:
    """Plans that keep about `target` of the parameters: some layers removed (lowest Block
    Influence first) and some query heads per group, the MLP width filling the rest. Fixed
    `layers` / `heads_per_group` (>= 0) narrow the choice."""
    total = shape.parameters()
    budget = total * target
    per_layer = shape.layer_parameters()
    removable = max(0.0, total - budget)
    if layers >= 0:
        layer_options = [layers]
    else:  # none, or a quarter / half of the removal spent on whole layers
        layer_options = sorted({0, int(removable * 0.25 // per_layer), int(removable * 0.5 // per_layer)})
    if heads_per_group >= 0:
        head_options = [heads_per_group]
    else:
        head_options = [shape.per_group] + ([shape.per_group - 1] if shape.per_group > 1 else [])
    plans = []
    floor = max(WIDTH_ALIGN, _align_down(int(shape.intermediate * MIN_MLP_KEEP)))
    for n_layers in layer_options:
        if not 0 <= n_layers < shape.layers:
            continue
        for per_group in head_options:
            if not 1 <= per_group <= shape.per_group:
                continue
            if shape.hidden % (per_group * shape.kv_heads):
                continue  # transformers refuses a hidden size that the head count does not divide
            kept_layers = shape.layers - n_layers
            # Parameters left for the MLPs once layers and heads are set: solve for the width.
            fixed = shape.parameters(layers=kept_layers, intermediate=0, heads=per_group * shape.kv_heads)
            width = (budget - fixed) / (kept_layers * 3 * shape.hidden)
            intermediate = min(shape.intermediate, max(_align_down(int(width + WIDTH_ALIGN / 2)), 0))
            if intermediate < floor:
                continue
            plans.append(StructurePlan(tuple(sorted(layer_order[:n_layers])), per_group, intermediate))
    return list(dict.fromkeys(plans))


def _align_down(value: int) -> int:
    return value - value % WIDTH_ALIGN


@dataclass
class _Statistics:
    channel: list[Any]  # per layer: Σ a_k² at down_proj's input, [intermediate]
    head: list[Any]  # per layer: Σ a² at o_proj's input summed per query head, [heads]
    influence: list[float]  # per layer: mean 1 - cos(h_in, h_out)


def _structure_statistics(model: Any, windows: list[list[int]], shape: Shape) -> _Statistics:
    import torch

    layers = model.model.layers
    channel = [torch.zeros(shape.intermediate) for _ in layers]
    head = [torch.zeros(shape.heads) for _ in layers]
    influence = [0.0 for _ in layers]
    tokens = 0
    handles = []

    def down_hook(i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple, output: Any) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            channel[i] += (x * x).sum(dim=0)

        return hook

    def o_hook(i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple, output: Any) -> None:
            x = args[0].detach().float().reshape(-1, shape.heads, shape.head_dim)
            head[i] += (x * x).sum(dim=(0, 2))

        return hook

    def influence_hook(i: int) -> Callable[..., None]:
        # Block Influence from the layer's own input and output (the model's last hidden state
        # is after the final norm, which would bias the last layer's score).
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            a = (args[0] if args else kwargs["hidden_states"]).detach().float()
            b = (output[0] if isinstance(output, tuple) else output).detach().float()
            influence[i] += float((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).sum())

        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_hook(down_hook(i)))
        handles.append(layer.self_attn.o_proj.register_forward_hook(o_hook(i)))
        handles.append(layer.register_forward_hook(influence_hook(i), with_kwargs=True))
    try:
        with torch.no_grad():
            for start in range(0, len(windows), 8):
                ids = torch.tensor(windows[start : start + 8], dtype=torch.long)
                model(input_ids=ids, use_cache=False)
                tokens += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    return _Statistics(channel, head, [v / max(tokens, 1) for v in influence])


def _kept_channels(layer: Any, sq_norms: Any, keep: int) -> Any:
    import torch

    weight = layer.mlp.down_proj.weight.detach().float()  # [hidden, intermediate]
    scores = weight.norm(dim=0) * sq_norms.sqrt()
    return torch.sort(torch.topk(scores, keep).indices).values


def _kept_heads(layer: Any, sq_norms: Any, shape: Shape, per_group: int) -> list[int]:
    weight = layer.self_attn.o_proj.weight.detach().float()  # [hidden, heads * head_dim]
    norms = weight.reshape(shape.hidden, shape.heads, shape.head_dim).norm(dim=(0, 2))
    scores = norms * sq_norms.sqrt()
    kept: list[int] = []
    for group in range(shape.kv_heads):  # query heads group*per_group … share KV head `group`
        members = list(range(group * shape.per_group, (group + 1) * shape.per_group))
        members.sort(key=lambda h: -float(scores[h]))
        kept += sorted(members[:per_group])
    return kept


def apply_structure(model: Any, plan: StructurePlan, stats: _Statistics) -> Any:
    """A new, smaller model of the same class with `plan` applied: fewer MLP channels and query
    heads in every layer, and the planned layers gone. The original is left as it was."""
    import torch

    shape = Shape.of(model.config)
    config = copy.deepcopy(model.config)
    heads = plan.heads_per_group * shape.kv_heads
    kept_layers = [i for i in range(shape.layers) if i not in set(plan.layers_removed)]
    config.num_hidden_layers = len(kept_layers)
    config.intermediate_size = plan.intermediate
    config.num_attention_heads = heads
    config.num_key_value_heads = shape.kv_heads
    config.head_dim = shape.head_dim  # hidden size / heads no longer gives it
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept_layers]
    state = model.state_dict()
    new_state: dict[str, Any] = {}
    d = shape.head_dim
    for new_index, old_index in enumerate(kept_layers):
        old, new = f"model.layers.{old_index}.", f"model.layers.{new_index}."
        layer = model.model.layers[old_index]
        channels = _kept_channels(layer, stats.channel[old_index], plan.intermediate)
        head_ids = _kept_heads(layer, stats.head[old_index], shape, plan.heads_per_group)
        rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in head_ids])
        for key, value in state.items():
            if not key.startswith(old):
                continue
            name = key[len(old) :]
            if name.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
                value = value[channels]
            elif name == "mlp.down_proj.weight":
                value = value[:, channels]
            elif name.startswith("self_attn.q_proj."):
                value = value[rows]
            elif name == "self_attn.o_proj.weight":
                value = value[:, rows]
            new_state[new + name] = value.clone()
    for key, value in state.items():
        if not key.startswith("model.layers."):
            new_state[key] = value.clone()
    smaller = type(model)(config)
    missing, unexpected = smaller.load_state_dict(new_state, strict=False)
    # A tied output head is not in the state dict of its own; anything else missing is a bug.
    if unexpected or [k for k in missing if not (shape.tied and k == "lm_head.weight")]:
        raise PruneError(f"The pruned weights do not fit the smaller model: {missing or unexpected}")
    if shape.tied:
        smaller.tie_weights()
    smaller.to(next(model.parameters()).dtype)
    smaller.eval()
    return smaller


def calibration_loss(model: Any, windows: list[list[int]]) -> float:
    """Mean next-token cross-entropy over the windows."""
    import torch

    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(windows), 8):
            ids = torch.tensor(windows[start : start + 8], dtype=torch.long)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += ids[:, 1:].numel()
    return total / count if count else math.nan


def prune_structured(
    model: Any,
    settings: PruneSettings,
    windows: list[list[int]],
    *,
    progress: Callable[[int, int], None] = lambda done, total: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[Any, PruneResult]:
    """(the smaller model, what was done). Each candidate plan is built and scored by its loss on
    (up to 8 of) the calibration windows; the lowest wins."""
    started = time.monotonic()
    _decoder_layers(model)
    if not windows:
        raise PruneError("Structured pruning needs calibration text; there is none.")
    shape = Shape.of(model.config)
    if shape.heads % shape.kv_heads:
        raise PruneError("The model's query heads do not divide evenly over its KV heads.")
    total_before, nonzero_before = count_parameters(model)
    stats = _structure_statistics(model, windows, shape)
    order = sorted(range(shape.layers), key=lambda i: stats.influence[i])
    plans = plan_candidates(
        shape, target=settings.target, layer_order=order, layers=settings.layers,
        heads_per_group=settings.heads_per_group,
    )  # fmt: skip
    if not plans:
        raise PruneError(
            f"No structure keeps {settings.target:.0%} of the parameters with these settings: the MLP would "
            f"drop below {MIN_MLP_KEEP:.0%} of its width. Choose a higher target, or allow layers or heads."
        )
    selection = windows[:8]
    scored: list[tuple[float, StructurePlan]] = []
    best: tuple[float, Any, StructurePlan] | None = None
    for number, plan in enumerate(plans):
        if should_stop():
            raise PruneStopped
        candidate = apply_structure(model, plan, stats)
        loss = calibration_loss(candidate, selection)
        scored.append((loss, plan))
        if best is None or loss < best[0]:
            best = (loss, candidate, plan)
        else:
            del candidate
        progress(number + 1, len(plans))
    assert best is not None
    loss, smaller, plan = best
    total_after, nonzero_after = count_parameters(smaller)
    structure = {
        "target": settings.target,
        "summary": plan.describe(shape),
        "layers_removed": list(plan.layers_removed),
        "layers": shape.layers - len(plan.layers_removed),
        "heads": plan.heads_per_group * shape.kv_heads,
        "kv_heads": shape.kv_heads,
        "intermediate_size": plan.intermediate,
        "block_influence": [round(v, 5) for v in stats.influence],
        "candidates": [
            {"summary": p.describe(shape), "calibration_loss": round(v, 4), "chosen": p == plan}
            for v, p in scored
        ],
        "calibration_loss_before": round(calibration_loss(model, selection), 4),
    }
    return smaller, PruneResult(
        method="structured",
        parameters_before=total_before,
        parameters_after=total_after,
        nonzero_before=nonzero_before,
        nonzero_after=nonzero_after,
        sparsity=0.0,
        calibration_windows=len(windows),
        calibration_tokens=sum(map(len, windows)),
        seconds=time.monotonic() - started,
        shrinks_file=True,
        structure=structure,
    )
