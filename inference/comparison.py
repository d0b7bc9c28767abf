"""The numbers a team compares versions by, and the size-vs-quality chart (plain SVG, no library)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from django.urls import reverse

from slmstudio.lib.charts import nice_ticks, padded, tick_label
from training.models import ModelVersion
from training.recipes import QUANTIZE_TYPES


@dataclass(frozen=True)
class Row:
    version: ModelVersion
    kind: str  # "Q4_K_M · 4-bit, the usual choice" or the type in capitals
    size_bytes: int | None
    bits_per_weight: float | None
    perplexity: float | None
    kl_divergence: float | None
    answer_f1: float | None
    embedding_similarity: float | None
    tokens_per_second: float | None
    peak_memory_bytes: int | None
    times_smaller: float | None  # than the largest version in the table
    other_text: bool  # its perplexity is over other text than the newest version's (documents changed)

    @property
    def size_mb(self) -> float | None:  # decimal megabytes, as on the chart
        return None if self.size_bytes is None else self.size_bytes / 1e6

    @property
    def memory_mb(self) -> float | None:
        return None if self.peak_memory_bytes is None else self.peak_memory_bytes / 1e6

    @property
    def made_by(self) -> str:
        """What was done to the base, in order: "answers from documents · LoRA · pruned (Wanda 50%)"."""
        m = self.version.metrics
        parts = ["answers from documents"] if self.version.index_dir else []
        if "lora" in m:
            parts.append("LoRA")
        if "raft" in m:
            parts.append("RAFT")
        if "distill" in m:
            parts.append(f"distilled from {m['distill'].get('teacher', 'a teacher')}")
        prune = m.get("prune") or {}
        if prune.get("method") == "structured":
            parts.append(f"pruned to {prune.get('parameter_ratio', 0):.0%} of parameters")
        elif prune:
            parts.append(f"{prune.get('sparsity', 0):.0%} zeroed ({prune.get('method')})")
        if "heal" in m:
            parts.append("healed")
        return " · ".join(parts)

    @property
    def lineage(self) -> list[str]:
        """The chain from the base model to this file, for the report's lineage diagram."""
        base = self.version.base.name if self.version.base else self.version.base_model
        kind = self.short_kind.split(" · ")[0] if self.version.quant_type else ""
        return [base, *filter(None, self.made_by.split(" · "))] + (
            [f"quantized {kind}"] if self.version.metrics.get("quantize") else []
        )

    @property
    def short_kind(self) -> str:
        """ "Q4_K_M · 4-bit" — the type and its plain meaning, without the advice."""
        return " · ".join(self.kind.split(" · ")[:2])


def comparison_rows(versions: Sequence[ModelVersion]) -> list[Row]:
    sizes = [v.evaluation.get("size_bytes") for v in versions]
    largest = max((s for s in sizes if s), default=None)
    texts = [v.evaluation.get("eval_text_sha256") for v in versions]
    newest_text = next((t for t in texts if t), None)  # versions come newest first
    rows = []
    for version, size in zip(versions, sizes, strict=True):
        m = version.evaluation
        rows.append(
            Row(
                version=version,
                kind=QUANTIZE_TYPES.get(version.quant_type, version.quant_type.upper()),
                size_bytes=size,
                bits_per_weight=m.get("bits_per_weight"),
                perplexity=m.get("perplexity"),
                kl_divergence=m.get("kl_divergence"),
                answer_f1=m.get("answer_f1"),
                embedding_similarity=m.get("embedding_similarity"),
                tokens_per_second=m.get("tokens_per_second"),
                peak_memory_bytes=m.get("peak_memory_bytes"),
                times_smaller=round(largest / size, 1) if largest and size and size < largest else None,
                other_text=bool(
                    newest_text
                    and m.get("perplexity") is not None
                    and m.get("eval_text_sha256") != newest_text
                ),
            )
        )
    return rows


# --- Chart ------------------------------------------------------------------------------------

WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 16, 48


@dataclass(frozen=True)
class Point:
    x: float  # pixels
    y: float
    label: str
    href: str
    title: str  # the raw values, for the tooltip
    label_x: float  # where its label starts (or ends, near the right edge)
    label_anchor: str  # "start" or "end"


@dataclass(frozen=True)
class Tick:
    at: float  # pixels
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    plot: tuple[float, float, float, float]  # left, top, right, bottom in pixels
    points: list[Point]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    x_label: str
    y_label: str


def size_quality_chart(rows: Sequence[Row]) -> Chart | None:
    """File size (MB) against perplexity on held-out text, one point per version; None when
    fewer than one version has both numbers."""
    # Perplexities over different text do not compare: only versions measured on the newest text.
    data = [
        (r, r.size_bytes / 1e6, r.perplexity)
        for r in rows
        if r.size_bytes is not None and r.perplexity is not None and not r.other_text
    ]
    if not data:
        return None
    xs = [x for _, x, _ in data]
    ys = [y for _, _, y in data]
    x_ticks_values = nice_ticks(0.0, max(xs))
    y_low, y_high = padded(min(ys), max(ys))
    y_ticks_values = nice_ticks(y_low, y_high)
    x_max = x_ticks_values[-1]
    y_min, y_max = y_ticks_values[0], y_ticks_values[-1]
    left, top, right, bottom = LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM

    def px(x: float) -> float:
        return left + (x / x_max) * (right - left) if x_max else left

    def py(y: float) -> float:
        return (
            bottom - (y - y_min) / (y_max - y_min) * (bottom - top) if y_max > y_min else (top + bottom) / 2
        )

    def label_place(x: float) -> tuple[float, str]:
        # Labels of points in the right quarter go to their left, so they stay inside the chart.
        return (
            (round(px(x) - 10, 1), "end")
            if px(x) > right - (right - left) / 4
            else (round(px(x) + 10, 1), "start")
        )

    points = [
        Point(
            x=round(px(x), 1),
            y=round(py(y), 1),
            label_x=label_place(x)[0],
            label_anchor=label_place(x)[1],
            label=f"v{r.version.number} {r.version.quant_type.upper()}".strip(),
            href=reverse("inference-model-detail", args=[r.version.project.slug, r.version.number]),
            title=f"v{r.version.number}: {x:.1f} MB, perplexity {y:.2f}",
        )
        for r, x, y in data
    ]
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        plot=(left, top, right, bottom),
        points=points,
        x_ticks=[Tick(round(px(v), 1), tick_label(v, x_ticks_values)) for v in x_ticks_values],
        y_ticks=[Tick(round(py(v), 1), tick_label(v, y_ticks_values)) for v in y_ticks_values],
        x_label="File size (MB) — smaller is to the left",
        y_label="Perplexity (lower is better)",
    )
