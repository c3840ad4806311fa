"""The per-epoch tables: losses, cost and preference metrics of one run per epoch."""

from __future__ import annotations

from vqabench.report.model import (
    NA,
    Cell,
    ReportTable,
    figure,
)
from vqabench.report.runs import (
    RunData,
)

EPOCH_NOTE = (
    "Training loss over the epoch, eval loss and preference metrics on the eval split; "
    "★ marks the best epoch (lowest eval loss), the checkpoint that is evaluated and handed on."
)


def epoch_table(run: RunData) -> ReportTable:
    """Per-epoch losses, cost and preference metrics of one run."""
    cuda = any(e.cuda_max_allocated_mib is not None for e in run.epochs)
    scored = any(e.em is not None or e.judge_score is not None for e in run.epochs)
    steps = any(e.step_ms_median is not None for e in run.epochs)
    loads = any(e.load_avg_max is not None for e in run.epochs)
    columns = [
        "Epoch",
        "Train loss ↓",
        "Eval loss ↓",
        "Epoch time [s]",
        "Peak CUDA memory [MiB]" if cuda else "Peak RSS [MiB]",
        "Pref. accuracy ↑",
        "Reward margin ↑",
    ] + (["EM ↑", "F1 ↑", "Judge ↑"] if scored else [])
    columns += (["Step [ms] median (p10 … p90)"] if steps else []) + (["Load avg / cores"] if loads else [])
    rows: list[list[Cell]] = []
    for e in run.epochs:
        memory = e.cuda_max_allocated_mib if cuda else e.peak_rss_mib
        epoch = figure(e.epoch, 0, "epoch", details={"best": e.is_best})
        if e.is_best:
            epoch.text += " ★"
        row = [
            epoch,
            figure(e.train_loss, 4, "loss"),
            figure(e.eval_loss, 4, "loss"),
            figure(e.epoch_seconds, 2, "s"),
            figure(memory, 1, "MiB"),
            figure(e.pref_accuracy, 3, "fraction"),
            figure(e.reward_margin, 3, "reward"),
        ]
        if scored:
            row += [figure(e.em, 3, "fraction"), figure(e.f1, 3, "fraction"), figure(e.judge_score, 3, "fraction")]
        if steps:
            if e.step_ms_median is not None and e.step_ms_p10 is not None and e.step_ms_p90 is not None:
                step = figure(e.step_ms_median, 1, "ms", details={"p10": e.step_ms_p10, "p90": e.step_ms_p90})
                step.text += f" ({e.step_ms_p10:.1f} … {e.step_ms_p90:.1f})"
            else:
                step = figure(None, 1, "ms")
            row.append(step)
        if loads:
            load = figure(e.load_avg_max, 1, "load average", details={"cores": e.cores})
            load.text += f" / {e.cores or NA}"
            row.append(load)
        rows.append(row)
    notes = ["EM, F1, Judge per epoch: scored on a sample of eval-split answers."] if scored else []
    if loads:
        notes.append(
            "Load avg / cores: the highest 1-minute load average during the epoch's steps against the "
            "CPU threads the run used; above them, other work competed for the cores."
        )
    return ReportTable(
        f"{run.name} ({run.method}, {run.status})", columns, ["right"] * len(columns), rows, notes, f"epochs:{run.name}"
    )
