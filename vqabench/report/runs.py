"""What the tables are computed from: a run's data (:class:`RunData`), its headline numbers (:class:`RunSummary`,
:func:`summarize_runs`), seeds, timing and the encoder cache."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import mean
from typing import TYPE_CHECKING, Any

from vqabench.events import EpochEnded, Evaluated, RunFinished, RunStarted
from vqabench.report.model import (
    BASE,
    LOAD_SLACK,
    MIB,
    MORE_WORK_THAN_SFT,
    NOISY_CV,
    Cell,
    as_number,
    figure,
    is_interval,
)
from vqabench.store import ResultsStore

if TYPE_CHECKING:
    from vqabench.stats import Spread


@dataclass
class RunData:
    """What the report needs of one run (from the store, or collected live)."""

    name: str
    method: str
    status: str
    reason: str = ""
    after: str | None = None
    started: RunStarted | None = None
    finished: RunFinished | None = None
    epochs: list[EpochEnded] = field(default_factory=list)
    final_eval: Evaluated | None = None  # the last eval on the test split
    setup: str = ""  # model, data, trained part, precision; a run's SFT baseline is an SFT run of the same setup
    base_eval: Evaluated | None = None  # the starting model's test scores, where this run made them
    spec: dict[str, Any] = field(default_factory=dict)  # the run's config as stored (the JSON export has it)


@dataclass
class RunSummary:
    """One run's headline numbers, each None when not measured."""

    name: str
    method: str
    status: str
    epoch_seconds: float | None  # median over the epochs after the warm-up (all of them for 2 or fewer)
    relative_epoch_time: float | None  # mean step time / the SFT run's (epoch times where steps are unknown)
    aligned_seconds: float | None  # train time of this run and every run it starts from, and their one-off passes
    samples_per_s: float | None
    peak_memory_mib: float | None
    memory_source: str | None  # "CUDA" (torch max allocated) or "RSS" (process peak)
    reference_mib: float | None  # None when the method keeps no reference
    peak_vs_orpo_mib: float | None
    uses_reference: bool | None  # None before run_started said
    em: float | None
    f1: float | None
    judge_score: float | None
    intervals: dict[str, list[float]] = field(default_factory=dict)  # "em" -> [low, high]
    kappa: float | None = None
    encoder_cache: str | None = None  # "off", "built in N s", "reused"; None before run_started
    seeds: int = 1  # > 1: a mean over runs NAME@sN; `spread` holds the 95% half-widths
    trains: str | None = None  # "decoder", "all" or "LoRA r16" (None before run_started said)
    precision: str | None = None  # "fp32", "bf16", "fp16"
    trainable_params: int | None = None
    optimizer_state_mib: float | None = None  # AdamW's moments as measured after the first step
    spread: dict[str, float] = field(default_factory=dict)  # field name -> ± half-width
    epoch_spread: Spread | None = None  # the epochs in `epoch_seconds`: σ, min, max
    warmup_seconds: float | None = None  # the first epoch, when there are more than 2
    relative_interval: list[float] | None = None  # 95% bootstrap interval of relative_epoch_time
    timing_warning: str | None = None  # one sentence when the timing was disturbed
    stage_seconds: float | None = None  # this run's own share of aligned_seconds (its stage)
    model: str | None = None  # family and size, "qwen2-vl 0.18M" (None before run_started said)
    reference: str | None = None  # "precompute (auto: 3 epochs, table fits)", "copy", "none" (reference_text)
    reference_auto: bool = False  # the preset asked for reference = "auto"
    trial: bool = False  # a `vqabench tune` trial: scored on eval only, never an aligned model to pick


#: RunSummary fields averaged across seeds (each shown as mean ± 95% half-width).
SEED_FIELDS = (
    "epoch_seconds",
    "relative_epoch_time",
    "aligned_seconds",
    "samples_per_s",
    "peak_memory_mib",
    "peak_vs_orpo_mib",
    "reference_mib",
    "em",
    "f1",
    "judge_score",
    "kappa",
    "stage_seconds",
)


