"""SVG figures for the exported report: loss curves, cost bars, quality against cost; for a tune
session, the best eval objective against trials spent and each method's parameter importance
(read from the study storage the results store names; left out, with one sentence, where it
cannot be opened).

Drawn with matplotlib's SVG canvas (no display, no pyplot state), from the data of
:mod:`vqabench.charts`, which takes every number from the report's own summaries. Each run's
series carries an SVG id (``gid``) that names the run, so a reader or a test can find it.
matplotlib is imported inside :func:`write_figures` only: importing this module stays cheap
and the headless start-up does not pay for it. No textual import here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vqabench.charts import LOSS_KINDS, CostChart, cost_charts, log_scale, loss_curves, quality_vs_cost
from vqabench.report import SessionReport

#: One colour and marker per run, in queue order (matplotlib's tab10 colours).
COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")
STAGE_COLORS = ("#9ecae1", "#3182bd")  # SFT stage, preference stage


@dataclass(frozen=True)
class Figure:
    """A written figure: what it shows (the Markdown caption) and where it is."""

    caption: str
    path: Path


class FigureError(Exception):
    """A figure could not be written (one sentence naming the file)."""


def figures_dir(report_path: Path) -> Path:
    """Where the figures of `report.md` go: `report_files/` next to it."""
    return report_path.with_name(f"{report_path.stem}_files")


def series_id(*parts: str) -> str:
    """An SVG id from its parts: characters other than letters, digits, '.', '_' and '-' become '_'."""
    return "-".join(re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in parts)


def write_figures(report: SessionReport, folder: Path) -> list[Figure]:
    """Write loss.svg, cost.svg and quality-vs-cost.svg (those with data) into `folder`; for a tune
    session also tune-convergence.svg and tune-importance.svg."""
    import matplotlib
    from matplotlib.figure import Figure as MplFigure  # no pyplot: no backend, no display

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FigureError(f"cannot create the figures folder {folder} ({exc.strerror}).") from None
    colours = {r.name: i for i, r in enumerate(report.runs)}
    colours.update({s.name: i for i, s in enumerate(report.summaries) if s.name not in colours})
    written = []
    with matplotlib.rc_context({"svg.hashsalt": "vqabench", "font.size": 9}):
        for name, caption, draw in (*FIGURES, *TUNE_FIGURES):
            figure = MplFigure(layout="constrained")
            if not draw(figure, report, colours):
                continue
            path = folder / name
            try:
                figure.savefig(path, format="svg", metadata={"Date": None})
            except OSError as exc:
                raise FigureError(f"cannot write {path} ({exc.strerror}).") from None
            written.append(Figure(caption, path))
        if report.tuned:
            importance = _importance(report)
            if importance is not None:
                figure, caption = importance
                path = folder / "tune-importance.svg"
                try:
                    figure.savefig(path, format="svg", metadata={"Date": None})
                except OSError as exc:
                    raise FigureError(f"cannot write {path} ({exc.strerror}).") from None
                written.append(Figure(caption, path))
    return written


def best_so_far(trials: Sequence[Sequence[Any]]) -> list[float | None]:
    """The best (lowest) eval objective after each trial spent, in trial order; None before one completes."""
    best: float | None = None
    curve: list[float | None] = []
    for _number, state, value in trials:
        if state == "COMPLETE" and value is not None and (best is None or value < best):
            best = float(value)
        curve.append(best)
    return curve


def _convergence(figure: Any, report: SessionReport, colours: dict[str, int]) -> bool:
    """Best eval objective against trials spent, one line per tuned preset (who converges with less)."""
    curves = [(r.preset, r.objective, best_so_far(r.trials)) for r in report.tuned]
    curves = [c for c in curves if any(v is not None for v in c[2])]
    if not curves:
        return False
    ax = figure.subplots()
    for preset, objective, curve in curves:
        xs = [i + 1 for i, v in enumerate(curve) if v is not None]
        ys = [v for v in curve if v is not None]
        ax.step(
            xs,
            ys,
            where="post",
            label=f"{preset} ({objective})",
            gid=series_id("tune", preset),
            **_style(colours, preset),
        )
    ax.set_xlabel("trials spent")
    ax.set_ylabel("best eval objective (lower is better)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, loc="best")
    return True


def open_tuned_study(storage: str, name: str) -> Any:
    """The study `name` in the recorded storage, or None when it cannot be opened here (another
    machine's file, a server out of reach, a password that was not recorded)."""
    import optuna

    if "***" in storage:
        return None
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        return None  # sqlite would create an empty file
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except Exception:
        return None


def _importance(report: SessionReport) -> tuple[Any, str] | None:
    """Optuna's parameter importance per tuned preset, with a caption that says where there is none;
    None (and one sentence in the Tuned table's notes) when no study can be opened."""
    import optuna
    from matplotlib.figure import Figure as MplFigure

    studies = [(r, open_tuned_study(r.storage, r.study)) for r in report.tuned]
    if all(study is None for _, study in studies):
        table = report.table("tuned")
        storages = ", ".join(sorted({r.storage for r in report.tuned}))
        if table is not None:
            table.notes.append(
                f"The study storage {storages} cannot be opened here, so the parameter importance figure is left out."
            )
        return None
    figure = MplFigure(layout="constrained", figsize=(6.4, 1.2 + 1.1 * len(studies)))
    axes = figure.subplots(len(studies), 1, squeeze=False)[:, 0]
    said: list[str] = []
    for ax, (record, study) in zip(axes, studies, strict=True):
        ax.set_title(record.preset, fontsize=8, loc="left")
        reason = None
        if study is None:
            reason = "its study cannot be opened here"
        else:
            complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            searched = {k for t in complete for k in t.params}
            if len(complete) < 2:
                reason = f"{len(complete)} complete trial(s), too few to rank parameters"
            elif len(searched) < 2:
                reason = f"one parameter searched ({', '.join(sorted(searched)) or 'none'}), nothing to rank"
            else:
                try:
                    importances = optuna.importance.get_param_importances(study)
                except (ValueError, RuntimeError) as exc:
                    reason = f"Optuna could not rank its parameters ({exc})"
                else:
                    names = list(importances)[::-1]
                    ax.barh(names, [importances[n] for n in names], gid=series_id("importance", record.preset))
                    ax.set_xlim(0, 1)
        if reason is not None:
            said.append(f"{record.preset}: {reason}")
            ax.text(0.5, 0.5, reason, ha="center", va="center", fontsize=8, transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[-1].set_xlabel("importance (Optuna's get_param_importances; sums to 1 per method)")
    caption = "Parameter importance per method (Optuna's get_param_importances over its complete trials)"
    if said:
        caption += "; no ranking for " + "; ".join(said)
    return figure, caption


def _style(colours: dict[str, int], run: str) -> dict[str, Any]:
    index = colours.get(run, len(colours)) % len(COLORS)
    return {"color": COLORS[index], "marker": MARKERS[index % len(MARKERS)]}


def _loss(figure: Any, report: SessionReport, colours: dict[str, int]) -> bool:
    curves = {kind: loss_curves(report.runs, kind) for kind in LOSS_KINDS}
    if not any(curves.values()):
        return False
    figure.set_size_inches(9, 3.6)
    axes = figure.subplots(1, 2, sharey=True)
    for ax, kind in zip(axes, LOSS_KINDS, strict=True):
        for curve in curves[kind]:
            xs, ys = [x for x, _ in curve.points], [y for _, y in curve.points]
            (line,) = ax.plot(xs, ys, label=curve.run, linewidth=1.5, markersize=5, **_style(colours, curve.run))
            line.set_gid(series_id("loss", kind, curve.run))
        ax.set_title(f"{kind} loss")
        if log_scale([c for k in LOSS_KINDS for c in curves[k]]):
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss ↓")
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center", frameon=False)
    return True


def _cost(figure: Any, report: SessionReport, colours: dict[str, int]) -> bool:
    charts = [c for c in cost_charts(report.summaries) if c.measured]
    if not charts:
        return False
    rows = max(len(report.summaries), 1)
    figure.set_size_inches(10, 1.2 + 0.55 * rows * ((len(charts) + 1) // 2))
    axes = figure.subplots((len(charts) + 1) // 2, min(len(charts), 2), squeeze=False).ravel()
    for ax, chart in zip(axes, charts, strict=False):  # a spare axes is hidden below
        _cost_axes(ax, chart, colours)
    for ax in axes[len(charts) :]:
        ax.set_visible(False)
    return True


def _cost_axes(ax: Any, chart: CostChart, colours: dict[str, int]) -> None:
    names = [b.run for b in chart.bars]
    ys = list(range(len(names)))
    for y, bar in zip(ys, chart.bars, strict=True):
        style = _style(colours, bar.run)
        if bar.value is None:
            ax.text(0, y, f" {bar.missing}", va="center", ha="left", color="#555555")
            continue
        if chart.parts and bar.parts:
            left = 0.0
            for stage, width, colour in zip(chart.parts, bar.parts, STAGE_COLORS, strict=True):
                if width <= 0:
                    continue
                (rect,) = ax.barh(y, width, left=left, color=colour, edgecolor=style["color"], linewidth=1.2)
                rect.set_gid(series_id("bar", chart.key, bar.run, stage))
                left += width
        else:
            (rect,) = ax.barh(y, bar.value, color=style["color"], alpha=0.85)
            rect.set_gid(series_id("bar", chart.key, bar.run))
        if bar.low is not None and bar.high is not None:
            ax.errorbar(
                bar.value,
                y,
                xerr=[[bar.value - bar.low], [bar.high - bar.value]],
                fmt="none",
                ecolor="black",
                capsize=3,
                linewidth=1,
            ).lines[2][0].set_gid(series_id("whisker", chart.key, bar.run))
    if chart.parts:
        from matplotlib.patches import Patch

        ax.legend(
            handles=[Patch(color=c, label=p) for p, c in zip(chart.parts, STAGE_COLORS, strict=True)],
            loc="lower right",
            fontsize=7,
        )
    ax.set_yticks(ys, names)
    ax.invert_yaxis()
    ax.set_title(chart.title)
    ax.set_xlabel(f"{chart.unit} ↓")
    ax.grid(axis="x", alpha=0.3)
    if chart.key == "relative_epoch_time":
        ax.axvline(1.0, color="#555555", linewidth=0.8, linestyle="--")


def _quality(figure: Any, report: SessionReport, colours: dict[str, int]) -> bool:
    data = quality_vs_cost(report.summaries)
    if not data.points:
        return False
    figure.set_size_inches(7, 4.2)
    ax = figure.subplots()
    for p in data.points:
        style = _style(colours, p.run)
        yerr = None
        if p.low is not None and p.high is not None:
            yerr = [[p.em - p.low], [p.high - p.em]]
        container = ax.errorbar(
            p.cost,
            p.em,
            yerr=yerr,
            fmt=style["marker"],
            color=style["color"],
            markersize=8 if p.pareto else 6,
            markeredgecolor="black" if p.pareto else style["color"],
            capsize=3,
            label=f"{p.run}{' (Pareto front)' if p.pareto else ''}",
        )
        container.lines[0].set_gid(series_id("point", p.run))
        ax.annotate(p.run, (p.cost, p.em), textcoords="offset points", xytext=(6, 4), fontsize=8)
    front = sorted((p.cost, p.em) for p in data.points if p.pareto)
    if len(front) > 1:
        (line,) = ax.plot(
            [c for c, _ in front],
            [q for _, q in front],
            color="black",
            linewidth=1,
            linestyle="--",
            drawstyle="steps-post",
        )
        line.set_gid("pareto-front")
    ax.set_xlabel("time to an aligned model [s] ↓")
    ax.set_ylabel("EM on the test split ↑")
    ax.set_title("Quality against cost (dashed: Pareto front)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return True


def figure_links(figures: Sequence[Figure], report_path: Path) -> list[tuple[str, str]]:
    """(caption, path relative to the report) of each figure, for report_markdown."""
    base = report_path.parent.resolve()
    return [(f.caption, f.path.resolve().relative_to(base).as_posix()) for f in figures]


#: (file name, caption, drawing function) of each figure, in the order the report shows them.
FIGURES: tuple[tuple[str, str, Callable[[Any, SessionReport, dict[str, int]], bool]], ...] = (
    ("loss.svg", "Train and eval loss per epoch, all runs", _loss),
    ("cost.svg", "What each method costs (whiskers: 95% interval where there is one)", _cost),
    ("quality-vs-cost.svg", "Quality against cost: EM (95% interval) vs time to an aligned model", _quality),
)
#: The figures of a tune session beside them (drawn only where the session has tuned presets); the
#: parameter importance figure follows, its caption naming the methods it could not rank.
TUNE_FIGURES: tuple[tuple[str, str, Callable[[Any, SessionReport, dict[str, int]], bool]], ...] = (
    ("tune-convergence.svg", "Tuning: best eval objective against trials spent, per method", _convergence),
)
