"""The live loss chart of a training step: train loss per step and validation loss, as SVG."""

from __future__ import annotations

from dataclasses import dataclass

from slmstudio.lib.charts import nice_ticks, padded, tick_label

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 12, 40


@dataclass(frozen=True)
class Tick:
    at: float
    label: str


@dataclass(frozen=True)
class LossChart:
    width: int
    height: int
    plot: tuple[float, float, float, float]
    train_line: str  # SVG polyline points "x,y x,y …"
    eval_points: list[tuple[float, float]]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    last_train: float | None
    last_eval: float | None


def loss_chart(history: list[dict], total_steps: int | None = None) -> LossChart | None:
    """None until there are two points to draw a line between."""
    train = [(p["step"], p["train_loss"]) for p in history if p.get("train_loss") is not None]
    evals = [(p["step"], p["eval_loss"]) for p in history if p.get("eval_loss") is not None]
    if len(train) + len(evals) < 2:
        return None
    steps = [s for s, _ in train + evals]
    losses = [v for _, v in train + evals]
    x_ticks = nice_ticks(0, max(total_steps or 0, max(steps), 1))
    y_low, y_high = padded(min(losses), max(losses))
    y_ticks = nice_ticks(max(0.0, y_low), y_high)
    left, top, right, bottom = LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM
    x_max, y_min, y_max = x_ticks[-1], y_ticks[0], y_ticks[-1]

    def px(step: float) -> float:
        return round(left + step / x_max * (right - left), 1)

    def py(loss: float) -> float:
        return round(bottom - (loss - y_min) / (y_max - y_min) * (bottom - top), 1)

    return LossChart(
        width=WIDTH,
        height=HEIGHT,
        plot=(left, top, right, bottom),
        train_line=" ".join(f"{px(s)},{py(v)}" for s, v in train),
        eval_points=[(px(s), py(v)) for s, v in evals],
        x_ticks=[Tick(px(v), tick_label(v, x_ticks)) for v in x_ticks],
        y_ticks=[Tick(py(v), tick_label(v, y_ticks)) for v in y_ticks],
        last_train=train[-1][1] if train else None,
        last_eval=evals[-1][1] if evals else None,
    )