def seed_group(name: str) -> str:
    """The preset a run repeats: 'dpo-beta0.1@s2' -> 'dpo-beta0.1'."""
    base, sep, seed = name.rpartition("@s")
    return base if sep and seed.isdigit() else name


def seed_suffix(name: str) -> str:
    """'@s2' for 'dpo-beta0.1@s2'; '' for a run that is not repeated per seed."""
    return name[len(seed_group(name)) :]


def aggregate_seeds(summaries: Sequence[RunSummary]) -> list[RunSummary]:
    """One row per preset: runs repeated per seed become their mean with a 95% t-interval."""
    from vqabench.stats import mean_ci_across_seeds

    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        groups.setdefault(seed_group(s.name), []).append(s)
    out = []
    for name, members in groups.items():
        if len(members) == 1 and members[0].name == name:
            out.append(members[0])
            continue
        done = [m for m in members if m.status == "done"]
        first = members[0]
        merged = RunSummary(
            name=f"{name} ({len(done)} seeds)",
            method=first.method,
            status="done" if len(done) == len(members) else f"{len(done)} of {len(members)} done",
            epoch_seconds=None,
            relative_epoch_time=None,
            aligned_seconds=None,
            samples_per_s=None,
            peak_memory_mib=None,
            peak_vs_orpo_mib=None,
            memory_source=first.memory_source,
            reference_mib=None,
            uses_reference=first.uses_reference,
            em=None,
            f1=None,
            judge_score=None,
            encoder_cache=_merged_text([m.encoder_cache for m in members]),
            seeds=len(done),
            trains=first.trains,
            precision=first.precision,
            trainable_params=first.trainable_params,
            optimizer_state_mib=first.optimizer_state_mib,
            model=_merged_text([m.model for m in members]),
            reference=_merged_text([m.reference for m in members]),
            reference_auto=any(m.reference_auto for m in members),
        )
        for key in SEED_FIELDS:
            values = [v for v in (getattr(m, key) for m in done) if as_number(v) is not None]
            if not values:
                continue
            interval = mean_ci_across_seeds(values)
            setattr(merged, key, interval.mean)
            if interval.high is not None:
                merged.spread[key] = interval.high - interval.mean
        out.append(merged)
    return out


def session_run_data(store: ResultsStore, session_id: int) -> list[RunData]:
    """The stored runs of a session as RunData, in queue order."""
    data = []
    for run in store.runs(session_id):
        evals = store.evals(run.id)
        tests = [e for e in evals if e.split == "test"]
        bases = [e for e in evals if e.split == "base"]
        data.append(
            RunData(
                run.name,
                run.method,
                run.status,
                run.reason,
                run.after,
                run.started,
                run.finished,
                store.epochs(run.id),
                tests[-1] if tests else None,
                run_setup(run.spec),
                bases[-1] if bases else None,
                run.spec,
            )
        )
    return data


def run_setup(spec: dict[str, Any]) -> str:
    """Model, data, trained part and precision of a run (a spec as a dict): runs of one setup share
    an SFT baseline, so `lora-dpo` is compared with `lora-sft`, never with the full-decoder `sft`."""
    dataset = spec.get("dataset") or {}
    source = dataset.get("source", "") if isinstance(dataset, dict) else dataset
    train, precision = spec.get("train") or "decoder", spec.get("precision") or "fp32"
    return f"{spec.get('model', '')} on {source}, train {train}, {precision}"


def is_trial(run: RunData) -> bool:
    """A `vqabench tune` trial: its spec kept the test split away (score_test = false)."""
    return run.spec.get("score_test") is False


