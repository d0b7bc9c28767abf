"""Axis arithmetic for the small server-rendered SVG charts (no chart library to vendor)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def padded(low: float, high: float) -> tuple[float, float]:
    """A value range with room around the points, never collapsed to zero width."""
    span = high - low
    pad = span * 0.15 if span > 0 else max(abs(high) * 0.05, 0.5)
    return low - pad, high + pad


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value < high + step * 0.999:
        ticks.append(round(value, 10))
        value += step
    return ticks


def tick_label(value: float, ticks: Sequence[float]) -> str:
    """As many decimals as the tick step needs (16.25 and 16.5 must not both read "16")."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    decimals = 0
    while decimals < 6 and abs(round(step, decimals) - step) > 1e-9:
        decimals += 1
    return f"{value:.{decimals}f}"
