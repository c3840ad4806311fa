"""The dashboard, driven with Textual's Pilot against the canned-event worker (tests/fake_worker.py):
tables, statuses and the efficiency panel follow the runs; cancel and quit leave no process;
export writes the report's own Markdown; a previous session opens from the store; one SVG
snapshot at 80x24; closing the terminal stops everything."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console
from textual.widgets import OptionList, Static

from vqabench.events import EpochEnded, Progress, RunStarted
from vqabench.figures import FIGURES
from vqabench.headless import run_headless
from vqabench.presets import Overrides, select_presets
from vqabench.report import build_report, report_markdown
from vqabench.runner import RunStatusChanged, WorkerEvent
from vqabench.store import ResultsStore
from vqabench.tui.app import Dashboard
from vqabench.tui.charts import MARKERS, CostCharts, LossPanel, TelemetryStrip
from vqabench.tui.messages import ProgressNotice
from vqabench.tui.state import RunView, SessionView, format_duration
from vqabench.tui.widgets import EfficiencyPanel, PresetPicker, ReportDataTable, RunsTable

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")
FIGURE_FILES = ("loss.svg", "cost.svg", "quality-vs-cost.svg")
FIGURE_CAPTIONS = tuple(caption for _, caption, _ in FIGURES)
SIZE = (80, 24)


def fake_worker_cmd(tmp_path: Path, script: dict) -> list[str]:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(script))
    return [sys.executable, str(FAKE_WORKER), str(path)]


def make_app(
    tmp_path: Path, script: dict, *, results: Path | None = None, selection: str = "sft", epochs: int = 2, **kwargs
) -> Dashboard:
    store = ResultsStore(results or tmp_path / "results")
    return Dashboard(
        store,
        selection=selection,
        overrides=Overrides(epochs=epochs),
        worker_cmd=fake_worker_cmd(tmp_path, script),
        grace_seconds=kwargs.pop("grace_seconds", 1.0),
        cache_dir=tmp_path / "cache",
        **kwargs,
    )


async def wait_for(pilot, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {condition.__doc__ or condition}")
        await pilot.pause(0.05)
    await pilot.pause(0.15)  # let the coalesced redraw happen


def table_rows(table: ReportDataTable) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def shown(app: Dashboard, selector: str) -> str:
    """The plain text a Static widget was last given."""
    return str(app.query_one(selector, Static).content)


def cell(table: RunsTable, run: str, column: str) -> str:
    return str(table.get_cell(run, column))


def alive(pid: int) -> bool:
    """True for a process that exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


CRASH_DPO = {"runs": {"dpo-beta0.5": {"crash_in_epoch": 2}}}
#: The paper's four methods; named, so that presets added later do not change these tests.
FOUR = "sft,orpo,dpo-beta0.1,dpo-beta0.5"