def summarize_runs(runs: Sequence[RunData]) -> list[RunSummary]:
    """Headline numbers per run; ratios against the SFT run of the same setup, chains along `after`."""
    by_name = {r.name: r for r in runs}
    encodings = encoding_seconds(runs)
    timings = {r.name: run_timing(r) for r in runs}
    means = {name: t.epoch_seconds for name, t in timings.items()}
    # Baselines per (setup, seed suffix): a run repeated per seed is compared with the SFT (or
    # ORPO) run of its own seed, else with the first one of its setup ("" = any seed).
    baselines: dict[tuple[str, str], str] = {}  # -> the SFT run with a measured epoch
    orpo_peaks: dict[tuple[str, str], float] = {}  # -> peak memory of the ORPO run
    # A tune session's SFT baseline is its tuned SFT run, not a trial: trials come last.
    for r in sorted(runs, key=is_trial):
        peak_r = peak_memory(r.epochs)[0]
        for key in ((r.setup, seed_suffix(r.name)), (r.setup, "")):
            if r.method == "sft" and means[r.name]:
                baselines.setdefault(key, r.name)
            if r.method == "orpo" and peak_r is not None:
                orpo_peaks.setdefault(key, peak_r)
    summaries = []
    for run in runs:
        epoch_mean = means[run.name]
        timing = timings[run.name]
        own = (run.setup, seed_suffix(run.name))
        sft = baselines.get(own) or baselines.get((run.setup, ""))
        orpo_peak = orpo_peaks.get(own, orpo_peaks.get((run.setup, "")))
        peak, source = peak_memory(run.epochs)
        evaluation = run.final_eval
        extra: dict[str, Any] = evaluation.extra if evaluation else {}
        intervals = {key: extra[f"{key}_ci"] for key in ("em", "f1", "judge") if is_interval(extra.get(f"{key}_ci"))}
        uses_reference = None if run.started is None else run.started.reference_strategy is not None
        summaries.append(
            RunSummary(
                name=run.name,
                method=run.method,
                status=run.status,
                epoch_seconds=epoch_mean,
                relative_epoch_time=None,
                aligned_seconds=_aligned_seconds(run, by_name, encodings),
                samples_per_s=_mean([e.samples_per_s for e in run.epochs]),
                peak_memory_mib=peak,
                memory_source=source,
                peak_vs_orpo_mib=(peak - orpo_peak) if peak is not None and orpo_peak is not None else None,
                reference_mib=(run.started.reference_bytes / MIB) if run.started and uses_reference else None,
                uses_reference=uses_reference,
                em=evaluation.em if evaluation else None,
                f1=evaluation.f1 if evaluation else None,
                judge_score=evaluation.judge_score if evaluation else None,
                intervals=intervals,
                kappa=as_number(extra.get("judge_kappa")),
                encoder_cache=encoder_cache_text(run.started),
                epoch_spread=timing.spread,
                warmup_seconds=timing.warmup_seconds,
                timing_warning=timing.warning(run.name),
                stage_seconds=_stage_seconds(run, _route(run, by_name)[:-1], encodings),
                trains=trains_label(run.started),
                precision=run.started.precision if run.started else None,
                trainable_params=run.started.trainable_params if run.started else None,
                model=model_label(run.started),
                reference=reference_text(run.started),
                reference_auto=chose_reference(run.started),
                trial=is_trial(run),
                optimizer_state_mib=next(
                    (e.optimizer_state_bytes / MIB for e in run.epochs if e.optimizer_state_bytes is not None), None
                ),
            )
        )
        if sft == run.name:
            summaries[-1].relative_epoch_time = 1.0
        elif sft and epoch_mean is not None:
            summary = summaries[-1]
            summary.relative_epoch_time, summary.relative_interval = relative_time(timing, timings[sft])
    return summaries


def model_label(started: RunStarted | None) -> str | None:
    """The run's model family and its parameter count, for the tables: "qwen2-vl 0.18M"; None before it started."""
    from vqabench.catalog import short_count

    if started is None:
        return None
    family = started.data.get("model_family")  # runs recorded before families had none
    return f"{family} {short_count(started.total_params)}" if family else short_count(started.total_params)


