"""What the pictures show, as plain data: loss curves, cost bars and quality against cost.

The dashboard draws these with plotext (:mod:`vqabench.tui.charts`), the export with
matplotlib (:mod:`vqabench.figures`); both take the numbers from here, and every number here
comes from :mod:`vqabench.report`'s :class:`~vqabench.report.RunSummary` (the tables' own),
so a picture never disagrees with its table. Nothing measured is None, never 0. No UI, no
plotting library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from vqabench.events import EpochEnded
from vqabench.report import NA, RunData, RunSummary

#: The two loss curves a run has: the mean training loss of each epoch and the eval loss after it.
LOSS_KINDS = ("train", "eval")


@dataclass(frozen=True)
class LossCurve:
    """One run's train or eval loss: (x in epochs, loss) points, in order."""

    run: str
    kind: str  # "train" or "eval"
    points: list[tuple[float, float]]


def loss_curve(
    run: str, kind: str, epochs: Sequence[EpochEnded], running: Sequence[tuple[float, float]] = ()
) -> LossCurve:
    """The curve of finished epochs (x = epoch number) plus, for train, the running loss of the
    epoch in progress (x = fraction of epochs done), so a live run's curve grows per report."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind {kind!r} is not one of {', '.join(LOSS_KINDS)}")
    points = [(float(e.epoch), e.train_loss if kind == "train" else e.eval_loss) for e in epochs]
    if kind == "train":
        done = max((e.epoch for e in epochs), default=0)
        points += [(x, y) for x, y in running if x > done]
    return LossCurve(run, kind, [(x, float(y)) for x, y in points if _finite(y)])


#: Losses spanning more than this ratio are drawn on a log scale (IPO's squared loss is tens
#: of times DPO's, which would flatten every other curve on a shared linear axis).
LOG_SCALE_RATIO = 10.0


def log_scale(curves: Sequence[LossCurve]) -> bool:
    """Whether `curves` read better on a log axis: every loss positive, spanning > LOG_SCALE_RATIO."""
    values = [y for c in curves for _, y in c.points]
    return bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SCALE_RATIO


def loss_curves(runs: Sequence[RunData], kind: str) -> list[LossCurve]:
    """One curve per run of a stored session (runs without a finished epoch have none)."""
    curves = [loss_curve(r.name, kind, r.epochs) for r in runs]
    return [c for c in curves if c.points]


@dataclass(frozen=True)
class Bar:
    """One run's bar: a value with its 95% interval where it has one; `parts` split a stacked bar.
    Without a value, `missing` says why: "n/a" (not measured) or "none" (nothing to measure)."""

    run: str
    value: float | None
    low: float | None = None
    high: float | None = None
    parts: tuple[float, ...] = ()
    missing: str = "n/a"


@dataclass(frozen=True)
class CostChart:
    """One cost measure, a bar per run; `parts` names the stacks when the bars are stacked."""

    key: str
    title: str
    unit: str
    bars: list[Bar]
    parts: tuple[str, ...] = ()

    @property
    def measured(self) -> list[Bar]:
        return [b for b in self.bars if b.value is not None]


#: (RunSummary field, chart title, unit) of the cost charts, in the order they are shown.
COST_MEASURES = (
    ("relative_epoch_time", "Epoch time relative to SFT", "× SFT"),
    ("aligned_seconds", "Time to an aligned model", "s"),
    ("peak_memory_mib", "Peak memory", "MiB"),
    ("reference_mib", "Reference memory", "MiB"),
)
#: The stacks of the time-to-aligned-model bars.
STAGES = ("SFT stage", "preference stage")


def interval(summary: RunSummary, key: str) -> tuple[float, float] | None:
    """The 95% interval the report gives `key` of this row: ± its across-seed half-width, or its
    own [low, high] (the bootstrap interval of the ratio to SFT, EM's interval); None where the
    number has none."""
    value = getattr(summary, key, None)
    spread = summary.spread.get(key)
    if spread is not None and value is not None:
        return value - spread, value + spread
    own = summary.relative_interval if key == "relative_epoch_time" else summary.intervals.get(key)
    if own is not None and len(own) == 2:
        return float(own[0]), float(own[1])
    return None


def cost_charts(summaries: Sequence[RunSummary]) -> list[CostChart]:
    """The four cost charts of the efficiency comparison, one bar per row of the report's table."""
    charts = []
    for key, title, unit in COST_MEASURES:
        bars = []
        for s in summaries:
            value = getattr(s, key)
            missing = "none" if key == "reference_mib" and s.uses_reference is False else NA
            ci = interval(s, key)
            parts: tuple[float, ...] = ()
            if key == "aligned_seconds" and value is not None and s.stage_seconds is not None:
                own = min(s.stage_seconds, value)
                parts = (own, 0.0) if s.method == "sft" else (value - own, own)
            low, high = ci if ci is not None else (None, None)
            bars.append(Bar(s.name, value, low, high, parts=parts, missing=missing))
        if key == "peak_memory_mib":
            sources = sorted({s.memory_source for s in summaries if s.memory_source})
            unit = f"MiB ({'/'.join(sources)})" if sources else unit
        charts.append(CostChart(key, title, unit, bars, STAGES if key == "aligned_seconds" else ()))
    return charts


@dataclass(frozen=True)
class QualityPoint:
    """One run: EM on the test split (with its interval) against the time to an aligned model."""

    run: str
    method: str
    cost: float
    em: float
    low: float | None = None
    high: float | None = None
    pareto: bool = False


@dataclass(frozen=True)
class QualityCost:
    points: list[QualityPoint]
    missing: list[str] = field(default_factory=list)  # runs without EM or time to an aligned model


def quality_vs_cost(summaries: Sequence[RunSummary]) -> QualityCost:
    """A point per run with both numbers; `pareto` marks the runs no other run beats on both
    (as cheap or cheaper and at least as good, better in one)."""
    rows = [(s, s.aligned_seconds, s.em) for s in summaries if s.em is not None and s.aligned_seconds is not None]
    front = pareto_front([(cost, em) for _, cost, em in rows if cost is not None and em is not None])
    points = []
    for i, (s, cost, em) in enumerate(rows):
        assert cost is not None and em is not None
        low, high = interval(s, "em") or (None, None)
        points.append(QualityPoint(s.name, s.method, cost, em, low, high, pareto=i in front))
    kept = {id(s) for s, _, _ in rows}
    return QualityCost(points, [s.name for s in summaries if id(s) not in kept])


def pareto_front(points: Sequence[tuple[float, float]]) -> set[int]:
    """Indices of the (cost, quality) points that no other point dominates (lower cost is
    better, higher quality is better; a point equal to another on both is kept)."""
    front = set()
    for i, (cost, quality) in enumerate(points):
        dominated = any(
            c <= cost and q >= quality and (c < cost or q > quality) for j, (c, q) in enumerate(points) if j != i
        )
        if not dominated:
            front.add(i)
    return front


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