def test_runs_table_epochs_and_efficiency_follow_the_runs_and_a_crash(tmp_path):
    app = make_app(tmp_path, {**CRASH_DPO, "default": {"eval_extra": {"em_ci": [0.55, 0.65]}}}, selection=FOUR)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            runs = app.query_one(RunsTable)
            assert [cell(runs, n, "status") for n in ("sft", "orpo")] == ["planned", "planned"]
            assert "model" not in runs.columns  # 80 columns: the note keeps the room, the detail names the model
            await pilot.press("a")
            await wait_for(pilot, lambda: app.live is not None and app.live.status != "running")
            assert not app.running
            statuses = {n: cell(runs, n, "status") for n in app.live.runs}
            assert statuses == {"sft": "done", "orpo": "done", "dpo-beta0.1": "done", "dpo-beta0.5": "failed"}
            reason = app.live.runs["dpo-beta0.5"].reason
            assert "signal 9" in reason and "during epoch 2 of 2" in reason
            note = cell(runs, "dpo-beta0.5", "note")  # cut to the width left at 80 columns ...
            assert note.startswith("worker exited with") and note.endswith("…")
            assert reason in shown(app, "#detail")  # ... and in full under the table
            assert cell(runs, "sft", "epoch").split() == ["2/2", "██████"]
            assert cell(runs, "dpo-beta0.5", "epoch").split() == ["1/2", "███░░░"]

            # the efficiency panel shows the report's numbers: fake epochs cost 2.0 s (sft), 3.2 s (dpo)
            efficiency = app.query_one("#efficiency-table", ReportDataTable)
            rows = {r[0]: r for r in table_rows(efficiency)}
            assert rows["sft"][1:4] == ["2.00", "1.00", "4.00"]
            assert rows["dpo-beta0.1"][1:4] == ["3.20", "1.60", "10.40"]  # 4.0 s of SFT + 6.4 s of DPO
            assert rows["dpo-beta0.1"][5] == "6.0"  # 6 MiB reference
            assert rows["orpo"][5] == "none"
            assert rows["dpo-beta0.5"][3] == "n/a" and rows["dpo-beta0.5"][6] == "n/a"
            report = build_report(app.store, app.live.session_id)
            cost = next(t for t in report.tables if t.title == "Efficiency")
            assert [[r[0], r[1].split(" s")[0], r[3]] for r in cost.rows] == [r[:3] for r in table_rows(efficiency)]
            quality = next(t for t in report.tables if t.title == "Quality")
            assert quality.rows[1][2] == "0.600 [0.550, 0.650]"  # the report's EM of sft ...
            assert rows["sft"][6] == "0.600"  # ... without the interval, which would not fit
            verdict = shown(app, "#efficiency-verdict")
            assert "Cheapest aligned model: orpo, 4.4 s" in verdict
            assert "2.36× as long" in verdict  # 10.4 s / 4.4 s
            assert app.query_one("#panel-efficiency").has_class("-active")  # shown once the runs end
            panels = ["#panel-epochs", "#panel-loss", "#panel-efficiency", "#panel-log"]
            assert [p for p in panels if app.query_one(p).display] == ["#panel-efficiency"]  # one at 80x24
            assert "−ORPO MiB" not in [str(c.label) for c in efficiency.columns.values()]

            # the selected run's epochs: choose sft with the cursor
            await pilot.press("1")
            runs.move_cursor(row=list(app.live.runs).index("sft"))
            await pilot.pause(0.2)
            epoch_rows = table_rows(app.query_one("#epoch-table", ReportDataTable))
            assert [r[:3] for r in epoch_rows] == [["1", "1.1000", "1.2000"], ["2 ★", "0.6000", "0.6500"]]
            assert "EM 0.600" in shown(app, "#epoch-test")
            assert "trains decoder, fp32" in shown(app, "#epoch-caption")  # what trains and its precision
            assert "blip 1.50M" in shown(app, "#epoch-caption")  # the fake worker's family and 1,500,000 parameters

        stored = {r.name: r.status for r in app.store.runs(1)}
        assert stored == statuses  # recorded through the store as headless does
        assert len(app.store.epochs(next(r.id for r in app.store.runs(1) if r.name == "dpo-beta0.5"))) == 1

    asyncio.run(scenario())


def test_epochs_arrive_live_while_the_run_is_going(tmp_path):
    app = make_app(tmp_path, {"default": {"epoch_sleep": 0.6}}, selection="sft", epochs=3)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("a")
            sft = lambda: app.live.runs["sft"]  # noqa: E731
            await wait_for(pilot, lambda: sft().epochs_done >= 1)
            assert sft().status == "running"
            runs = app.query_one(RunsTable)
            assert cell(runs, "sft", "status") == "running"
            assert cell(runs, "sft", "epoch").split()[0] in ("1/3", "2/3")
            assert len(table_rows(app.query_one("#epoch-table", ReportDataTable))) >= 1
            await wait_for(pilot, lambda: not app.running)
            assert cell(runs, "sft", "status") == "done"
            assert len(table_rows(app.query_one("#epoch-table", ReportDataTable))) == 3

    asyncio.run(scenario())


def test_cancelling_the_selected_run_kills_its_worker_and_grandchild(tmp_path):
    app = make_app(
        tmp_path, {"runs": {"sft": {"hang_in_epoch": 1, "ignore_sigterm": True}}}, selection="sft", grace_seconds=0.5
    )

    async def scenario() -> dict:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("a")
            pids_file = lambda: next((tmp_path / "results" / "runs").glob("*-sft/pids.json"), None)  # noqa: E731
            await wait_for(pilot, lambda: pids_file() is not None)
            pids = json.loads(pids_file().read_text())
            assert alive(pids["worker"]) and alive(pids["grandchild"])
            await pilot.press("c")
            await wait_for(pilot, lambda: not app.running)
            assert cell(app.query_one(RunsTable), "sft", "status") == "cancelled"
            assert "during epoch 1 of 2" in app.live.runs["sft"].reason
            return pids

    pids = asyncio.run(scenario())
    assert not alive(pids["worker"]) and not alive(pids["grandchild"])