def trains_label(started: RunStarted | None) -> str | None:
    """What a run trains, for the tables: "decoder", "all" or "LoRA r16"."""
    if started is None:
        return None
    if started.train == "lora":
        return f"LoRA r{started.config.get('lora_r', '?')}"
    return started.train


def encoder_cache_info(started: RunStarted | None) -> dict[str, Any] | None:
    """The run's encoder-cache record from run_started (older runs had none: off); None before it started."""
    if started is None:
        return None
    info = started.data.get("encoder_cache")
    return info if isinstance(info, dict) else {"on": False}


def encoder_cache_text(started: RunStarted | None) -> str | None:
    """'off', 'built in 12.3 s' or 'reused' for the report, the dashboard and the console."""
    info = encoder_cache_info(started)
    if info is None:
        return None
    if not info.get("on"):
        return "off"
    if info.get("built"):
        where = "" if info.get("path") else ", in memory"
        return f"built in {as_number(info.get('seconds')) or 0.0:.2f} s{where}"
    return "reused"


def reference_text(started: RunStarted | None) -> str | None:
    """The reference a run kept, and for ``reference = "auto"`` why: 'precompute (auto: 3 epochs,
    table fits)', 'copy', 'none' (a method without one); None before run_started."""
    if started is None:
        return None
    if started.reference_strategy is None:
        return "none"
    choice = started.data.get("reference_choice")
    if isinstance(choice, dict) and choice.get("asked") == "auto":
        return f"{started.reference_strategy} (auto: {choice.get('why', '?')})"
    return started.reference_strategy


def chose_reference(started: RunStarted | None) -> bool:
    """Whether the run's preset left the reference to the worker (``reference = "auto"``)."""
    choice = started.data.get("reference_choice") if started is not None else None
    return isinstance(choice, dict) and choice.get("asked") == "auto"


def encoder_cache_entry(run: RunData) -> str | None:
    """The encoder-cache entry a run used: its folder, or the run's own in-memory encodings; None without one."""
    info = encoder_cache_info(run.started) or {}
    if not info.get("on"):
        return None
    return str(info["path"]) if info.get("path") else f"{run.name} (in memory)"


def encoding_seconds(runs: Sequence[RunData]) -> dict[str, float]:
    """Seconds of each encoder-cache entry's one-off encoding pass, as measured by the run that built it.

    Every route is charged the pass for the entry it reads, whichever run built it: time to an
    aligned model must not depend on queue order. An entry built before this session (every run
    reused it) is in no route's time."""
    seconds: dict[str, float] = {}
    for run in runs:
        entry, info = encoder_cache_entry(run), encoder_cache_info(run.started) or {}
        if entry is not None and info.get("built"):
            seconds.setdefault(entry, as_number(info.get("seconds")) or 0.0)
    return seconds


def mixed_encoder_cache_warning(runs: Sequence[RunData]) -> str | None:
    """One sentence when runs with and without the encoder cache are set side by side, else None."""
    on = [r.name for r in runs if (encoder_cache_info(r.started) or {}).get("on")]
    off = [r.name for r in runs if r.started is not None and r.name not in on]
    if not on or not off:
        return None
    return (
        f"Warning: runs with the frozen-encoder cache ({', '.join(on)}) and without it ({', '.join(off)}) "
        f"are side by side, so their epoch times measure different work; compare times only between "
        f"runs with the same encoder_cache setting."
    )


def _merged_text(values: Sequence[str | None]) -> str | None:
    kinds = {("built" if v.startswith("built") else v) for v in values if v}
    return next(iter(kinds)) if len(kinds) == 1 else ("mixed" if kinds else None)


