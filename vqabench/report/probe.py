"""The Step cost probe table (`vqabench probe`): each preset's step on the same batches."""

from __future__ import annotations

from collections.abc import Sequence

from vqabench.events import ProbeMeasured, ProbeStarted
from vqabench.report.model import (
    MIB,
    NOISY,
    NOISY_NOTE,
    Cell,
    ReportTable,
    as_number,
    figure,
    missing,
    word,
)
from vqabench.report.runs import (
    load_disturbed,
    noisy_ratio,
)


def probe_table(started: ProbeStarted, measured: Sequence[ProbeMeasured]) -> ReportTable:
    """`vqabench probe`: each preset's step on the same batches, interleaved rounds, one process."""
    from vqabench.stats import quantiles, ratio_ci

    by_preset: dict[str, list[ProbeMeasured]] = {}
    for m in measured:
        by_preset.setdefault(m.preset, []).append(m)
    steps = {name: [ms for m in rows for ms in m.step_ms] for name, rows in by_preset.items()}
    base = next((n for n, rows in by_preset.items() if rows[0].method == "sft"), next(iter(by_preset), None))
    base_rounds = {m.round: m.step_ms for m in by_preset.get(base or "", []) if m.step_ms}
    sources = {m.memory_source for m in measured}
    memory = (
        "Peak CUDA memory [MiB] ↓"
        if sources == {"CUDA"}
        else "Peak RSS [MiB] ↓"
        if sources == {"RSS"}
        else "Peak memory [MiB] ↓"
    )
    rows: list[list[Cell]] = []
    noisy = False
    for name, rounds in by_preset.items():
        times = steps[name]
        if not times:
            rows.append([word(name), word(rounds[0].method)] + [word(None) for _ in range(6)])
            continue
        p10, median, p90 = quantiles(times, (0.1, 0.5, 0.9))
        relative = figure(None, 2, "×")
        paired = [(m.step_ms, base_rounds[m.round]) for m in rounds if m.step_ms and m.round in base_rounds]
        if name == base:
            relative = figure(1.0, 2, "×")
        elif paired:
            ratio = ratio_ci([a for a, _ in paired], [b for _, b in paired], "median", paired=True)
            interval = [ratio.low, ratio.high] if ratio.low is not None and ratio.high is not None else None
            relative = figure(ratio.mean, 2, "×", interval=interval)
            if noisy_ratio(rounds[0].method, ratio.low):
                relative.text += f" {NOISY}"
                relative.details[NOISY] = True
                noisy = True
        peaks = [v for v in (as_number(m.peak_memory_mib) for m in rounds) if v is not None]
        uses_reference = rounds[0].reference_strategy is not None
        setup = sorted(m.setup_seconds for m in rounds)[len(rounds) // 2]
        step = figure(median, 1, "ms", details={"p10": p10, "p90": p90})
        step.text += f" ({p10:.1f} … {p90:.1f})"
        rows.append(
            [
                word(name),
                word(rounds[0].method + (f" ({rounds[0].reference_strategy})" if uses_reference else "")),
                step,
                relative,
                figure(started.batch_size * 1000.0 / median, 1, "samples/s"),
                figure(max(peaks) if peaks else None, 1, "MiB"),
                figure(rounds[0].reference_bytes / MIB, 1, "MiB") if uses_reference else word("none"),
                figure(setup, 2, "s") if uses_reference else missing(unit="s"),
            ]
        )
    loads = [v for v in (as_number(m.load_avg_max) for m in measured) if v is not None]
    notes = [
        f"{started.device}, torch {started.torch_version}; batch {started.batch_size}; "
        f"{started.steps} timed steps (after {started.warmup} warm-up steps) per preset in each of "
        f"{started.rounds} interleaved rounds, in one process on the same batches, so whatever else "
        "runs on the machine lands on every preset alike.",
        f"Every preset starts from the same model ({started.model_source}), dependants included: "
        "no preset is trained first, the probe measures what a step costs, not what it learns.",
        "ms/step: median over every timed step of every round (p10 … p90). Relative: per round, the median "
        f"step time divided by {base or 'the first preset'}'s in the same round; the geometric mean over "
        "rounds with a 95% Student-t interval over the rounds' log-ratios (a round is the unit a "
        "disturbance moves; no interval from one round); two presets that do the same work should overlap.",
        "Peak memory: "
        + (
            "CUDA max allocated"
            if sources == {"CUDA"}
            else "the process's peak RSS (VmHWM, reset before the timed steps)"
        )
        + ", the highest round's. Reference: the frozen copy's bytes (precompute keeps none resident). "
        "Setup: building the copy, or the precompute pass over the probe's pairs (a run pays it over all its "
        "pairs), median over rounds.",
    ]
    if noisy:
        notes.append(NOISY_NOTE)
    if loads and load_disturbed(max(loads), started.cores, started.machine_cores):
        cores = started.machine_cores or started.cores
        notes.append(
            f"The 1-minute load average reached {max(loads):.1f} on {cores} core(s), of which the probe ran "
            f"{started.cores} thread(s): other work competed for the cores, so absolute times are disturbed, "
            "the interleaved ratios much less."
        )
    return ReportTable(
        "Step cost probe",
        ["Preset", "Method", "ms/step ↓", "Relative [95% CI]", "Samples/s ↑", memory, "Reference [MiB] ↓", "Setup [s]"],
        ["left", "left"] + ["right"] * 6,
        rows,
        notes,
        "probe",
    )
