"""The dashboard's panels: runs table, per-epoch table, efficiency panel, worker log, and the
two pickers (presets to start, a previous session to open); the charts are in
:mod:`vqabench.tui.charts`.

Every panel draws from a :class:`~vqabench.tui.state.SessionView` or one of its
:class:`~vqabench.tui.state.RunView`; cell texts of the per-epoch and efficiency tables
are the report's own (:mod:`vqabench.report`), under shorter headers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, OptionList, RichLog, Static
from textual.widgets.option_list import Option

from vqabench.report import (
    MIB,
    NA,
    ReportTable,
    base_rows,
    data_summary,
    efficiency_table,
    encoder_cache_text,
    epoch_table,
    markdown_table,
    model_label,
    quality_table,
    reference_text,
    trains_label,
)
from vqabench.runner import CANCELLED, DONE, FAILED, QUEUED, RUNNING, SKIPPED
from vqabench.store import SessionRecord
from vqabench.tui.charts import CostCharts, TelemetryStrip
from vqabench.tui.state import (
    PLANNED,
    RunView,
    SessionView,
    cheapest_alignment,
    format_duration,
    progress_bar,
)

STATUS_STYLES = {
    PLANNED: "dim",
    QUEUED: "",
    RUNNING: "bold yellow",
    DONE: "bold green",
    FAILED: "bold red",
    SKIPPED: "magenta",
    CANCELLED: "magenta",
}
BAR_WIDTH = 6


def status_text(status: str) -> Text:
    return Text(status, STATUS_STYLES.get(status, ""))


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


class RunsTable(DataTable):
    """One row per run: preset, method, model (family and size, once the worker said), status, epoch
    and bar, elapsed time, ETA, and a note: what it does now, its test scores, or why it ended."""

    COLUMNS = (
        ("Run", "run"),
        ("Method", "method"),
        ("Model", "model"),
        ("Status", "status"),
        ("Epoch", "epoch"),
        ("Time", "elapsed"),
        ("ETA", "eta"),
        ("Note", "note"),
    )
    #: Narrower than this, the Model column is left out (the selected run's detail line names it).
    MODEL_MIN_WIDTH = 100

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)  # type: ignore[arg-type]
        self._names: list[str] = []
        self._columns: tuple[tuple[str, str], ...] = ()
        self._last: tuple[SessionView, float, str | None] | None = None
        self.user_moved = False  # the user moved the cursor: stop following the running run

    def action_cursor_up(self) -> None:
        self.user_moved = True
        super().action_cursor_up()

    def action_cursor_down(self) -> None:
        self.user_moved = True
        super().action_cursor_down()

    async def _on_click(self, event: events.Click) -> None:
        self.user_moved = True
        await super()._on_click(event)

    def on_mount(self) -> None:
        self._set_columns()

    def _shown_columns(self) -> tuple[tuple[str, str], ...]:
        """All columns; below MODEL_MIN_WIDTH the model is left to the run's detail line, so the note keeps room."""
        if self.size.width and self.size.width < self.MODEL_MIN_WIDTH:
            return tuple(c for c in self.COLUMNS if c[1] != "model")
        return self.COLUMNS

    def _set_columns(self) -> None:
        self._columns = self._shown_columns()
        self.clear(columns=True)
        for label, key in self._columns:
            self.add_column(label, key=key)
        self._names = []

    def show(self, session: SessionView, now: float, selected: str | None) -> None:
        """Redraw every row; keep the cursor on `selected`. The note is cut to the width left."""
        self._last = (session, now, selected)
        if self._shown_columns() != self._columns:
            self._set_columns()
        keys = [key for _, key in self.COLUMNS]
        picks = [keys.index(key) for _, key in self._columns]
        names = list(session.runs)
        rows = [[full[i] for i in picks] for full in (self._cells(session.runs[n], now) for n in names)]
        fixed = sum(
            max([len(label), *(len(str(row[i])) for row in rows)]) for i, (label, _) in enumerate(self._columns[:-1])
        )
        note_width = max(self.size.width - fixed - 2 * self.cell_padding * len(self._columns) - 1, 12)
        rows = [[*row[:-1], _truncate(row[-1], note_width)] for row in rows]
        if names != self._names:
            self.clear()
            for name, cells in zip(names, rows, strict=True):
                self.add_row(*cells, key=name)
            self._names = names
        else:
            for name, cells in zip(names, rows, strict=True):
                for (_, key), value in zip(self._columns, cells, strict=True):
                    self.update_cell(name, key, value, update_width=True)
        if selected in names and self.cursor_row != names.index(selected):
            self.move_cursor(row=names.index(selected))

    def on_resize(self) -> None:
        if self._last is not None:
            self._names = []  # rebuild, so that columns fit the new width
            self.show(*self._last)

    @staticmethod
    def _cells(run: RunView, now: float) -> list:
        total = run.epochs_total
        epoch = run.epochs_done
        if run.status == RUNNING and run.phase == "train":
            epoch = run.epoch
        counter = f"{epoch}/{total}" if total else "-"
        eta = run.eta(now)
        return [
            run.name,
            run.method,
            model_label(run.started) or "-",
            status_text(run.status) + (f" · {run.device}" if run.device else ""),
            f"{counter:>5} {progress_bar(run.progress_fraction(), BAR_WIDTH)}",
            format_duration(run.elapsed(now)),
            format_duration(eta) if eta is not None else "-",
            run.activity(),
        ]