def test_quitting_while_a_run_is_going_leaves_no_process(tmp_path):
    app = make_app(
        tmp_path,
        {"runs": {"orpo": {"hang_in_epoch": 1, "ignore_sigterm": True}}},
        selection="orpo,sft",
        grace_seconds=0.5,
    )

    async def scenario() -> dict:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("a")
            pids_file = lambda: next((tmp_path / "results" / "runs").glob("*-orpo/pids.json"), None)  # noqa: E731
            await wait_for(pilot, lambda: pids_file() is not None)
            pids = json.loads(pids_file().read_text())
            await pilot.press("q")
            await wait_for(pilot, lambda: not app.is_running, timeout=10)
            return pids

    pids = asyncio.run(scenario())
    assert app.return_value == 0
    assert not alive(pids["worker"]) and not alive(pids["grandchild"])
    assert {r.name: r.status for r in app.store.runs(1)} == {"orpo": "cancelled", "sft": "cancelled"}


def test_export_writes_the_report_markdown_and_shows_where(tmp_path):
    messages: list[str] = []

    class Recording(Dashboard):
        def notify(self, message: str, **kwargs) -> None:
            messages.append(message)
            super().notify(message, **kwargs)

    app = Recording(
        ResultsStore(tmp_path / "results"),
        selection="sft,orpo",
        overrides=Overrides(epochs=2),
        worker_cmd=fake_worker_cmd(tmp_path, {}),
        cache_dir=tmp_path / "cache",
    )

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("e")  # nothing to export before a session exists
            assert app.last_export is None and messages[-1].startswith("Nothing to export yet")
            await pilot.press("a")
            await wait_for(pilot, lambda: app.live is not None and not app.running)
            await pilot.press("e")
            await wait_for(pilot, lambda: app.last_export is not None)
            path = tmp_path / "results" / "report-session-1.md"
            assert app.last_export == path.resolve()
            figures = path.parent / "report-session-1_files"
            links = [(c, f"report-session-1_files/{n}") for c, n in zip(FIGURE_CAPTIONS, FIGURE_FILES, strict=True)]
            assert path.read_text() == report_markdown(build_report(app.store, 1), links)
            assert sorted(f.name for f in figures.iterdir()) == sorted(FIGURE_FILES)
            assert "exported report-session-1.md" in shown(app, "#title")
            assert messages[-1] == f"Wrote {path.resolve()} and 3 SVG figure(s) in report-session-1_files/"

    asyncio.run(scenario())


def test_a_previous_session_opens_from_the_store(tmp_path):
    results = tmp_path / "results"
    script = fake_worker_cmd(tmp_path, {"runs": {"orpo": {"fail_in_epoch": 2}}})
    code = run_headless(
        "sft,orpo",
        Overrides(epochs=2),
        results,
        worker_cmd=script,
        cache_dir=tmp_path / "cache",
        console=Console(file=io.StringIO()),
    )
    assert code == 1
    app = make_app(tmp_path, {}, results=results, selection="sft")

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("o")
            await pilot.pause(0.2)
            await pilot.press("enter")  # the newest session is listed first
            await pilot.pause(0.3)
            assert app.view.session_id == 1 and not app.view.live
            runs = app.query_one(RunsTable)
            assert cell(runs, "sft", "status") == "done"
            assert cell(runs, "orpo", "status") == "failed"
            assert app.view.runs["orpo"].reason == "the loss became NaN in epoch 2."
            assert "the loss became NaN" in shown(app, "#detail")
            rows = {r[0]: r for r in table_rows(app.query_one("#efficiency-table", ReportDataTable))}
            assert rows["sft"][1] == "2.00" and rows["orpo"][1] == "2.20"
            await pilot.press("c")  # a stored session cannot be cancelled: a message, no change
            assert cell(runs, "orpo", "status") == "failed"

    asyncio.run(scenario())


def test_the_preset_picker_starts_only_the_chosen_presets(tmp_path):
    app = make_app(tmp_path, {}, selection=FOUR)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("p")
            await pilot.pause(0.2)
            picker = app.screen
            assert isinstance(picker, PresetPicker)
            assert picker.chosen == {"sft", "orpo", "dpo-beta0.1", "dpo-beta0.5"}  # the --preset selection
            lines = [str(o.prompt) for o in picker.query_one(OptionList).options]
            assert lines[0].startswith("[x] dpo-beta0.1") and any(line.startswith("[ ] mllm-dpo-sft") for line in lines)
            options = picker.query_one(OptionList)
            for index, line in enumerate(lines):  # switch off all but dpo-beta0.1, with the space key
                if line.startswith("[x]") and not line.startswith("[x] dpo-beta0.1 "):
                    options.highlighted = index
                    await pilot.press("space")
            assert picker.chosen == {"dpo-beta0.1"}
            sft = next(i for i, line in enumerate(lines) if line.startswith("[x] sft "))
            assert str(options.get_option_at_index(sft).prompt).startswith("[ ] sft ")
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.live is not None and not app.running)
            # dpo-beta0.1 starts from sft, so sft is added, as with --preset dpo-beta0.1
            assert list(app.live.runs) == ["sft", "dpo-beta0.1"]
            assert [r.status for r in app.live.runs.values()] == ["done", "done"]

    asyncio.run(scenario())