@dataclass
class RunTiming:
    """A run's epoch times split into warm-up and steady epochs, its step times and the machine load."""

    epoch_seconds: float | None  # median of the steady epochs
    spread: Spread | None
    warmup_seconds: float | None
    step_ms: list[list[float]]  # per steady epoch its step times, where every one of them carries them
    load_max: float | None
    cores: int | None
    steady_seconds: list[float] = field(default_factory=list)  # the seconds of the epochs in `spread`

    def warning(self, name: str) -> str | None:
        """One sentence when the run's timing was disturbed (epoch-time CV or machine load), else None."""
        reasons = []
        cv = self.spread.cv if self.spread else None
        if self.spread is not None and cv is not None and cv > NOISY_CV:
            reasons.append(f"its epoch times vary by {cv:.0%} (coefficient of variation, over {self.spread.n} epochs)")
        if self.load_max is not None and self.cores and load_disturbed(self.load_max, self.cores):
            reasons.append(
                f"the 1-minute load average reached {self.load_max:.1f} on the {self.cores} "
                f"core{'s' if self.cores > 1 else ''} it used"
            )
        if not reasons:
            return None
        return (
            f"{name}: timing disturbed: {' and '.join(reasons)}; compare costs with 'vqabench probe', "
            f"which interleaves the methods on the same batches."
        )


def load_disturbed(load: float | None, threads: int | None, cores: int | None = None) -> bool:
    """Did other work compete for the cores while `threads` threads ran on a machine with `cores`?

    The 1-minute load average counts the measured process's own threads, so the other work is
    load - threads, and it competes only beyond the cores the process left idle (cores - threads);
    a disturbance is more than LOAD_SLACK of the cores beyond them (a probe on 2 threads of 2 cores
    at load 2.0 is its own load). `cores` unknown (runs, older probes): taken as `threads`.
    """
    if load is None or not threads:
        return False
    cores = max(cores or threads, threads)
    return (load - threads) - (cores - threads) > LOAD_SLACK * cores


def noisy_ratio(method: str, low: float | None) -> bool:
    """A cost ratio to SFT whose interval reaches 1 for a method that does strictly more work per step."""
    return method in MORE_WORK_THAN_SFT and low is not None and low <= 1.0


def run_timing(run: RunData) -> RunTiming:
    """Epoch times as hyperfine reports them: the first epoch apart as warm-up when there are more than 2."""
    from vqabench.stats import spread

    epochs = [e for e in run.epochs if as_number(e.epoch_seconds) is not None]
    warmup = epochs[0].epoch_seconds if len(epochs) > 2 else None
    steady = epochs[1:] if len(epochs) > 2 else epochs
    times = spread([e.epoch_seconds for e in steady]) if steady else None
    step_ms = [list(e.step_ms or []) for e in steady] if all(e.step_ms for e in steady) else []
    loads = [v for v in (as_number(e.load_avg_max) for e in run.epochs) if v is not None]
    cores = [e.cores for e in run.epochs if e.cores]
    return RunTiming(
        times.median if times else None,
        times,
        warmup,
        step_ms,
        max(loads) if loads else None,
        min(cores) if cores else None,
        [float(e.epoch_seconds) for e in steady],
    )


def relative_time(run: RunTiming, baseline: RunTiming) -> tuple[float | None, list[float] | None]:
    """Cost relative to a baseline run: the ratio of mean step times with a 95% t-interval over both
    runs' steady epochs (stats.ratio_ci: an epoch is the unit that a disturbance moves; fewer than
    2 steady epochs each: no interval); the ratio of median epoch times, without an interval, where
    steps are unknown."""
    from vqabench.stats import ratio_ci

    if run.step_ms and baseline.step_ms:
        ratio = ratio_ci(run.step_ms, baseline.step_ms)
        interval = [ratio.low, ratio.high] if ratio.low is not None and ratio.high is not None else None
        return ratio.mean, interval
    return _ratio(run.epoch_seconds, baseline.epoch_seconds), None