class ReportDataTable(DataTable):
    """A DataTable filled from a report table's cells, numbers right-aligned."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="none", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self._shown: tuple | None = None

    def show_rows(self, headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> None:
        key = (tuple(headers), tuple(tuple(r) for r in rows))
        if key == self._shown:
            return
        self._shown = key
        self.clear(columns=True)
        for i, (header, is_right) in enumerate(zip(headers, right, strict=True)):
            width = max([len(header)] + [len(row[i]) for row in rows])  # explicit: drawn at once, no measuring pass
            self.add_column(Text(header, justify="right" if is_right else "left"), width=width)
        for row in rows:
            self.add_row(*(Text(c, justify="right" if r else "left") for c, r in zip(row, right, strict=True)))


def _column(table: ReportTable, prefix: str) -> int | None:
    """Index of the report column whose header starts with `prefix`."""
    return next((i for i, c in enumerate(table.columns) if c.startswith(prefix)), None)


def _cells(table: ReportTable, prefix: str) -> list[str]:
    index = _column(table, prefix)
    return [row[index] if index is not None else NA for row in table.rows]


class EpochPanel(Vertical):
    """The selected run's epochs: losses, time, memory, preference accuracy, scores."""

    def compose(self) -> ComposeResult:
        yield Static(id="epoch-caption")
        yield TelemetryStrip(id="epoch-telemetry")
        yield ReportDataTable(id="epoch-table")
        yield Static(id="epoch-test")

    def show(self, run: RunView | None) -> None:
        caption = self.query_one("#epoch-caption", Static)
        test = self.query_one("#epoch-test", Static)
        table = self.query_one("#epoch-table", ReportDataTable)
        self.query_one(TelemetryStrip).show(run)
        if run is None:
            caption.update("No run selected.")
            table.show_rows([], [], [])
            test.update("")
            return
        head = Text.assemble((run.name, "bold"), f" ({run.method}) ", status_text(run.status))
        if run.started is not None:
            reference = reference_text(run.started)
            trains = trains_label(run.started)
            head.append(
                f" · {model_label(run.started)} · {run.started.device} · trains {trains}, {run.started.precision}"
                f" · {run.started.trainable_params:,} trained params · reference: {reference}"
            )
            cache = encoder_cache_text(run.started)
            if cache not in (None, "off"):  # the study's setting goes without saying
                head.append(f" · encoder cache: {cache}")
            summary = data_summary(run.started)
            if summary:
                head.append(f"\n{summary}")
        caption.update(head)
        report = epoch_table(run.run_data())
        memory_header = "CUDA MiB" if any("CUDA" in c for c in report.columns) else "RSS MiB"
        wanted = [
            ("Epoch", "Epoch"),
            ("Train loss", "Train"),
            ("Eval loss", "Eval"),
            ("Epoch time", "Time s"),
            ("Peak", memory_header),
            ("Pref. accuracy", "Pref acc"),
            ("Reward margin", "Margin"),
            ("EM", "EM"),
            ("F1", "F1"),
            ("Judge", "Judge"),
        ]
        present = [(p, h) for p, h in wanted if _column(report, p) is not None]
        columns = [_cells(report, p) for p, _ in present]
        keeps_reference = run.started is None or run.started.reference_strategy is not None
        reference_cells = [_mib(e.reference_bytes) if keeps_reference else "none" for e in run.epochs]
        headers = [h for _, h in present]
        after_memory = [p for p, _ in present].index("Peak") + 1
        headers.insert(after_memory, "Ref MiB")
        columns.insert(after_memory, reference_cells)
        rows = [list(r) for r in zip(*columns, strict=False)] if run.epochs else []
        table.show_rows(headers, rows, [True] * len(headers))
        if run.final_eval is not None:
            e = run.final_eval
            line = f"test split ({e.n} questions): EM {e.em:.3f} · F1 {e.f1:.3f}"
            if e.judge_score is not None:
                line += f" · judge {e.judge_score:.3f} ({e.judge}, n={e.judge_n})"
            test.update(line)
        elif not run.epochs:
            test.update("no epoch finished yet" if run.status in (RUNNING, QUEUED, PLANNED) else "")
        else:
            test.update("★ best epoch so far (lowest eval loss)" if any(e.is_best for e in run.epochs) else "")