def test_a_wide_terminal_shows_every_panel_and_the_peak_minus_orpo_column(tmp_path):
    app = make_app(tmp_path, {}, selection="sft,orpo")

    async def scenario() -> None:
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.press("a")
            await wait_for(pilot, lambda: app.live is not None and not app.running)
            panels = ["#panel-epochs", "#panel-loss", "#panel-efficiency", "#panel-log"]
            assert all(app.query_one(p).display and app.query_one(p).size.height > 5 for p in panels)
            assert not app.query_one("#panel-tabs").display
            efficiency = app.query_one("#efficiency-table", ReportDataTable)
            headers = [str(c.label) for c in efficiency.columns.values()]
            assert headers[5] == "−ORPO MiB"
            rows = {r[0]: r for r in table_rows(efficiency)}
            assert rows["orpo"][5] == "0.0" and rows["sft"][5] == "0.0"  # same fake memory
            runs = app.query_one(RunsTable)  # wide enough for the Model column
            assert [cell(runs, n, "model") for n in ("sft", "orpo")] == ["blip 1.50M"] * 2

    asyncio.run(scenario())


def test_a_burst_of_progress_costs_one_update_per_run(tmp_path):
    handled: list[ProgressNotice] = []

    class Counting(Dashboard):
        def on_progress_notice(self, message: ProgressNotice) -> None:
            handled.append(message)
            super().on_progress_notice(message)

    store = ResultsStore(tmp_path / "results")
    app = Counting(store, selection="sft")

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            spec = select_presets("sft").specs[0]
            app.live = SessionView.planned([spec])
            app.live.apply(RunStatusChanged("sft", "running", pid=1), 0.0)
            for step in range(1, 201):  # queued in one go, as a burst from the worker would be
                event = Progress(phase="train", epoch=1, step=step, steps=200, running_loss=1.0 / step)
                app._on_runner_note(WorkerEvent("sft", event, ""))
            await pilot.pause(0.3)
            assert 1 <= len(handled) < 20
            assert app.live.runs["sft"].step == 200  # the latest report won

    asyncio.run(scenario())


def plot_text(app: Dashboard, selector: str) -> str:
    """What a plotext chart draws, without colours."""
    from textual_plotext import PlotextPlot

    plot = app.query_one(selector, PlotextPlot)
    return str(plot.render().plain) if plot.display else ""


#: The fake worker's sessions for the chart views: progress reports carry telemetry, dpo-beta0.5 crashes.
CHARTS = {"default": {"telemetry": True, "eval_extra": {"em_ci": [0.55, 0.7]}}, **CRASH_DPO}


def test_the_loss_tab_overlays_every_run_and_toggles_scope_and_kind(tmp_path):
    app = make_app(tmp_path, CHARTS, selection=FOUR, epochs=3)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("a")
            await wait_for(pilot, lambda: app.live is not None and not app.running)
            await pilot.press("2")
            await pilot.pause(0.2)
            panel = app.query_one(LossPanel)
            legend = shown(app, "#loss-legend")
            names = list(app.live.runs)  # queue order: each run keeps its marker in every chart
            assert legend == "  ".join(f"{MARKERS[i]} {n}" for i, n in enumerate(names))
            assert "Train loss · all runs" in shown(app, "#loss-caption")
            # one curve per run, in queue order; dpo-beta0.5 crashed in epoch 2
            assert {c.run: len(c.points) for c in panel.curves} == {n: 1 if n == "dpo-beta0.5" else 3 for n in names}
            assert [c.run for c in panel.curves] == names
            plot = plot_text(app, "#loss-plot")
            assert MARKERS[len(names) - 1] in plot  # the last run's markers lie on top where curves meet
            assert "epoch" in plot and "3" in plot.splitlines()[-2]  # the x axis runs to epoch 3

            await pilot.press("l")  # eval loss: the same runs
            await pilot.pause(0.2)
            assert panel.kind == "eval" and "Eval loss · all runs" in shown(app, "#loss-caption")
            sft_index = names.index("sft")
            runs = app.query_one(RunsTable)
            runs.move_cursor(row=sft_index)
            await pilot.press("s")  # the selected run alone
            await pilot.pause(0.2)
            assert not panel.all_runs and "Eval loss · sft" in shown(app, "#loss-caption")
            assert shown(app, "#loss-legend") == f"{MARKERS[sft_index]} sft"
            plot = plot_text(app, "#loss-plot")
            assert MARKERS[sft_index] in plot and not any(
                MARKERS[i] in plot for i in range(len(names)) if i != sft_index
            )
            # the eval loss of the fake sft run: 1.2 after epoch 1, 1.1/3 + 0.1 ≈ 0.467 after 3
            assert "1.2" in plot and "0.4" in plot

    asyncio.run(scenario())