def read_predictions(run: RunData, split: str = "test") -> list[dict[str, Any]] | None:
    """The test predictions a run's worker wrote (question, reference, prediction, em, f1); split "base":
    the starting model's answers to the same questions."""
    evaluation = run.base_eval if split == "base" else run.final_eval
    path = evaluation.predictions if evaluation else None
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None


def base_rows(runs: Sequence[RunData]) -> list[tuple[str, RunData]]:
    """(row name, run that scored it) per setup whose starting model was scored: "base", or
    "base (model on data)" when the session mixes setups."""
    scored: dict[str, RunData] = {}
    for run in runs:
        if run.base_eval is not None:
            scored.setdefault(run.setup, run)
    setups = {r.setup for r in runs}
    return [(BASE if len(setups) == 1 else f"{BASE} ({setup})", run) for setup, run in scored.items()]


def status_text(status: str, reason: str) -> str:
    """'failed (why)', or the reason alone when it already starts with the status."""
    if not reason:
        return status
    return reason if reason.startswith(status) else f"{status} ({reason})"


def _route(run: RunData, by_name: dict[str, RunData]) -> list[RunData]:
    """The runs from the first stage to this one along `after` (as far as they are known), first first."""
    route, node = [run], run
    while node.after is not None and node.after in by_name and by_name[node.after] not in route:
        node = by_name[node.after]
        route.insert(0, node)
    return route


def _aligned_seconds(run: RunData, by_name: dict[str, RunData], encodings: dict[str, float]) -> float | None:
    """Train seconds of the run and of every run it starts from, with their one-off passes; None if a
    stage is missing."""
    route = _route(run, by_name)
    if route[0].after is not None:  # a stage it starts from is not in the session, or a cycle
        return None
    total = 0.0
    for i, node in enumerate(route):
        stage = _stage_seconds(node, route[:i], encodings)
        if stage is None:
            return None
        total += stage
    return total


def _stage_seconds(run: RunData, before: Sequence[RunData], encodings: dict[str, float]) -> float | None:
    """Train seconds of this run alone, plus the one-off passes it needs: a `precompute` reference's
    scoring pass, and the frozen-encoder cache's encoding pass (its builder's seconds, whoever built
    the entry) unless a stage `before` it on its route already read the same entry."""
    if run.finished is None:
        return None
    reference = as_number(run.started.data.get("reference_seconds")) if run.started is not None else None
    entry = encoder_cache_entry(run)
    encoding = 0.0
    if entry is not None and entry not in {encoder_cache_entry(r) for r in before}:
        encoding = encodings.get(entry, 0.0)
    return run.finished.train_seconds + (reference or 0.0) + encoding


def peak_memory(epochs: Sequence[EpochEnded]) -> tuple[float | None, str | None]:
    """The largest epoch's peak memory in MiB and its source: CUDA (torch's max allocated) where any
    epoch measured it, else RSS; (None, None) when none did."""
    cuda = [v for v in (as_number(e.cuda_max_allocated_mib) for e in epochs) if v is not None]
    if cuda:
        return max(cuda), "CUDA"
    rss = [v for v in (as_number(e.peak_rss_mib) for e in epochs) if v is not None]
    return (max(rss), "RSS") if rss else (None, None)


def _ratio(value: float | None, base: float | None) -> float | None:
    """value / base, or None when either is unknown or the base is 0."""
    return value / base if value is not None and base else None


def _mean(values: Sequence[Any]) -> float | None:
    numbers = [v for v in values if as_number(v) is not None]
    return mean(numbers) if numbers else None


def pm(summary: RunSummary, key: str, digits: int, unit: str | None = None) -> Cell:
    """A value, with ± its across-seed half-width when the row averages seeds."""
    value = as_number(getattr(summary, key))
    return figure(value, digits, unit, half_width=summary.spread.get(key) if value is not None else None)


def score_cell(value: float | None, interval: list[float] | None) -> Cell:
    """A score (EM, F1, judge: a fraction of the questions) with its 95% interval."""
    return figure(value, 3, "fraction", interval=interval)
