"""The Data table: what loading the data did per run, and what was cut."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vqabench.events import RunStarted
from vqabench.report.model import (
    NA,
    ReportTable,
    fmt_int,
)
from vqabench.report.runs import (
    RunData,
    seed_group,
)


def run_quality_report(started: RunStarted | None) -> dict[str, Any] | None:
    """The data quality report a run's worker sent with run_started, or None."""
    quality = started.data.get("quality") if started is not None else None
    return quality if isinstance(quality, dict) else None


def data_cells(quality: dict[str, Any]) -> list[str]:
    """Rows read, pairs, skipped (by reason), answer tokens p50/p99/max, limit, truncated."""
    stats = quality.get("token_stats") or {}
    skipped = quality.get("skipped") or {}
    skipped_text = str(sum(v for v in skipped.values() if isinstance(v, int)))
    if skipped:
        skipped_text += " (" + ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items())) + ")"
    limit = fmt_int(stats.get("max_answer_tokens"))
    if limit != NA and stats.get("max_answer_tokens_setting") == "auto":
        limit += " (auto)"
    return [
        fmt_int(quality.get("rows_read")),
        fmt_int(quality.get("pairs_built")),
        skipped_text,
        fmt_int(stats.get("p50")),
        fmt_int(stats.get("p99")),
        fmt_int(stats.get("max")),
        limit,
        fmt_int(stats.get("truncated")),
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
    rows, pairs, skipped, p50, p99, most, limit, truncated = data_cells(quality)
    return (
        f"data: {rows} rows read, {pairs} pairs, {skipped} skipped; answer tokens p50 {p50}, p99 {p99}, "
        f"max {most}; answer limit {limit}; {truncated} answers truncated"
    )


def data_table(runs: Sequence[RunData]) -> ReportTable | None:
    """Per run (one row per preset repeated over seeds): what loading the data did, and what was cut."""
    rows, notes, seen = [], [], set()
    for run in runs:
        quality = run_quality_report(run.started)
        group = seed_group(run.name)
        if quality is None or group in seen:
            continue
        seen.add(group)
        rows.append([group, *data_cells(quality)])
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
    return ReportTable("Data", columns, ["left", "right", "right", "left"] + ["right"] * 5, rows, notes)