def test_the_running_runs_loss_curve_grows_per_progress_event(tmp_path):
    store = ResultsStore(tmp_path / "results")
    app = Dashboard(store, selection="sft")

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            spec = select_presets("sft").specs[0]
            app.live = SessionView.planned([spec])
            app._show_view(app.live)
            app.live.apply(RunStatusChanged("sft", "running", pid=1), 0.0)
            await pilot.press("2")
            await pilot.pause(0.2)
            assert "no train loss yet" in shown(app, "#loss-legend")
            assert not app.query_one("#loss-plot").display  # nothing drawn without data
            counts = []
            for step in (1, 2, 3):
                event = Progress(phase="train", epoch=1, step=step, steps=4, running_loss=2.0 - 0.5 * step)
                app._on_runner_note(WorkerEvent("sft", event, ""))
                await pilot.pause(0.2)
                counts.append(plot_text(app, "#loss-plot").count(MARKERS[0]))
            assert app.query_one("#loss-plot").display
            # the running loss is drawn as a line (braille) and grows; markers mark finished epochs only
            assert counts == [0, 0, 0]
            assert len(app.live.runs["sft"].running_points) == 3
            assert "1.5" in plot_text(app, "#loss-plot") and "0.5" in plot_text(app, "#loss-plot")

    asyncio.run(scenario())


def test_the_efficiency_tab_draws_the_reports_cost_as_bars(tmp_path):
    app = make_app(tmp_path, CHARTS, selection=FOUR)

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("a")
            await wait_for(pilot, lambda: app.live is not None and not app.running)
            panel = app.query_one(EfficiencyPanel)
            assert panel.has_class("-active") and not panel.charts_shown  # the table first at 80x24
            assert "b: bar charts" in shown(app, "#efficiency-verdict")
            charts = app.query_one(CostCharts)
            titles = []
            for _ in range(4):
                await pilot.press("b")
                await pilot.pause(0.2)
                assert panel.charts_shown and not app.query_one("#efficiency-numbers").display
                titles.append(shown(app, "#cost-caption").split(" [")[0])
                plot = plot_text(app, "#cost-plot")
                for run in app.live.runs:  # a labelled row per run
                    assert f"{run}┤" in plot
                if charts.current.key == "aligned_seconds":
                    assert "n/a" in plot  # dpo-beta0.5 crashed: no time to an aligned model, not 0
                    assert "█ SFT  █ preference" in shown(app, "#cost-caption")
                    assert [b.parts for b in charts.current.bars if b.run == "dpo-beta0.1"] == [(4.0, 6.4)]
                if charts.current.key == "reference_mib":
                    assert "none" in plot  # sft and orpo keep no reference
            assert titles == [
                "Epoch time relative to SFT",
                "Time to an aligned model",
                "Peak memory",
                "Reference memory",
            ]
            await pilot.press("b")  # after the last chart, the table again
            await pilot.pause(0.2)
            assert not panel.charts_shown and app.query_one("#efficiency-numbers").display

    asyncio.run(scenario())


def test_telemetry_sparklines_show_rss_on_cpu_gpu_on_gpu_and_n_a_without_samples(tmp_path):
    app = make_app(tmp_path, {"default": {"telemetry": True}, "runs": {"orpo": {"cuda": True}}}, selection="sft,orpo")

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("a")
            await wait_for(pilot, lambda: app.live is not None and not app.running)
            await pilot.press("1")
            runs = app.query_one(RunsTable)
            strip = app.query_one(TelemetryStrip)
            runs.move_cursor(row=list(app.live.runs).index("sft"))
            await pilot.pause(0.2)
            assert shown(app, "#telemetry-memory-label").split() == [
                "RSS",
                "MiB",
                "542",
            ]  # 500 + 10·4 + epoch 2, the last report
            assert not app.query_one("#telemetry-util-label").display  # no GPU figure on the CPU
            assert app.query_one("#telemetry-memory-spark").display
            runs.move_cursor(row=list(app.live.runs).index("orpo"))
            await pilot.pause(0.2)
            assert shown(app, "#telemetry-memory-label").split() == ["GPU", "MiB", "1100"]
            assert shown(app, "#telemetry-util-label").split() == ["util", "%", "80"]
            util = list(app.query_one("#telemetry-util-spark").data)
            # a burst of progress reports coalesces into its latest, so some samples may be skipped
            assert len(util) >= 2 and util[-1] == 80.0 and set(util) <= {50.0, 60.0, 70.0, 80.0}

            # the same session from the store: no live samples, so n/a and no sparkline (never 0)
            stored = SessionView.from_store(app.store, app.store.session(1))
            strip.show(stored.runs["sft"])
            await pilot.pause(0.1)
            assert shown(app, "#telemetry-memory-label").split() == ["RSS", "MiB", "n/a"]
            assert not app.query_one("#telemetry-memory-spark").display

    asyncio.run(scenario())


