"""The Tuned section's data: per tuned preset, its best setting, what tuning cost and the one test score.

Rows come from the study storage (every process's trials) and the results store (the tuned
run's test scores); the console summary renders them, and the report can render the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
from optuna.trial import TrialState

from vqabench.events import Evaluated
from vqabench.store import ResultsStore, TunedRecord


@dataclass
class TunedRow:
    """One tuned preset: its study's outcome, its tuned run's test scores, and its cost in seconds."""

    preset: str
    method: str
    after: str | None
    study: str
    objective: str
    budget: int
    complete: int
    pruned: int
    failed: int
    best_params: dict[str, Any] = field(default_factory=dict)
    best_value: float | None = None
    best_trial: int | None = None
    preset_value: float | None = None  # the objective of the preset's own setting (trial 0), when it finished
    tuned_run: str | None = None
    status: str = ""  # the tuned run's status; "" when there is none
    test: Evaluated | None = None  # its test scores (intervals in test.extra["em_ci"], ...)
    tuning_seconds: float = 0.0  # every trial's wall time (worker start to end), whichever process ran it
    retrain_seconds: float = 0.0  # the tuned run's wall time, from the store (whole seconds)
    to_tuned_seconds: float = 0.0  # tuning and retraining this preset and the one it starts from
    trial_values: list[list[Any]] = field(default_factory=list)  # [number, state, value] per trial

    def record(self, storage: str) -> TunedRecord:
        """The row as the results store keeps it (the report's Tuned table reads it back); `storage`
        is the study's URL without its password."""
        return TunedRecord(
            preset=self.preset,
            method=self.method,
            after=self.after,
            storage=storage,
            study=self.study,
            objective=self.objective,
            budget=self.budget,
            complete=self.complete,
            pruned=self.pruned,
            failed=self.failed,
            best_params=dict(self.best_params),
            best_value=self.best_value,
            best_trial=self.best_trial,
            preset_value=self.preset_value,
            tuned_run=self.tuned_run,
            tuning_seconds=self.tuning_seconds,
            retrain_seconds=self.retrain_seconds,
            to_tuned_seconds=self.to_tuned_seconds,
            trials=[list(t) for t in self.trial_values],
        )

    @property
    def trials(self) -> int:
        return self.complete + self.pruned + self.failed


def tuned_rows(
    store: ResultsStore, session_id: int, storage: optuna.storages.BaseStorage, studies: Sequence[tuple[str, str]]
) -> list[TunedRow]:
    """The rows of `studies` ((preset, study name) in tuning order) with the session's tuned runs."""
    runs = {r.name: r for r in store.runs(session_id)}
    rows: dict[str, TunedRow] = {}
    for preset, name in studies:
        study = optuna.load_study(storage=storage, study_name=name)
        trials = study.get_trials(deepcopy=False)
        count = {s: sum(1 for t in trials if t.state == s) for s in TrialState}
        tuned = runs.get(f"{preset}.tuned")
        attrs = study.user_attrs
        row = TunedRow(
            preset=preset,
            method=str(attrs.get("method", "")),
            after=attrs.get("after"),
            study=name,
            objective=str(attrs.get("objective", "")),
            budget=int(attrs.get("budget", len(trials))),
            complete=count[TrialState.COMPLETE],
            pruned=count[TrialState.PRUNED],
            failed=count[TrialState.FAIL],
            tuning_seconds=sum(float(t.user_attrs.get("seconds") or 0.0) for t in trials),
            trial_values=[[t.number, t.state.name, t.value] for t in sorted(trials, key=lambda t: t.number)],
        )
        own = [t for t in trials if t.user_attrs.get("preset_setting") and t.state == TrialState.COMPLETE]
        row.preset_value = own[0].value if own else None
        if row.complete:
            best = study.best_trial
            row.best_params, row.best_value, row.best_trial = dict(best.params), best.value, best.number
        if tuned is not None:
            row.tuned_run, row.status = tuned.name, tuned.status
            row.retrain_seconds = _wall_seconds(tuned.started_at, tuned.finished_at)
            row.test = next((e for e in store.evals(tuned.id) if e.split == "test"), None)
        start = rows.get(row.after) if row.after else None
        row.to_tuned_seconds = row.tuning_seconds + row.retrain_seconds + (start.to_tuned_seconds if start else 0.0)
        rows[preset] = row
    return list(rows.values())


def _wall_seconds(started_at: str | None, finished_at: str | None) -> float:
    if not started_at or not finished_at:
        return 0.0
    return (datetime.fromisoformat(finished_at) - datetime.fromisoformat(started_at)).total_seconds()