def _point(cell: str) -> str:
    """A report score cell without its bracketed interval ("0.658 [0.628, 0.687]" -> "0.658")."""
    return cell.split(" [", 1)[0]


def _mib(value: int | None) -> str:
    return f"{value / MIB:.1f}" if value else "0.0"


#: What the efficiency columns mean (left out on short terminals; docs/dashboard.md has it too).
LEGEND = Text(
    "s/epoch: mean training time of an epoch; ×SFT: that time relative to SFT on the same "
    "model, data, trained part and precision; Aligned s: training time including the runs it "
    "starts from and the encoding pass it reads; base: the starting model's scores; −ORPO MiB "
    "(on wide screens): peak memory minus the ORPO run's; Ref MiB: the frozen reference model "
    "(none: no reference). EM/F1/Judge on the test split; the exported report adds their "
    "95% intervals.",
    "dim",
)


class EfficiencyPanel(Horizontal):
    """Every run side by side: cost (epoch time, ratio to SFT, time to aligned model,
    memory, reference memory) and quality (EM, F1, judge), as the report computes them, and
    the cost as bar charts: beside the table where the panel is wide enough, else instead of
    it (`b` goes from the table through the charts and back)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._session: SessionView | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="efficiency-numbers"):
            yield ReportDataTable(id="efficiency-table")
            yield Static(id="efficiency-verdict")
            yield Static(id="efficiency-timing")
            yield Static(id="efficiency-probe")
            tuned = Static(id="efficiency-tuned")
            tuned.display = False  # only for a tune session (key u, or one opened from the store)
            yield tuned
            yield Static(LEGEND, id="efficiency-legend")
        yield CostCharts(id="efficiency-charts")

    #: From this panel width on, the "Peak − ORPO" column fits too.
    WIDE = 92
    #: From this panel width on, the charts stand beside the table.
    SIDE_BY_SIDE = 130

    @property
    def side_by_side(self) -> bool:
        return self.has_class("-side")

    @property
    def charts_shown(self) -> bool:
        return self.side_by_side or self.has_class("-charts")

    def cycle(self) -> None:
        """`b`: table, then each chart, then the table again (beside the table: each chart in turn)."""
        charts = self.query_one(CostCharts)
        if self.side_by_side:
            charts.next_chart()
        elif not self.has_class("-charts"):
            charts.chart = 0
            self.add_class("-charts")
            if self._session is not None:
                charts.show(self._session)
        elif charts.chart + 1 >= charts.count:
            self.remove_class("-charts")
        else:
            charts.next_chart()

    def show(self, session: SessionView) -> None:
        self._session = session
        self.set_class(self.size.width >= self.SIDE_BY_SIDE, "-side")
        if self.charts_shown:
            self.query_one(CostCharts).show(session)
        summaries = session.summaries()
        cost = efficiency_table(summaries)
        runs = session.run_data()
        quality = quality_table(summaries, runs)
        memory = next((c for c in cost.columns if c.startswith("Peak") and not c.startswith("Peak −")), "Peak")
        memory_header = {"Peak CUDA memory [MiB] ↓": "CUDA MiB", "Peak RSS [MiB] ↓": "RSS MiB"}.get(memory, "Peak MiB")
        wide = not self.side_by_side and self.size.width >= self.WIDE
        headers = [
            "Run",
            "s/epoch",
            "×SFT",
            "Aligned s",
            memory_header,
            *(["−ORPO MiB"] if wide else []),
            "Ref MiB",
            "EM",
            "F1",
            "Judge",
        ]
        columns = [
            _cells(cost, "Method"),
            [c.split(" s", 1)[0] for c in _cells(cost, "Epoch time")],  # the median; the spread is in the export
            [_point(c) for c in _cells(cost, "Relative")],
            _cells(cost, "Time to aligned"),
            _cells(cost, memory),
            *([_cells(cost, "Peak −")] if wide else []),
            _cells(cost, "Reference"),
        ]
        # Quality rows by name: the quality table also holds the starting model ("base"), which has no cost.
        scores = {row[0]: [_point(c) for c in row] for row in quality.rows}
        picks = [_column(quality, name) for name in ("EM", "F1", "Judge")]

        def scored(name: str) -> list[str]:
            row = scores.get(name)
            return [row[i] if row is not None and i is not None else NA for i in picks]

        base = [[name, *["–"] * (len(columns) - 1), *scored(name)] for name, _ in base_rows(runs)]
        rows = base + [[*r, *scored(r[0])] for r in zip(*columns, strict=False)]
        self.query_one("#efficiency-table", ReportDataTable).show_rows(
            headers, rows, [False] + [True] * (len(headers) - 1)
        )
        verdict = Text(cheapest_alignment(summaries), "bold")
        verdict.append(("  " if verdict else "") + "b: bar charts", "dim")
        self.query_one("#efficiency-verdict", Static).update(verdict)
        warnings = [s.timing_warning for s in summaries if s.timing_warning]
        self.query_one("#efficiency-timing", Static).update(Text("\n".join(warnings), "yellow"))

    def show_probe(self, table: ReportTable | None, news: str = "") -> None:
        """The latest `vqabench probe` result (key t), or a line about the probe under way."""
        text = Text(news + ("\n" if news and table else ""))
        if table is not None:
            text.append("Step cost probe (same batches, interleaved rounds, one process)\n", "bold")
            text.append("\n".join(markdown_table(table)) + "\n")
            text.append("\n".join(table.notes[:2]), "dim")
        self.query_one("#efficiency-probe", Static).update(text)

    def show_tuned(self, table: ReportTable | None, news: str = "") -> None:
        """A tune session's Tuned table (key u, or a stored tune session), or a line about tuning under way."""
        text = Text(news + ("\n" if news and table else ""))
        if table is not None:
            text.append("Tuned (selected on eval; the best setting retrained, then scored on test once)\n", "bold")
            text.append("\n".join(markdown_table(table)) + "\n")
            text.append("\n".join(table.notes[1:]), "dim")
        widget = self.query_one("#efficiency-tuned", Static)
        widget.update(text)
        widget.display = bool(text.plain)

    def on_resize(self) -> None:
        if self._session is not None:
            self.show(self._session)