def replay_session(app: Dashboard) -> None:
    """A finished session fed to the dashboard's handlers one notification at a time, in order
    (no queue, so no progress report coalesces and no pid varies): sft and dpo-beta0.1 on the
    CPU, orpo on a GPU, dpo-beta0.5 killed in its second epoch. Snapshots need this much
    determinism; the same views driven by real workers are checked by content above."""
    from fake_worker import canned_events

    from vqabench.runner import RunnerFinished, RunQueued
    from vqabench.tui.messages import notice_for

    specs = select_presets(FOUR, Overrides(epochs=2)).specs
    app.live = SessionView.planned(specs)
    app.live.session_id, app.live.label, app.live.live, app.live.status = 1, "replayed", True, "running"
    app._show_view(app.live)
    notes: list = [RunQueued(s.name, s, i) for i, s in enumerate(specs)]
    statuses = {}
    for pid, spec in enumerate(specs, 4001):
        notes.append(RunStatusChanged(spec.name, "running", pid=pid))
        crash = spec.name == "dpo-beta0.5"
        for event in canned_events(spec.to_dict(), 2, cuda=spec.name == "orpo", telemetry=True):
            notes.append(WorkerEvent(spec.name, event, ""))
            if crash and isinstance(event, EpochEnded):
                break
        status = "failed" if crash else "done"
        reason = "worker exited with signal 9 (killed) during epoch 2 of 2" if crash else ""
        notes.append(RunStatusChanged(spec.name, status, reason))
        statuses[spec.name] = status
    notes.append(RunnerFinished(statuses, cancelled=False))
    for note in notes:
        app.on_runner_notice(notice_for(note))


def chart_views(app: Dashboard, keys: str, select: str | None = None):
    """run_before for a snapshot: replay the session, select a run, then press `keys`."""

    async def run_before(pilot) -> None:
        replay_session(app)
        await pilot.pause(0.2)
        app.clear_notifications()
        runs = app.query_one(RunsTable)
        if select is not None:
            runs.move_cursor(row=list(app.view.runs).index(select))
        for key in keys:
            await pilot.press(key)
        await pilot.pause(0.2)
        # The runs table's columns only grow ("running" -> "done" keeps the wider column) until a
        # resize rebuilds them, and when that happens depends on timing: rebuild now, as a resize would.
        runs.on_resize()
        await pilot.pause(0.3)

    return run_before


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
@pytest.mark.parametrize(
    "view, keys, select",
    [("loss", "2", None), ("cost-bars", "3bb", None), ("telemetry-gpu", "1", "orpo"), ("telemetry-cpu", "1", "sft")],
)
def test_chart_views_snapshot(tmp_path, snap_compare, view, keys, select, size):
    app = Dashboard(
        ResultsStore(tmp_path / "results"), selection=FOUR, overrides=Overrides(epochs=2), clock=lambda: 1000.0
    )
    assert snap_compare(app, terminal_size=size, run_before=chart_views(app, keys, select))


def test_dashboard_snapshot_at_80x24_after_runs_end(tmp_path, monkeypatch, snap_compare):
    monkeypatch.chdir(tmp_path)  # the title names the results folder relative to here
    app = make_app(tmp_path, CRASH_DPO, results=Path("results"), selection=FOUR, clock=lambda: 1000.0)

    async def run_all(pilot) -> None:
        await pilot.press("a")
        await wait_for(pilot, lambda: app.live is not None and not app.running)
        app.clear_notifications()
        await pilot.pause(0.2)
        app.query_one(RunsTable).on_resize()  # rebuild the columns now, as chart_views does
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_all)


