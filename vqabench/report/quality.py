"""The Quality table: EM, F1 and judge scores per method, the paper's Table 1 shape."""

from __future__ import annotations

from collections.abc import Sequence

from vqabench.report.model import (
    BASE_NOTE,
    MODEL_NOTE,
    NA,
    SEEDS_NOTE,
    Cell,
    ReportTable,
    figure,
    is_interval,
    missing,
    word,
)
from vqabench.report.runs import (
    RunData,
    RunSummary,
    base_rows,
    model_label,
    pm,
    score_cell,
)


def quality_table(summaries: Sequence[RunSummary], runs: Sequence[RunData]) -> ReportTable:
    """The paper's Table 1 shape: Method | EM | F1 | Judge | Epoch time."""
    with_kappa = any(s.kappa is not None for s in summaries)
    columns = ["Method", "Model", "EM ↑", "F1 ↑", "Judge ↑"]
    columns += (["κ judge/EM"] if with_kappa else []) + ["Epoch time [s] ↓"]
    rows: list[list[Cell]] = []
    bases = base_rows(runs)
    for name, run in bases:
        scores = run.base_eval
        assert scores is not None
        ci = {
            key: scores.extra[f"{key}_ci"]
            for key in ("em", "f1", "judge")
            if is_interval(scores.extra.get(f"{key}_ci"))
        }
        row = [
            word(name),
            word(model_label(run.started)),
            score_cell(scores.em, ci.get("em")),
            score_cell(scores.f1, ci.get("f1")),
            score_cell(scores.judge_score, ci.get("judge")),
        ]
        if with_kappa:
            row.append(figure(scores.extra.get("judge_kappa"), 2, "kappa"))
        rows.append([*row, missing(unit="s")])
    for s in summaries:
        if s.seeds > 1:
            row = [word(s.name), word(s.model), *(pm(s, key, 3, "fraction") for key in ("em", "f1", "judge_score"))]
        else:
            row = [
                word(s.name),
                word(s.model),
                score_cell(s.em, s.intervals.get("em")),
                score_cell(s.f1, s.intervals.get("f1")),
                score_cell(s.judge_score, s.intervals.get("judge")),
            ]
        if with_kappa:
            row.append(pm(s, "kappa", 2, "kappa"))
        rows.append([*row, pm(s, "epoch_seconds", 2, "s")])
    evals = [r.final_eval for r in runs if r.final_eval]
    notes = []
    if evals:
        judges = sorted({e.judge for e in evals if e.judge})
        n = sorted({e.n for e in evals})
        unparseable = sum(e.unparseable for e in evals)
        notes.append(
            f"Test split, best checkpoint of each run ({'/'.join(map(str, n))} questions). "
            f"EM: exact match after answer normalisation; F1: token overlap with the reference; "
            f"Judge: share of judged answers graded CORRECT by the {', '.join(judges) or NA} judge"
            + (f", {unparseable} unparseable verdicts left out" if unparseable else "")
            + "."
        )
        for run in runs:
            error = run.final_eval.extra.get("judge_error") if run.final_eval else None
            if error:
                notes.append(f"{run.name}: the judge failed ({error}); judge it later with 'vqabench judge --run ID'.")
    if any(s.intervals for s in summaries if s.seeds == 1):
        notes.append(
            "Brackets: 95% confidence interval [low, high] over the test questions: Wilson score "
            "intervals for EM and Judge (proportions), a bootstrap interval for F1."
        )
    if any(s.seeds > 1 for s in summaries):
        notes.append(SEEDS_NOTE)
    if with_kappa:
        notes.append(
            "κ judge/EM: Cohen's kappa between the judge's verdicts and exact match "
            "(1 = always agree, 0 = chance); a low κ means the judge measures something else."
        )
    if bases:
        notes.append(BASE_NOTE)
    notes.append(
        "Epoch time: median wall clock of the training steps of one epoch (evaluation excluded); "
        "the efficiency table gives its spread."
    )
    notes.append(MODEL_NOTE)
    return ReportTable("Quality", columns, ["left", "left"] + ["right"] * (len(columns) - 2), rows, notes, "quality")