class LogPanel(Vertical):
    """The selected run's status, its reason in full, and the tail of its worker's stderr."""

    def compose(self) -> ComposeResult:
        yield Static(id="log-status")
        yield RichLog(id="log-lines", max_lines=500, wrap=True, markup=False, highlight=False)

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._shown_run: int | None = None  # id() of the RunView the log holds lines of
        self._written = 0  # how many of its lines (RunView.stderr_total) are in the log
        self._placeholder = ""

    def show(self, run: RunView | None) -> None:
        status = self.query_one("#log-status", Static)
        log = self.query_one("#log-lines", RichLog)
        if run is None:
            status.update("No run selected.")
            self._replace(log, None, "")
            return
        line = Text.assemble((run.name, "bold"), " ", status_text(run.status))
        if run.pid is not None:
            line.append(f" · pid {run.pid}")
        if run.reason:
            line.append(f": {run.reason}")
        if run.invalid_lines:
            line.append(f" · {run.invalid_lines} stdout line(s) were not events", "yellow")
        status.update(line)
        if id(run) != self._shown_run:
            self._replace(log, run, "")
        if run.stderr_total == 0:
            placeholder = (
                "(not started)"
                if run.status in (PLANNED, QUEUED)
                else "(no log lines yet)"
                if run.status == RUNNING
                else "(the worker wrote no log lines)"
            )
            if placeholder != self._placeholder:
                self._replace(log, run, placeholder)
            return
        if self._placeholder:
            self._replace(log, run, "")
        new = run.stderr_total - self._written
        if new > 0:
            kept = list(run.stderr)
            for text in kept[-min(new, len(kept)) :]:
                log.write(Text(text))
            self._written = run.stderr_total

    def _replace(self, log: RichLog, run: RunView | None, placeholder: str) -> None:
        log.clear()
        if placeholder:
            log.write(Text(placeholder, "dim"))
        self._shown_run = id(run) if run is not None else None
        self._written = 0
        self._placeholder = placeholder