def test_eta_uses_the_pace_of_the_phase_and_the_finished_epochs():
    view = RunView("sft", "sft", epochs_planned=3, status="running")
    started = RunStarted(
        run="sft",
        method="sft",
        config={},
        device="cpu",
        torch_version="x",
        trainable_params=1,
        total_params=1,
        reference_strategy=None,
        reference_bytes=0,
        epochs=3,
        steps_per_epoch=10,
        telemetry="n/a",
    )
    view.apply_event(started, 0.0)
    view.apply_event(Progress("train", 1, 2, 10, 0.9), 100.0)
    assert view.eta(100.0) is None  # one report: no pace yet
    view.apply_event(Progress("train", 1, 4, 10, 0.8), 104.0)  # 2 s per step
    assert view.eta(104.0) == pytest.approx(6 * 2.0 + 2 * 20.0)
    epoch = EpochEnded(
        epoch=1,
        epochs=3,
        train_loss=0.8,
        eval_loss=0.9,
        epoch_seconds=18.0,
        eval_seconds=2.0,
        samples_per_s=1.0,
        lr=1e-4,
        peak_rss_mib=1.0,
        reference_bytes=0,
        chosen_logp=-1.0,
        rejected_logp=-2.0,
        reward_margin=1.0,
        pref_accuracy=0.5,
        is_best=True,
    )
    view.apply_event(epoch, 120.0)
    view.apply_event(Progress("train", 2, 1, 10, 0.7), 121.0)
    view.apply_event(Progress("train", 2, 6, 10, 0.6), 126.0)  # 1 s per step
    assert view.eta(126.0) == pytest.approx(4 * 1.0 + 1 * 20.0)  # later epochs: the finished one's 20 s
    assert view.eta(130.0) == pytest.approx(20.0)  # counts down between reports
    assert view.activity() == "6/10 loss 0.600"
    assert view.progress_fraction() == pytest.approx((1 + 0.6) / 3)
    assert [x for x, _ in view.running_points] == [pytest.approx(1.1), pytest.approx(1.6)]
    assert format_duration(3725) == "1:02:05" and format_duration(65.4) == "1:05"


