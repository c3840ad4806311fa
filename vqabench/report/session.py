"""A session's whole report: the first line about the machine, every table, and the runs that did not finish."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from vqabench.report.data import data_table
from vqabench.report.efficiency import efficiency_table, placement_notes
from vqabench.report.epochs import epoch_table
from vqabench.report.model import (
    NA,
    ReportTable,
)
from vqabench.report.probe import probe_table
from vqabench.report.quality import quality_table
from vqabench.report.runs import (
    RunData,
    RunSummary,
    aggregate_seeds,
    mixed_encoder_cache_warning,
    session_run_data,
    status_text,
    summarize_runs,
)
from vqabench.report.tuned import tuned_table
from vqabench.report.versus_sft import versus_sft_table
from vqabench.store import ResultsStore, SessionRecord, TunedRecord


@dataclass
class SessionReport:
    """The whole report: a first line about the machine, tables, and runs that did not finish."""

    header: str
    unfinished: list[str]
    tables: list[ReportTable]  # quality, efficiency
    epoch_tables: list[ReportTable] = field(default_factory=list)  # one per run with epochs
    runs: list[RunData] = field(default_factory=list)  # what the tables were built from (figures draw it)
    summaries: list[RunSummary] = field(default_factory=list)  # one per preset, as in the tables
    session: SessionRecord | None = None  # the machine and versions it ran with (the JSON export has them)
    tuned: list[TunedRecord] = field(default_factory=list)  # a tune session's studies (its figures read them)

    def table(self, name: str) -> ReportTable | None:
        """The table called `name` ("quality", "efficiency", "versus_sft", "data", "probe", "epochs:RUN", ...)."""
        return next((t for t in [*self.tables, *self.epoch_tables] if t.name == name), None)


def build_report(store: ResultsStore, session_id: int, per_seed: bool = False) -> SessionReport:
    """The report of one stored session; runs repeated per seed are averaged (per_seed adds each)."""
    session = store.session(session_id)
    runs = session_run_data(store, session_id)
    summaries = summarize_runs(runs)
    merged = aggregate_seeds(summaries)
    unfinished = [f"{r.name}: {status_text(r.status, r.reason)}" for r in runs if r.status != "done"]
    tables = [quality_table(merged, runs), efficiency_table(merged, mixed_encoder_cache_warning(runs))]
    tables[1].notes += placement_notes(runs)
    versus = versus_sft_table(runs)
    if versus is not None:
        tables.append(versus)
    data = data_table(runs)
    if data is not None:
        tables.append(data)
    tuned = tuned_table(store, session_id)
    if tuned is not None:  # a tune session: the Tuned table first; the other tables show every trial
        tables.insert(0, tuned)
    probe = store.probe(session_id)
    if probe is not None:
        tables = [t for t in tables if t.rows] + [probe_table(*probe)]
    if per_seed and len(merged) < len(summaries):
        for table in (quality_table(summaries, runs), efficiency_table(summaries, mixed_encoder_cache_warning(runs))):
            table.title += " per seed"
            table.name += "_per_seed"
            tables.append(table)
    extra_devices = [probe[0].device] if probe is not None else []
    return SessionReport(
        header_line(session, runs, extra_devices),
        unfinished,
        tables,
        [epoch_table(run) for run in runs if run.epochs],
        runs,
        merged,
        session,
        store.tuned(session_id),
    )


def header_line(session: SessionRecord, runs: Sequence[RunData], devices_too: Sequence[str] = ()) -> str:
    """The first line: machine, device, torch and vqabench versions, date, session."""
    devices = sorted({r.started.device for r in runs if r.started} | set(devices_too))
    torches = sorted({r.started.torch_version for r in runs if r.started})
    machine = session.machine or NA
    if session.processor:
        machine += f" ({session.processor})"
    try:
        date = datetime.fromisoformat(session.started_at).strftime("%Y-%m-%d %H:%M %Z").strip()
    except ValueError:
        date = session.started_at
    return (
        f"Machine {machine} · device {', '.join(devices) or NA} · torch {', '.join(torches) or NA}"
        f" · vqabench {session.vqabench_version or NA} · {date} · session {session.id}"
        f" ({session.label})"
    )