class PresetPicker(ModalScreen[list[str] | None]):
    """Choose presets to start: space (or a click) toggles, enter starts, escape goes back.

    The choice is written as [x] / [ ] in each line, so it reads without colour.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss_none", "Back"),
        Binding("space", "choose", "Choose"),
        Binding("enter", "start", "Start", priority=True),
    ]

    def __init__(self, presets: Sequence[tuple[str, str, str]], chosen: Sequence[str], overrides: str) -> None:
        super().__init__()
        self.presets = list(presets)  # (name, method, description)
        self.chosen = {name for name, _, _ in self.presets if name in set(chosen)}
        self.overrides = overrides
        self._width = max((len(n) for n, _, _ in self.presets), default=8)

    def compose(self) -> ComposeResult:
        with Vertical(id="picker"):
            yield Static(
                Text.assemble(
                    ("Start presets", "bold"), f" — space: choose · enter: start · escape: back{self.overrides}"
                )
            )
            yield OptionList(
                *(Option(self._prompt(i), id=name) for i, (name, _, _) in enumerate(self.presets)), id="preset-list"
            )

    def _prompt(self, index: int) -> Text:
        name, method, description = self.presets[index]
        box = "[x]" if name in self.chosen else "[ ]"
        room = max(int(self.app.size.width * 0.9) - 10, 30)  # one line per preset in the picker
        line = _truncate(f"{box} {name:<{self._width}}  {method:<6} {description}", room)
        return Text(line, style="bold" if name in self.chosen else "")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def toggle(self, index: int) -> None:
        name = self.presets[index][0]
        self.chosen.symmetric_difference_update({name})
        self.query_one("#preset-list", OptionList).replace_option_prompt_at_index(index, self._prompt(index))

    def action_choose(self) -> None:
        index = self.query_one("#preset-list", OptionList).highlighted
        if index is not None:
            self.toggle(index)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.toggle(event.option_index)

    def action_start(self) -> None:
        self.dismiss([name for name, _, _ in self.presets if name in self.chosen])

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class SessionPicker(ModalScreen[int | None]):
    """Open a session from the results store (the live one included); escape goes back."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss_none", "Back")]

    def __init__(self, sessions: Sequence[SessionRecord], run_counts: dict[int, int], live_id: int | None) -> None:
        super().__init__()
        self.sessions = sessions
        self.run_counts = run_counts
        self.live_id = live_id

    def compose(self) -> ComposeResult:
        with Vertical(id="picker"):
            yield Static(Text.assemble(("Open a session", "bold"), " — enter: open · escape: back"))
            options = []
            for s in self.sessions:
                live = " (live)" if s.id == self.live_id else ""
                started = s.started_at.replace("T", " ")[:16]
                options.append(
                    Option(
                        f"#{s.id:<3} {started}  {s.status:<9} {self.run_counts.get(s.id, 0)} run(s)"
                        f"  {s.selection or '-'}{live}",
                        id=str(s.id),
                    )
                )
            if not options:
                options.append(Option("the results store holds no session yet", id="none", disabled=True))
            yield OptionList(*options, id="session-list")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id and event.option.id.isdigit():
            self.dismiss(int(event.option.id))

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