def test_a_bad_preset_selection_is_one_sentence_before_the_screen_opens(tmp_path, capsys):
    from vqabench.cli import main

    assert main(["--preset", "nope", "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vqabench: --preset names 'nope'") and err.count("\n") == 1


def test_the_dashboards_state_and_chart_data_modules_do_not_import_textual():
    """The host modules are checked in test_import_hygiene.py; the dashboard's model and the
    chart data it draws are UI-free too."""
    code = (
        "import sys; import vqabench.tui.state, vqabench.charts; "
        "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.')); "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, f"textual imported: {proc.stdout} {proc.stderr}"


def test_closing_the_terminal_stops_the_runs_and_the_dashboard(tmp_path):
    """`vqabench` on a real pseudo-terminal: start a run, hang up the terminal (as closing a
    window or `tmux kill-session` does); the worker and its child die and the app exits."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    script = fake_worker_cmd(tmp_path, {"default": {"hang_in_epoch": 1}})
    argv = [
        sys.executable,
        "-m",
        "vqabench.cli",
        "--preset",
        "sft",
        "--results",
        str(tmp_path / "r"),
        "--worker-cmd",
        " ".join(script),
    ]
    env = dict(os.environ, TERM="xterm-256color")
    pid, master = pty.fork()
    if pid == 0:  # the child: the dashboard, with the pty as its controlling terminal
        os.chdir(Path(__file__).resolve().parent.parent)
        os.execve(sys.executable, argv, env)
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))

    def drain() -> None:  # a terminal reads what the app writes
        while True:
            try:
                if not os.read(master, 65536):
                    return
            except OSError:
                return

    threading.Thread(target=drain, daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        pids_file = None
        while pids_file is None and time.monotonic() < deadline:
            os.write(master, b"a")  # start all (again until the app is up; later presses are refused)
            time.sleep(0.5)
            pids_file = next((tmp_path / "r" / "runs").glob("*/pids.json"), None)
        assert pids_file is not None, "the run did not start"
        pids = json.loads(pids_file.read_text())
        assert alive(pids["worker"]) and alive(pids["grandchild"])
    finally:
        os.close(master)  # hang up
    deadline = time.monotonic() + 20
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError("the dashboard did not exit after the terminal hung up")
    assert os.waitstatus_to_exitcode(done[1]) == 129
    time.sleep(0.2)
    assert not alive(pids["worker"]) and not alive(pids["grandchild"])
    with ResultsStore(tmp_path / "r", create=False) as store:
        assert [r.status for r in store.runs(1)] == ["cancelled"]


def test_key_t_probes_the_step_cost_and_shows_it_under_efficiency(tmp_path):
    app = make_app(tmp_path, {}, selection="sft,dpo-beta0.1,dpo-beta0.5")

    async def scenario() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("t")
            await wait_for(pilot, lambda: app.probe_worker is not None and app.probe_worker.is_finished)
            text = shown(app, "#efficiency-probe")
            assert "Stored as session 1." in text and "Step cost probe" in text
            row = next(line for line in text.splitlines() if line.startswith("| dpo-beta0.1 "))
            assert "dpo (copy)" in row and "64.0 (" in row  # the fake probe: 40 ms x DPO's 1.6
            assert app.query_one("#panel-efficiency").has_class("-active")
            started, measured = app.store.probe(1)
            assert started.presets == ["sft", "dpo-beta0.1", "dpo-beta0.5"] and len(measured) == 9


def test_key_u_tunes_the_selection_and_shows_the_tuned_table(tmp_path):
    from vqabench.tui.app import TUNE_TRIALS
    from vqabench.tune.session import DEFAULT_TRIALS

    assert TUNE_TRIALS == DEFAULT_TRIALS  # the dashboard's default is the tune core's
    # the fake's eval loss does not follow the setting: trial 0 (the preset's own) is made worse by 0.3
    app = make_app(tmp_path, {"runs": {"sft.trial0": {"eval_loss_offset": 0.3}}}, epochs=1, tune_trials=2)

    async def scenario() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("u")
            await wait_for(pilot, lambda: app.tune_worker is not None and app.tune_worker.is_finished, 60)
            text = shown(app, "#efficiency-tuned")
            assert "Tuning session 1 ended." in text
            row = next(line for line in text.splitlines() if line.startswith("| sft "))
            # 2 trials of 2; the fake's SFT eval loss after one epoch is 1.1 + 0.1; trial 0 carries +0.3
            assert "2 of 2" in row and "1.2000 (trial 1)" in row and "1.5000" in row
            assert app.live is not None and app.view is app.live and app.live.status == "done"
            assert list(app.live.runs) == ["sft.trial0", "sft.trial1", "sft.tuned"]
            assert app.query_one("#panel-efficiency").has_class("-active")
            (record,) = app.store.tuned(1)
            assert (record.complete, record.best_trial, record.tuned_run) == (2, 1, "sft.tuned")
            assert app.store.session(1).command.endswith("(dashboard: tune)")
            # a stored tune session opened later shows its Tuned table, read from the store
            app.query_one(EfficiencyPanel).show_tuned(None)
            app._show_view(SessionView.from_store(app.store, app.store.session(1)))
            await pilot.pause(0.1)
            assert (
                next(line for line in shown(app, "#efficiency-tuned").splitlines() if line.startswith("| sft ")) == row
            )

    asyncio.run(scenario())


def test_concurrent_runs_show_their_gpus_in_the_runs_table(tmp_path, monkeypatch):
    monkeypatch.setenv("VQABENCH_VISIBLE_GPUS", "0,1")  # two fake devices: the runner only hands out ids
    app = Dashboard(
        ResultsStore(tmp_path / "results"),
        selection="sft,orpo",
        overrides=Overrides(epochs=2, settings=("gpus=[0,1]",)),
        worker_cmd=fake_worker_cmd(tmp_path, {"default": {"epoch_sleep": 1.0}}),
        grace_seconds=1.0,
        cache_dir=tmp_path / "cache",
    )

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            runs = app.query_one(RunsTable)
            await pilot.press("a")

            def both_running() -> bool:
                """sft and orpo running at the same time"""
                return app.live is not None and all(v.status == "running" for v in app.live.runs.values())

            await wait_for(pilot, both_running)
            shown_status = sorted(cell(runs, n, "status") for n in ("sft", "orpo"))
            assert shown_status == ["running · GPU 0", "running · GPU 1"]
            await wait_for(pilot, lambda: app.live is not None and app.live.status != "running")

    asyncio.run(scenario())


def test_the_efficiency_panel_shows_each_runs_own_scores_under_the_starting_models_row(tmp_path):
    app = make_app(tmp_path, {"default": {"base_event": True}}, selection="sft,orpo")

    async def scenario() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("a")
            await wait_for(pilot, lambda: app.live is not None and app.live.status != "running")
            rows = table_rows(app.query_one("#efficiency-table", ReportDataTable))
            # the fake worker's base scores are EM 0.3, F1 0.35; its sft and orpo score 0.60 and 0.66
            assert rows[0][0] == "base" and rows[0][1:6] == ["–"] * 5 and rows[0][6:8] == ["0.300", "0.350"]
            scores = {r[0]: r[6] for r in rows[1:]}
            assert scores == {"sft": "0.600", "orpo": "0.660"}

    asyncio.run(scenario())
