"""The dashboard's charts, drawn with plotext through textual-plotext: loss curves of every
run overlaid, cost bars with interval whiskers, and live telemetry sparklines.

The numbers come from :mod:`vqabench.charts` (which takes them from the report's summaries),
so a chart never disagrees with its table; this module only draws. Each run keeps one colour
and one marker in every chart, in queue order, and a legend names them, so the charts read
without colour too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Sparkline, Static
from textual_plotext import PlotextPlot

from vqabench.charts import STAGES, CostChart, LossCurve, cost_charts, log_scale, loss_curve
from vqabench.report import NA
from vqabench.tui.state import RunView, SessionView

#: One xterm-256 colour per run (plotext and rich both take these numbers) and one marker.
COLORS = (33, 208, 40, 160, 135, 130, 205, 244, 142, 37)
MARKERS = ("●", "■", "▲", "◆", "▼", "+", "x", "*", "o", "#")
STAGE_COLORS = (153, 33)  # SFT stage, preference stage
#: Rows a bar chart needs beyond one per bar: frame top and bottom, x tick labels.
BAR_CHART_ROWS = 3


def run_style(index: int) -> tuple[int, str]:
    """Colour and marker of the run at `index` in queue order."""
    return COLORS[index % len(COLORS)], MARKERS[index % len(MARKERS)]


def legend(names: Sequence[str], indices: dict[str, int]) -> Text:
    """'● sft  ■ orpo …' in each run's colour."""
    text = Text()
    for name in names:
        colour, marker = run_style(indices[name])
        if text:
            text.append("  ")
        text.append(f"{marker} {name}", f"color({colour})")
    return text


class LossPanel(Vertical):
    """Train or eval loss of every run of the session (or the selected one) overlaid; the
    running run's train curve grows with each progress report."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.all_runs = True
        self.kind = "train"
        self.curves: list[LossCurve] = []  # what the plot shows now

    def compose(self) -> ComposeResult:
        yield Static(id="loss-caption")
        yield PlotextPlot(id="loss-plot")
        yield Static(id="loss-legend")

    def show(self, session: SessionView, selected: str | None) -> None:
        runs = list(session.runs.values())
        indices = {r.name: i for i, r in enumerate(runs)}
        chosen = runs if self.all_runs else [r for r in runs if r.name == selected]
        curves = [
            loss_curve(r.name, self.kind, r.epochs, r.running_points if r.status == "running" else ()) for r in chosen
        ]
        curves = self.curves = [c for c in curves if c.points]
        scope = "all runs" if self.all_runs else (selected or "no run selected")
        other = "eval" if self.kind == "train" else "train"
        caption = Text.assemble(
            (f"{self.kind.capitalize()} loss{' (log scale)' if log_scale(curves) else ''}", "bold"),
            f" · {scope}  ",
            (f"l: {other} · s: {'selected run' if self.all_runs else 'all runs'}", "dim"),
        )
        self.query_one("#loss-caption", Static).update(caption)
        plot = self.query_one("#loss-plot", PlotextPlot)
        plot.display = bool(curves)
        self.query_one("#loss-legend", Static).update(
            legend([c.run for c in curves], indices)
            if curves
            else Text(f"no {self.kind} loss yet: no epoch has finished", "dim")
        )
        if not curves:
            return
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        for curve in curves:  # lines first, so that every run's markers stay on top
            colour, _ = run_style(indices[curve.run])
            plt.plot([x for x, _ in curve.points], [y for _, y in curve.points], marker="braille", color=colour)
        for curve in curves:
            colour, marker = run_style(indices[curve.run])
            whole = [(x, y) for x, y in curve.points if float(x).is_integer()]  # finished epochs
            if whole:
                plt.scatter([x for x, _ in whole], [y for _, y in whole], marker=marker, color=colour)
        epochs = max([r.epochs_total for r in chosen] + [int(max(x for c in curves for x, _ in c.points))] + [1])
        plt.xlim(0.8, epochs + 0.2)
        if log_scale(curves):
            plt.yscale("log")
        plt.xticks(list(range(1, epochs + 1)))
        plt.xlabel("epoch")
        plot.refresh()


class CostCharts(Vertical):
    """The efficiency comparison as bars, one chart at a time (`b` shows the next): epoch time
    relative to SFT, time to an aligned model (SFT stage + preference stage), peak memory,
    reference memory; a whisker spans the 95% interval where the number has one."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.chart = 0
        self._charts: list[CostChart] = []
        self._indices: dict[str, int] = {}

    def compose(self) -> ComposeResult:
        yield Static(id="cost-caption")
        yield PlotextPlot(id="cost-plot")

    def show(self, session: SessionView) -> None:
        self._charts = cost_charts(session.summaries())
        self._indices = {r.name: i for i, r in enumerate(session.runs.values())}
        self._draw()

    def next_chart(self) -> None:
        self.chart = (self.chart + 1) % max(len(self._charts), 1)
        self._draw()

    @property
    def count(self) -> int:
        return len(self._charts)

    @property
    def current(self) -> CostChart | None:
        return self._charts[self.chart % len(self._charts)] if self._charts else None

    def _draw(self) -> None:
        chart = self.current
        caption = self.query_one("#cost-caption", Static)
        plot = self.query_one("#cost-plot", PlotextPlot)
        if chart is None:
            caption.update("No runs.")
            plot.display = False
            return
        head = Text.assemble((f"{chart.title} [{chart.unit}] ↓", "bold"))
        if chart.parts:
            for stage, colour in zip(STAGES, STAGE_COLORS, strict=True):
                head.append(f"  █ {stage.split()[0]}", f"color({colour})")
        head.append(f"  {self.chart + 1}/{len(self._charts)} · b: next", "dim")
        caption.update(head)
        measured = chart.measured
        plot.display = bool(measured)
        if not measured:
            caption.update(head.append(f"  {NA}: not measured yet", "dim"))
            return
        plot.styles.height = len(chart.bars) + BAR_CHART_ROWS  # one row per bar keeps labels and bars aligned
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        count = len(chart.bars)
        positions = [float(p) for p in range(count, 0, -1)]  # the first run on top
        top = max([b.high for b in measured if b.high is not None] + [b.value for b in measured if b.value] + [1e-9])
        for pos, bar in zip(positions, chart.bars, strict=True):
            if bar.value is None:
                plt.text(bar.missing, top * 0.01, pos, alignment="left", background="default")
                continue
            stacks = [(p, c) for p, c in zip(bar.parts, STAGE_COLORS, strict=False) if p > 0] if chart.parts else []
            if len(stacks) > 1:
                colours: Any = [c for _, c in stacks]  # one per stack; textual-plotext's hint allows one only
                plt.stacked_bar([pos], [[p] for p, _ in stacks], orientation="horizontal", color=colours, width=0.1)
            else:
                colour = stacks[0][1] if stacks else run_style(self._indices.get(bar.run, int(pos)))[0]
                plt.bar([pos], [bar.value], orientation="horizontal", color=colour, width=0.1)
            if bar.low is not None and bar.high is not None:
                plt.error([(bar.low + bar.high) / 2], [pos], xerr=[(bar.high - bar.low) / 2])
        plt.yticks(positions, [b.run for b in chart.bars])
        plt.ylim(0.5, count + 0.5)
        plt.xlim(0, top * 1.05)
        plot.refresh()


