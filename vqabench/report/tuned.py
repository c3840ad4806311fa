"""The Tuned table: per preset of a `vqabench tune` session, its best setting and what tuning it cost.

Read from the results store (:meth:`~vqabench.store.ResultsStore.tuned`, written by `tune` when
its studies end) and the tuned runs' test scores, so the export, the dashboard and `tune`'s own
console summary draw the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vqabench.events import Evaluated
from vqabench.report.model import Cell, ReportTable, figure, is_interval, missing, word
from vqabench.report.runs import score_cell
from vqabench.store import ResultsStore, TunedRecord

TUNED_COLUMNS = [
    "Preset",
    "Best setting",
    "Trials",
    "Pruned",
    "Failed",
    "Best eval objective",
    "Preset's setting",
    "Test EM ↑",
    "Test F1 ↑",
    "Judge ↑",
    "Tuning",
    "To a tuned model",
]

TUNED_NOTE = (
    "Selected on eval only: each preset's trials (the same budget for every preset) are scored on the "
    "eval split; the best trial's setting is then retrained once and only that run is scored on test. "
    "Trials: run of the budget; Pruned: stopped early by Optuna's MedianPruner; Failed: ended without "
    "a result. Best eval objective: the lowest eval loss (eval_loss) or eval NLL of the chosen answers "
    "(chosen_nll) of a trial, with its number; Preset's setting: the same for trial 0, the preset's own "
    "setting (n/a when it lies outside the space or did not finish). Test scores: the retrained best "
    "setting, with 95% intervals. Tuning: every trial's wall time, whichever process ran it; To a tuned "
    "model: tuning and retraining this preset plus the preset it starts from (SFT's for SFT→DPO)."
)


def tuned_table(store: ResultsStore, session_id: int) -> ReportTable | None:
    """The session's Tuned table; None when it is not a tune session."""
    records = store.tuned(session_id)
    if not records:
        return None
    runs = {r.name: r for r in store.runs(session_id)}
    tests: dict[str, Evaluated | None] = {}
    statuses: dict[str, str] = {}
    for record in records:
        run = runs.get(record.tuned_run or "")
        if run is not None:
            tests[record.preset] = next((e for e in store.evals(run.id) if e.split == "test"), None)
            statuses[record.preset] = run.status
    return tuned_report_table(records, tests, statuses)


def tuned_report_table(
    records: Sequence[TunedRecord], tests: dict[str, Evaluated | None], statuses: dict[str, str] | None = None
) -> ReportTable:
    """The Tuned table from the stored records and each tuned run's test scores (by preset)."""
    statuses = statuses or {}
    rows = [_row(record, tests.get(record.preset)) for record in records]
    notes = [TUNED_NOTE]
    for record in records:
        status = statuses.get(record.preset)
        if record.tuned_run is None:
            notes.append(f"{record.preset}: no tuned run (no trial finished, or tuning was stopped).")
        elif status is not None and status != "done":
            notes.append(f"{record.preset}: its tuned run {record.tuned_run} is {status}.")
    align = ["left", "left"] + ["right"] * (len(TUNED_COLUMNS) - 2)
    return ReportTable("Tuned", list(TUNED_COLUMNS), align, rows, notes, "tuned")


def setting_text(params: dict[str, Any]) -> str:
    """A setting as "lr 1.2e-04, beta 0.25" (floats with 3 significant digits)."""
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def _row(record: TunedRecord, test: Evaluated | None) -> list[Cell]:
    setting = word(setting_text(record.best_params) or None)
    setting.details.update({k: v for k, v in record.best_params.items() if isinstance(v, (int, float, str, bool))})
    trials = figure(record.complete + record.pruned + record.failed, 0, "trials", details={"budget": record.budget})
    trials.text += f" of {record.budget}"
    best = figure(record.best_value, 4, "loss", details={"objective": record.objective})
    if best.value is not None and record.best_trial is not None:
        best.details["trial"] = record.best_trial
        best.text += f" (trial {record.best_trial})"
    to_tuned = figure(record.to_tuned_seconds, 1, "s")
    if record.after:
        to_tuned.details["after"] = record.after
        to_tuned.text += f" (with {record.after})"
    return [
        word(record.preset),
        setting,
        trials,
        figure(record.pruned, 0, "trials"),
        figure(record.failed, 0, "trials"),
        best,
        figure(record.preset_value, 4, "loss", details={"objective": record.objective}),
        *(_score(test, key) for key in ("em", "f1", "judge")),
        figure(record.tuning_seconds, 1, "s"),
        to_tuned,
    ]


def _score(test: Evaluated | None, key: str) -> Cell:
    if test is None:
        return missing("n/a", "fraction")
    value = test.judge_score if key == "judge" else getattr(test, key)
    interval = test.extra.get(f"{key}_ci")
    return score_cell(value, interval if is_interval(interval) else None)
