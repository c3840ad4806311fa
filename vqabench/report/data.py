"""The Data table: what loading the data did per run, and what was cut."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vqabench.events import RunStarted
from vqabench.report.model import (
    Cell,
    ReportTable,
    figure,
    word,
)
from vqabench.report.runs import (
    RunData,
    seed_group,
)


def run_quality_report(started: RunStarted | None) -> dict[str, Any] | None:
    """The data quality report a run's worker sent with run_started, or None."""
    quality = started.data.get("quality") if started is not None else None
    return quality if isinstance(quality, dict) else None


def data_cells(quality: dict[str, Any]) -> list[Cell]:
    """Rows read, pairs, skipped (by reason), answer tokens p50/p99/max, limit, truncated."""
    stats = quality.get("token_stats") or {}
    skipped = quality.get("skipped") or {}
    skipped_cell = figure(sum(v for v in skipped.values() if isinstance(v, int)), 0, "rows", details=dict(skipped))
    if skipped:
        skipped_cell.text += " (" + ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items())) + ")"
    limit = figure(stats.get("max_answer_tokens"), 0, "tokens", thousands=True)
    if limit.value is not None and stats.get("max_answer_tokens_setting") == "auto":
        limit.text += " (auto)"
        limit.details["setting"] = "auto"
    return [
        figure(quality.get("rows_read"), 0, "rows", thousands=True),
        figure(quality.get("pairs_built"), 0, "pairs", thousands=True),
        skipped_cell,
        figure(stats.get("p50"), 0, "tokens", thousands=True),
        figure(stats.get("p99"), 0, "tokens", thousands=True),
        figure(stats.get("max"), 0, "tokens", thousands=True),
        limit,
        figure(stats.get("truncated"), 0, "answers", thousands=True),
    ]


DATA_COLUMNS = [
    "Rows read",
    "Pairs",
    "Skipped",
    "Answer tokens p50",
    "p99",
    "max",
    "Answer limit",
    "Truncated",
]


def data_summary(started: RunStarted | None) -> str:
    """The Data table's row of one run as one line, for the console log and the dashboard."""
    quality = run_quality_report(started)
    if quality is None:
        return ""
    rows, pairs, skipped, p50, p99, most, limit, truncated = (c.text for c in data_cells(quality))
    return (
        f"data: {rows} rows read, {pairs} pairs, {skipped} skipped; answer tokens p50 {p50}, p99 {p99}, "
        f"max {most}; answer limit {limit}; {truncated} answers truncated"
    )


def data_table(runs: Sequence[RunData]) -> ReportTable | None:
    """Per run (one row per preset repeated over seeds): what loading the data did, and what was cut."""
    rows: list[list[Cell]] = []
    notes: list[str] = []
    seen: set[str] = set()
    for run in runs:
        quality = run_quality_report(run.started)
        group = seed_group(run.name)
        if quality is None or group in seen:
            continue
        seen.add(group)
        rows.append([word(group), *data_cells(quality)])
        notes += [f"{group}: {warning}" for warning in quality.get("warnings") or [] if isinstance(warning, str)]
    if not rows:
        return None
    notes.insert(
        0,
        "Rows read and pairs built by the data loader, rows skipped by reason; answer lengths in the "
        "model's tokens over the chosen and rejected answers of every split; Answer limit: "
        "max_answer_tokens ((auto) = their p99 over train and eval, capped by the decoder's positions); "
        "Truncated: answers longer than the limit, cut without their end token.",
    )
    columns = ["Run", *DATA_COLUMNS]
    return ReportTable("Data", columns, ["left", "right", "right", "left"] + ["right"] * 5, rows, notes, "data")
