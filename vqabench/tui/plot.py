"""A plain-text loss plot: train and eval loss per epoch and the running loss of the epoch
in progress, drawn with distinct glyphs so that it reads without colour."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rich.text import Text

from vqabench.events import EpochEnded

TRAIN_MARK, TRAIN_LINE = "●", "•"
EVAL_MARK, EVAL_LINE = "○", "◦"
BOTH_MARK = "◉"  # train and eval loss fall on the same cell
RUNNING_MARK = "·"
LABEL_WIDTH = 7


@dataclass(frozen=True)
class Series:
    """Points (x in epochs, loss) drawn with one marker at each point and a connector between."""

    points: list[tuple[float, float]]
    mark: str
    line: str | None
    style: str


def loss_plot(
    epochs: Sequence[EpochEnded], running: Sequence[tuple[float, float]], epochs_total: int, width: int, height: int
) -> Text:
    """The plot as rich Text of `height` lines at most `width` cells wide."""
    finite = lambda v: v is not None and math.isfinite(v)  # noqa: E731
    train = [(float(e.epoch), e.train_loss) for e in epochs if finite(e.train_loss)]
    evals = [(float(e.epoch), e.eval_loss) for e in epochs if finite(e.eval_loss)]
    live = [(x, y) for x, y in running if finite(y)]
    legend = Text()
    legend.append(f"{TRAIN_MARK} train", "bold cyan")
    legend.append("  ")
    legend.append(f"{EVAL_MARK} eval", "bold magenta")
    if live:
        legend.append("  ")
        legend.append(f"{RUNNING_MARK} running (epoch {math.ceil(live[-1][0])})", "yellow")
    values = [y for _, y in train + evals + live]
    plot_width = width - LABEL_WIDTH - 1
    rows = height - 3  # legend, x axis, epoch labels
    if not values:
        return Text("\n").join([legend, Text("no loss yet: the first epoch is running or queued", "dim")])
    if plot_width < 8 or rows < 3:
        return legend
    low, high = min(values), max(values)
    if high - low < 1e-12:
        pad = abs(high) * 0.05 or 0.5
        low, high = low - pad, high + pad
    span_x = max(epochs_total, math.ceil(max(x for x, _ in train + evals + live)), 1)

    def column(x: float) -> int:
        return min(plot_width - 1, max(0, round(x / span_x * (plot_width - 1))))

    def row(y: float) -> int:
        return min(rows - 1, max(0, round((high - y) / (high - low) * (rows - 1))))

    grid: list[list[tuple[str, str]]] = [[(" ", "")] * plot_width for _ in range(rows)]
    marks: dict[tuple[int, int], str] = {}
    series = [
        Series(live, RUNNING_MARK, None, "yellow"),
        Series(train, TRAIN_MARK, TRAIN_LINE, "bold cyan"),
        Series(evals, EVAL_MARK, EVAL_LINE, "bold magenta"),
    ]
    for s in series:  # connectors first, so that every marker stays visible
        if s.line is None:
            continue
        for (x0, y0), (x1, y1) in zip(s.points, s.points[1:], strict=False):
            c0, c1 = column(x0), column(x1)
            for c in range(c0 + 1, c1):
                y = y0 + (y1 - y0) * (c - c0) / (c1 - c0)
                grid[row(y)][c] = (s.line, s.style.replace("bold ", ""))
    for s in series:
        for x, y in s.points:
            cell = (row(y), column(x))
            if (
                marks.get(cell) in (TRAIN_MARK, EVAL_MARK)
                and s.mark in (TRAIN_MARK, EVAL_MARK)
                and marks[cell] != s.mark
            ):
                grid[cell[0]][cell[1]] = (BOTH_MARK, "bold")
                marks[cell] = BOTH_MARK
            else:
                grid[cell[0]][cell[1]] = (s.mark, s.style)
                marks[cell] = s.mark
    labelled = {0: high, rows - 1: low, (rows - 1) // 2: high - (high - low) * ((rows - 1) // 2) / (rows - 1)}
    lines = [legend]
    for r, cells in enumerate(grid):
        line = Text(f"{_number(labelled[r]):>{LABEL_WIDTH}}┤" if r in labelled else " " * LABEL_WIDTH + "│", "dim")
        for glyph, style in cells:
            line.append(glyph, style)
        lines.append(line)
    ticks = {column(float(e)): e for e in range(1, span_x + 1)}
    axis = "".join("┴" if c in ticks else "─" for c in range(plot_width))
    lines.append(Text(" " * LABEL_WIDTH + "└" + axis, "dim"))
    labels = [" "] * plot_width
    for c, e in sorted(ticks.items()):
        text = str(e)
        start = min(max(c - len(text) + 1, 0), plot_width - len(text))
        if all(ch == " " for ch in labels[max(start - 1, 0) : start + len(text)]):
            labels[start : start + len(text)] = list(text)
    lines.append(Text("  epoch".ljust(LABEL_WIDTH + 1) + "".join(labels), "dim"))
    return Text("\n").join(lines)


def _number(value: float) -> str:
    """A loss in at most LABEL_WIDTH characters."""
    text = f"{value:.3g}"
    return text if len(text) <= LABEL_WIDTH else f"{value:.1e}"