class TelemetryStrip(Horizontal):
    """The selected run's live telemetry from its progress reports: GPU memory and utilisation
    (NVML) on a GPU, resident memory on the CPU. A sparkline only where there are samples; a
    figure that was never measured says n/a, never 0."""

    def compose(self) -> ComposeResult:
        for key in ("memory", "util"):
            yield Static(id=f"telemetry-{key}-label", classes="telemetry-label")
            yield Sparkline([], id=f"telemetry-{key}-spark", classes="telemetry-spark", summary_function=max)

    def show(self, run: RunView | None) -> None:
        samples = list(run.telemetry) if run is not None else []
        self.display = run is not None and (run.started is not None or bool(samples))
        process = [s.gpu_process_mib for s in samples if s.gpu_process_mib is not None]
        device = [s.gpu_device_mib for s in samples if s.gpu_device_mib is not None]
        util = [s.gpu_util for s in samples if s.gpu_util is not None]
        rss = [s.rss_mib for s in samples if s.rss_mib is not None]
        on_gpu = bool(process or device or util) or (run is not None and _uses_nvml(run))
        if on_gpu:
            memory, memory_label = (process, "GPU MiB") if process or not device else (device, "GPU MiB (device)")
            rows = [("memory", memory_label, memory), ("util", "util %", util)]
        else:
            rows = [("memory", "RSS MiB", rss), ("util", "", [])]
        for key, label, values in rows:
            text = self.query_one(f"#telemetry-{key}-label", Static)
            spark = self.query_one(f"#telemetry-{key}-spark", Sparkline)
            text.display = bool(label)
            spark.display = bool(label) and len(values) > 1  # nothing drawn without data
            if not label:
                continue
            now = f"{values[-1]:.0f}" if values else NA
            text.update(Text.assemble(f"{label} ", (now, "bold"), " "))
            spark.data = values


def _uses_nvml(run: RunView) -> bool:
    return run.started is not None and run.started.telemetry == "nvml"
