"""The Efficiency table: what each method costs in time and memory, and how runs were placed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vqabench.report.model import (
    MODEL_NOTE,
    NA,
    NOISY,
    NOISY_NOTE,
    SEEDS_NOTE,
    Cell,
    Detail,
    ReportTable,
    figure,
    missing,
    word,
)
from vqabench.report.runs import (
    RunData,
    RunSummary,
    noisy_ratio,
    pm,
)

if TYPE_CHECKING:
    from vqabench.stats import Spread


def efficiency_table(summaries: Sequence[RunSummary], warning: str | None = None) -> ReportTable:
    """Cost per method: epoch time and its ratio to SFT, time to an aligned model, memory, encoder cache."""
    sources = {s.memory_source for s in summaries if s.memory_source}
    memory_header = {frozenset({"CUDA"}): "Peak CUDA memory [MiB] ↓", frozenset({"RSS"}): "Peak RSS [MiB] ↓"}.get(
        frozenset(sources), "Peak memory [MiB] ↓"
    )
    columns = [
        "Method",
        "Epoch time [s] ↓",
        "Warm-up epoch [s]",
        "Relative to SFT [95% CI]",
        "Time to aligned model [s] ↓",
        "Samples/s ↑",
        memory_header,
        "Peak − ORPO [MiB]",
        "Reference memory [MiB] ↓",
        "Optimizer state [MiB] ↓",
        "Trainable params",
        "Trains",
        "Precision",
        "Model",
    ]
    # Shown once any run used the encoder cache (without it every run is "off", the study's setting).
    with_cache = any(s.encoder_cache not in (None, "off") for s in summaries)
    # Shown once a run left its reference to the worker (reference = "auto"): which it chose, and why.
    with_choice = any(s.reference_auto for s in summaries)
    if with_choice:
        columns.append("Reference")
    if with_cache:
        columns.append("Encoder cache")
    rows: list[list[Cell]] = []
    noisy = False
    for s in summaries:
        memory = figure(s.peak_memory_mib, 1, "MiB", details={"source": s.memory_source} if s.memory_source else None)
        if len(sources) > 1 and s.memory_source:
            memory.text += f" ({s.memory_source})"
        reference = {True: figure(s.reference_mib, 1, "MiB"), False: word("none"), None: word(None)}[s.uses_reference]
        if s.seeds > 1:
            memory = pm(s, "peak_memory_mib", 1, "MiB")
            if s.uses_reference:
                reference = pm(s, "reference_mib", 1, "MiB")
        low = None
        if s.relative_interval and s.seeds == 1 and s.relative_epoch_time is not None:
            relative = figure(s.relative_epoch_time, 2, "×", interval=s.relative_interval)
            low = s.relative_interval[0]
        else:
            relative = pm(s, "relative_epoch_time", 2, "×")
            if s.seeds > 1 and s.relative_epoch_time is not None and "relative_epoch_time" in s.spread:
                low = s.relative_epoch_time - s.spread["relative_epoch_time"]
        if noisy_ratio(s.method, low):
            relative.text += f" {NOISY}"
            relative.details[NOISY] = True
            noisy = True
        rows.append(
            [
                word(s.name),
                pm(s, "epoch_seconds", 2, "s") if s.seeds > 1 else epoch_time_cell(s.epoch_spread),
                figure(s.warmup_seconds, 2, "s") if s.warmup_seconds is not None else missing(unit="s"),
                relative,
                pm(s, "aligned_seconds", 2, "s"),
                pm(s, "samples_per_s", 1, "samples/s"),
                memory,
                pm(s, "peak_vs_orpo_mib", 1, "MiB"),
                reference,
                figure(s.optimizer_state_mib, 1, "MiB"),
                figure(s.trainable_params, 0, "parameters", thousands=True),
                word(s.trains),
                word(s.precision),
                word(s.model),
            ]
            + ([word(s.reference)] if with_choice else [])
            + ([word(s.encoder_cache)] if with_cache else [])
        )
    notes = [warning] if warning else []
    notes += [
        "Epoch time: median over epochs ± standard deviation (min … max), as hyperfine shows "
        "timings; with more than 2 epochs the first is left out as warm-up and shown apart "
        "(–: 2 epochs or fewer, all in the median).",
        "Relative to SFT: the run's mean training-step time divided by that of the SFT run on the "
        "same model and data that trains the same part in the same precision (SFT = 1.00), over the epochs "
        "after the warm-up, with a 95% Student-t interval over both runs' epochs (an epoch is the unit a "
        "disturbance moves; fewer than 2 such epochs each, or runs recorded without step times: no interval). "
        "It covers the variation between epochs, not a drift between the two runs, which go one after "
        "another: for a fair cost ratio use 'vqabench probe' (or --seeds, whose interval spans runs). "
        "Time to aligned model: training time of the run plus every run it starts from "
        "(SFT + DPO counts both stages), and the one-off pass of a precomputed reference.",
    ]
    if with_cache:
        notes.append(
            "Encoder cache: the frozen encoders' outputs computed once and read by every step; built: this run "
            "ran the one-off encoding pass; reused: an earlier run with the same encoders and data built it; "
            "off: the encoders run in every step, as in the study's code. Every route is charged the encoding "
            "pass it needs, whichever run built the entry (the builder's measured seconds, once per route: "
            "SFT + DPO pays it once), so Time to aligned model does not depend on queue order; an entry built "
            "before this session is charged to no route."
        )
    memory_notes = {
        "CUDA": "CUDA memory: torch's peak allocated memory on the GPU, the largest epoch's.",
        "RSS": "RSS: peak resident memory of the worker process during an epoch (no GPU in use), the largest epoch's.",
    }
    notes += [memory_notes[s] for s in sorted(sources)]
    notes.append(
        "Peak − ORPO: this run's peak memory minus that of the ORPO run on the same model, "
        "data and batch size (ORPO scores the same chosen and rejected answers without a "
        "reference), so for DPO it is mostly the reference model's cost at the peak."
    )
    notes.append(
        "Reference memory: the frozen reference model held while training (0 for `precompute`, which keeps "
        "log-probs, and for `adapter`, the LoRA model with its adapters disabled); none: the method keeps no reference."
    )
    if with_choice:
        notes.append(REFERENCE_CHOICE_NOTE)
    notes.append(
        "Optimizer state: the tensors AdamW keeps (two moments per trained value), measured after the first step. "
        "Trains: the decoder, all of the model, or LoRA adapters of rank r on the decoder; "
        "Precision: the autocast dtype of the forward passes (log-probs and losses are fp32)."
    )
    notes.append(MODEL_NOTE)
    if any(s.seeds > 1 for s in summaries):
        notes.append(SEEDS_NOTE)
    if noisy:
        notes.append(NOISY_NOTE)
    notes += [s.timing_warning for s in summaries if s.timing_warning]
    # Trains, Precision, Model (and Encoder cache) are words
    align = ["left"] + ["right"] * 10 + ["left"] * (len(columns) - 11)
    return ReportTable("Efficiency", columns, align, rows, notes, "efficiency")


REFERENCE_CHOICE_NOTE = (
    'Reference: the strategy the run kept; auto (the preset\'s reference = "auto") picks the cheapest exact '
    "one: precompute when the run has at least 2 epochs and the log-prob table fits the cache folder's free "
    "space, else adapter under LoRA, else copy. All three give the same log-probs; precompute's one-off "
    "pass is in Time to aligned model."
)


def placement_notes(runs: Sequence[RunData]) -> list[str]:
    """How runs were spread over processes, and whether epoch times were measured concurrently."""
    notes = []
    spread = [r for r in runs if r.started is not None and r.started.world_size > 1]
    if spread:
        parts = [
            f"{r.name} on {r.started.world_size} processes ({r.started.backend}), global batch "
            f"{r.started.global_batch} = {r.started.per_device_batch} per process"
            for r in spread
            if r.started is not None
        ]
        notes.append(
            "Several processes (torchrun + DDP): " + "; ".join(parts) + ". Samples/s counts every process's "
            "samples; peak memory is rank 0's (each epoch event also carries every rank's peak, their max and sum)."
        )
    shared = [
        (r.name, int(r.started.config.get("concurrent_runs") or 1))
        for r in runs
        if r.started is not None and int(r.started.config.get("concurrent_runs") or 1) > 1
    ]
    if shared:
        most = max(n for _, n in shared)
        notes.append(
            f"Epoch times were measured concurrently: up to {most} runs shared the host at once (--parallel {most}; "
            f"{', '.join(name for name, _ in shared)}), so they are slower than those of runs trained alone."
        )
    return notes


def epoch_time_text(times: Spread | None) -> str:
    """hyperfine's style: `9.34 s ± 0.40 (8.90 … 12.50)`; one epoch: `9.34 s`."""
    if times is None:
        return NA
    if times.n < 2:
        return f"{times.median:.2f} s"
    return f"{times.median:.2f} s ± {times.std:.2f} ({times.low:.2f} … {times.high:.2f})"


def epoch_time_cell(times: Spread | None) -> Cell:
    """The median epoch time with its spread as details (std, min, max), printed as :func:`epoch_time_text`."""
    if times is None:
        return figure(None, 2, "s")
    details: dict[str, Detail] = {"epochs": times.n}
    if times.n >= 2:
        details.update(std=times.std, min=times.low, max=times.high)
    return Cell(epoch_time_text(times), times.median, "s", details=details)
