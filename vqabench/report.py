"""The comparison report: quality, efficiency and per-epoch tables from the results store.

One report for every front end: :func:`render_markdown` writes it for ``vqabench export``,
``--export`` and the dashboard's export; :func:`build_report` gives the same tables as
plain rows (:class:`ReportTable`) that the headless console draws with rich. The numbers
come from :func:`summarize_run`, which works on stored runs and equally on events the
dashboard collects live (:class:`RunData`). A value that was not measured is "n/a", never 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from statistics import mean
from typing import TYPE_CHECKING, Any

from vqabench.events import EpochEnded, Evaluated, ProbeMeasured, ProbeStarted, RunFinished, RunStarted
from vqabench.store import ResultsStore, SessionRecord

if TYPE_CHECKING:
    from vqabench.stats import Spread

NA = "n/a"
MIB = 2**20
#: A run's timing is flagged as disturbed above this coefficient of variation of its epoch times.
NOISY_CV = 0.15
#: Methods whose training step does strictly more work than SFT's, which scores the chosen answer
#: only: each also runs the rejected answer through the decoder (objectives.OBJECTIVE_INPUTS,
#: needs_rejected), and DPO, IPO and KTO with a copy or adapter reference one more decoder pass.
MORE_WORK_THAN_SFT = frozenset({"dpo", "ipo", "kto", "orpo", "simpo"})
NOISY = "noisy"
NOISY_NOTE = (
    f"{NOISY}: the 95% interval reaches 1 (or lies below it) for a method whose step does strictly more "
    "work than SFT's (it also scores the rejected answer; DPO, IPO and KTO with a copy or adapter "
    "reference run one more decoder pass), so the timing could not tell its cost from SFT's: that is "
    "noise, not a finding; more rounds or epochs, or a quieter machine, narrow the interval."
)
#: Load from other work beyond the cores left idle, as a share of the cores, that marks a timing disturbed.
LOAD_SLACK = 0.05
EPOCH_NOTE = (
    "Training loss over the epoch, eval loss and preference metrics on the eval split; "
    "★ marks the best epoch (lowest eval loss), the checkpoint that is evaluated and handed on."
)


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
            values = [v for v in (getattr(m, key) for m in done) if _number(v) is not None]
            if not values:
                continue
            interval = mean_ci_across_seeds(values)
            setattr(merged, key, interval.mean)
            if interval.high is not None:
                merged.spread[key] = interval.high - interval.mean
        out.append(merged)
    return out


@dataclass
class ReportTable:
    """A table as text cells; `align` is "left" or "right" per column."""

    title: str
    columns: list[str]
    align: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


@dataclass
class SessionReport:
    """The whole report: a first line about the machine, tables, and runs that did not finish."""

    header: str
    unfinished: list[str]
    tables: list[ReportTable]  # quality, efficiency
    epoch_tables: list[ReportTable] = field(default_factory=list)  # one per run with epochs
    runs: list[RunData] = field(default_factory=list)  # what the tables were built from (figures draw it)
    summaries: list[RunSummary] = field(default_factory=list)  # one per preset, as in the tables


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
    for r in runs:
        peak_r = _peak_memory(r.epochs)[0]
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
        peak, source = _peak_memory(run.epochs)
        evaluation = run.final_eval
        extra: dict[str, Any] = evaluation.extra if evaluation else {}
        intervals = {key: extra[f"{key}_ci"] for key in ("em", "f1", "judge") if _is_interval(extra.get(f"{key}_ci"))}
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
                kappa=_number(extra.get("judge_kappa")),
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
        return f"built in {_number(info.get('seconds')) or 0.0:.2f} s{where}"
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
            seconds.setdefault(entry, _number(info.get("seconds")) or 0.0)
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

    epochs = [e for e in run.epochs if _number(e.epoch_seconds) is not None]
    warmup = epochs[0].epoch_seconds if len(epochs) > 2 else None
    steady = epochs[1:] if len(epochs) > 2 else epochs
    times = spread([e.epoch_seconds for e in steady]) if steady else None
    step_ms = [list(e.step_ms or []) for e in steady] if all(e.step_ms for e in steady) else []
    loads = [v for v in (_number(e.load_avg_max) for e in run.epochs) if v is not None]
    cores = [e.cores for e in run.epochs if e.cores]
    return RunTiming(
        times.median if times else None,
        times,
        warmup,
        step_ms,
        max(loads) if loads else None,
        min(cores) if cores else None,
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


TOO_FEW = "too few items"
BASE = "base"


def base_rows(runs: Sequence[RunData]) -> list[tuple[str, RunData]]:
    """(row name, run that scored it) per setup whose starting model was scored: "base", or
    "base (model on data)" when the session mixes setups."""
    scored: dict[str, RunData] = {}
    for run in runs:
        if run.base_eval is not None:
            scored.setdefault(run.setup, run)
    setups = {r.setup for r in runs}
    return [(BASE if len(setups) == 1 else f"{BASE} ({setup})", run) for setup, run in scored.items()]


BASE_NOTE = (
    "base: the starting model (the checkpoint the runs without `after` start from), before any training, "
    "answering the same test questions, scored by the same judge; a method's row minus it is what its "
    "training gained."
)

MODEL_NOTE = (
    "Model: the model family and its parameter count (all parameters, shared ones once; "
    "`vqabench models` lists the families)."
)


def versus_sft_table(runs: Sequence[RunData]) -> ReportTable | None:
    """Paired differences to the SFT run of the same setup on the very same test items."""
    from vqabench.stats import MIN_PAIRED_ITEMS, mcnemar_exact, paired_bootstrap

    done = [r for r in runs if r.status == "done" and r.final_eval is not None]
    baselines: dict[tuple[str, str], RunData] = {}  # (setup, seed suffix) -> SFT run; "" = any seed
    for r in done:
        if r.method == "sft":
            baselines.setdefault((r.setup, seed_suffix(r.name)), r)
            baselines.setdefault((r.setup, ""), r)
    rows = []
    candidates = [(name, run, "base") for name, run in base_rows(runs)] + [(r.name, r, "test") for r in done]
    for name, run, split in candidates:
        suffix = "" if split == "base" else seed_suffix(run.name)
        base = baselines.get((run.setup, suffix)) or baselines.get((run.setup, ""))
        if base is None or (base is run and split == "test"):
            continue
        ours, theirs = read_predictions(run, split), read_predictions(base)
        if (
            not ours
            or not theirs
            or len(ours) != len(theirs)
            or any(
                (a["question"], a["reference"]) != (b["question"], b["reference"])
                for a, b in zip(ours, theirs, strict=True)
            )
        ):
            continue
        row = [name, base.name]
        for key in ("em", "f1"):
            a, b = [x[key] for x in ours], [x[key] for x in theirs]
            d = paired_bootstrap(a, b)
            if len(a) < MIN_PAIRED_ITEMS:
                p = TOO_FEW
            elif key == "em":  # a binary score: the exact McNemar test
                p = _p_text(mcnemar_exact(a, b).p_value)
            else:
                p = _p_text(d.p_value)
            row += [f"{d.mean_diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}]", p]
        graded = [
            (x["verdict"] == "correct", y["verdict"] == "correct")
            for x, y in zip(ours, theirs, strict=True)
            if x.get("verdict") in ("correct", "incorrect") and y.get("verdict") in ("correct", "incorrect")
        ]
        if graded:
            test = mcnemar_exact([int(x) for x, _ in graded], [int(y) for _, y in graded])
            diff = (test.a_only - test.b_only) / test.n
            row += [f"{diff:+.3f}", TOO_FEW if test.too_few else _p_text(test.p_value)]
        else:
            row += [NA, NA]
        rows.append([*row, str(len(ours))])
    if not rows:
        return None
    notes = [
        "Difference to the SFT run of the same model and data, training the same part in the same precision, "
        "on the same test questions (positive: "
        "better than SFT), with a 95% paired bootstrap interval (2,000 resamples of questions). "
        "p (EM) and p (judge): exact McNemar test on the questions only one of the two runs got right "
        "(judge: questions both verdicts graded); p (F1): two-sided paired bootstrap. "
        f"Fewer than {MIN_PAIRED_ITEMS} paired questions: '{TOO_FEW}' instead of a p-value. "
        "An interval that contains 0 means no measurable difference."
    ]
    if any(row[0].startswith(BASE) for row in rows):
        notes.append(
            "base: the starting model, before any training, against SFT: negative is what SFT gained over it "
            "(a method's own gain over the starting model is its difference minus the base row's)."
        )
    return ReportTable(
        "Versus SFT",
        ["Method", "Baseline", "ΔEM [95% CI]", "p (EM)", "ΔF1 [95% CI]", "p (F1)", "ΔJudge", "p (judge)", "n"],
        ["left", "left"] + ["right"] * 7,
        rows,
        notes,
    )


def _p_text(p: float | None) -> str:
    if p is None:
        return TOO_FEW
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def build_report(store: ResultsStore, session_id: int, per_seed: bool = False) -> SessionReport:
    """The report of one stored session; runs repeated per seed are averaged (per_seed adds each)."""
    session = store.session(session_id)
    runs = session_run_data(store, session_id)
    summaries = summarize_runs(runs)
    merged = aggregate_seeds(summaries)
    unfinished = [f"{r.name}: {_status_text(r.status, r.reason)}" for r in runs if r.status != "done"]
    tables = [quality_table(merged, runs), efficiency_table(merged, mixed_encoder_cache_warning(runs))]
    tables[1].notes += placement_notes(runs)
    versus = versus_sft_table(runs)
    if versus is not None:
        tables.append(versus)
    data = data_table(runs)
    if data is not None:
        tables.append(data)
    probe = store.probe(session_id)
    if probe is not None:
        tables = [t for t in tables if t.rows] + [probe_table(*probe)]
    if per_seed and len(merged) < len(summaries):
        for table in (quality_table(summaries, runs), efficiency_table(summaries, mixed_encoder_cache_warning(runs))):
            table.title += " per seed"
            tables.append(table)
    extra_devices = [probe[0].device] if probe is not None else []
    return SessionReport(
        header_line(session, runs, extra_devices),
        unfinished,
        tables,
        [epoch_table(run) for run in runs if run.epochs],
        runs,
        merged,
    )


def render_markdown(store: ResultsStore, session_id: int, per_seed: bool = False) -> str:
    """The Markdown report of one stored session (vqabench export, --export, the dashboard)."""
    return report_markdown(build_report(store, session_id, per_seed))


def report_markdown(report: SessionReport, figures: Sequence[tuple[str, str]] = ()) -> str:
    """A SessionReport as Markdown: first line, unfinished runs, tables with their notes, and
    `figures` ((caption, relative path) of images written next to it) after the tables."""
    parts = [report.header, ""]
    if report.unfinished:
        parts += ["Runs that did not finish:", ""]
        parts += [f"- {line}" for line in report.unfinished]
        parts.append("")
    for table in report.tables:
        parts += _markdown_section("##", table)
    if figures:
        parts += ["## Figures", ""]
        for caption, link in figures:
            parts += [f"![{caption}]({link.replace(' ', '%20')})", "", f"*{caption}*", ""]
    if report.epoch_tables:
        parts += ["## Per epoch", "", EPOCH_NOTE, ""]
        for table in report.epoch_tables:
            parts += _markdown_section("###", table)
    return "\n".join(parts).rstrip("\n") + "\n"


def _markdown_section(level: str, table: ReportTable) -> list[str]:
    lines = [f"{level} {table.title}", "", *markdown_table(table)]
    if table.notes:
        lines += ["", *table.notes]
    return [*lines, ""]


def markdown_table(table: ReportTable) -> list[str]:
    """Pipe-table lines, columns padded to their widest cell, numbers right-aligned."""
    cells = [table.columns, *table.rows]
    cells = [[c.replace("|", "\\|") for c in row] for row in cells]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(table.columns))]

    def line(row: list[str]) -> str:
        padded = [c.rjust(w) if a == "right" else c.ljust(w) for c, w, a in zip(row, widths, table.align, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if a == "right" else (":" + "-" * (w + 1))
            for w, a in zip(widths, table.align, strict=True)
        )
        + "|"
    )
    return [line(cells[0]), rule, *(line(row) for row in cells[1:])]


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


def quality_table(summaries: Sequence[RunSummary], runs: Sequence[RunData]) -> ReportTable:
    """The paper's Table 1 shape: Method | EM | F1 | Judge | Epoch time."""
    with_kappa = any(s.kappa is not None for s in summaries)
    columns = ["Method", "Model", "EM ↑", "F1 ↑", "Judge ↑"]
    columns += (["κ judge/EM"] if with_kappa else []) + ["Epoch time [s] ↓"]
    rows = []
    bases = base_rows(runs)
    for name, run in bases:
        scores = run.base_eval
        assert scores is not None
        ci = {
            key: scores.extra[f"{key}_ci"]
            for key in ("em", "f1", "judge")
            if _is_interval(scores.extra.get(f"{key}_ci"))
        }
        row = [
            name,
            model_label(run.started) or NA,
            _score(scores.em, ci.get("em")),
            _score(scores.f1, ci.get("f1")),
            _score(scores.judge_score, ci.get("judge")),
        ]
        if with_kappa:
            row.append(_fmt(scores.extra.get("judge_kappa"), 2))
        rows.append([*row, "–"])
    for s in summaries:
        if s.seeds > 1:
            row = [s.name, s.model or NA, _pm(s, "em", 3), _pm(s, "f1", 3), _pm(s, "judge_score", 3)]
        else:
            row = [
                s.name,
                s.model or NA,
                _score(s.em, s.intervals.get("em")),
                _score(s.f1, s.intervals.get("f1")),
                _score(s.judge_score, s.intervals.get("judge")),
            ]
        if with_kappa:
            row.append(_pm(s, "kappa", 2))
        rows.append([*row, _pm(s, "epoch_seconds", 2)])
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
    return ReportTable("Quality", columns, ["left", "left"] + ["right"] * (len(columns) - 2), rows, notes)


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
    rows, noisy = [], False
    for s in summaries:
        memory = _fmt(s.peak_memory_mib, 1)
        if len(sources) > 1 and s.memory_source:
            memory += f" ({s.memory_source})"
        reference = {True: _fmt(s.reference_mib, 1), False: "none", None: NA}[s.uses_reference]
        if s.seeds > 1:
            memory = _pm(s, "peak_memory_mib", 1)
            if s.uses_reference:
                reference = _pm(s, "reference_mib", 1)
        relative = _pm(s, "relative_epoch_time", 2)
        low = None
        if s.relative_interval and s.seeds == 1 and relative != NA:
            relative += f" [{s.relative_interval[0]:.2f}, {s.relative_interval[1]:.2f}]"
            low = s.relative_interval[0]
        elif s.seeds > 1 and s.relative_epoch_time is not None and "relative_epoch_time" in s.spread:
            low = s.relative_epoch_time - s.spread["relative_epoch_time"]
        if noisy_ratio(s.method, low):
            relative += f" {NOISY}"
            noisy = True
        rows.append(
            [
                s.name,
                _pm(s, "epoch_seconds", 2) if s.seeds > 1 else epoch_time_text(s.epoch_spread),
                _fmt(s.warmup_seconds, 2) if s.warmup_seconds is not None else "–",
                relative,
                _pm(s, "aligned_seconds", 2),
                _pm(s, "samples_per_s", 1),
                memory,
                _pm(s, "peak_vs_orpo_mib", 1),
                reference,
                _fmt(s.optimizer_state_mib, 1),
                f"{s.trainable_params:,}" if s.trainable_params is not None else NA,
                s.trains or NA,
                s.precision or NA,
                s.model or NA,
            ]
            + ([s.reference or NA] if with_choice else [])
            + ([s.encoder_cache or NA] if with_cache else [])
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
    return ReportTable("Efficiency", columns, align, rows, notes)


REFERENCE_CHOICE_NOTE = (
    'Reference: the strategy the run kept; auto (the preset\'s reference = "auto") picks the cheapest exact '
    "one: precompute when the run has at least 2 epochs and the log-prob table fits the cache folder's free "
    "space, else adapter under LoRA, else copy. All three give the same log-probs; precompute's one-off "
    "pass is in Time to aligned model."
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
    limit = _int(stats.get("max_answer_tokens"))
    if limit != NA and stats.get("max_answer_tokens_setting") == "auto":
        limit += " (auto)"
    return [
        _int(quality.get("rows_read")),
        _int(quality.get("pairs_built")),
        skipped_text,
        _int(stats.get("p50")),
        _int(stats.get("p99")),
        _int(stats.get("max")),
        limit,
        _int(stats.get("truncated")),
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
    rows = []
    for e in run.epochs:
        memory = e.cuda_max_allocated_mib if cuda else e.peak_rss_mib
        row = [
            f"{e.epoch}{' ★' if e.is_best else ''}",
            _fmt(e.train_loss, 4),
            _fmt(e.eval_loss, 4),
            _fmt(e.epoch_seconds, 2),
            _fmt(memory, 1),
            _fmt(e.pref_accuracy, 3),
            _fmt(e.reward_margin, 3),
        ]
        if scored:
            row += [_fmt(e.em, 3), _fmt(e.f1, 3), _fmt(e.judge_score, 3)]
        if steps:
            row.append(
                f"{e.step_ms_median:.1f} ({e.step_ms_p10:.1f} … {e.step_ms_p90:.1f})"
                if e.step_ms_median is not None and e.step_ms_p10 is not None and e.step_ms_p90 is not None
                else NA
            )
        if loads:
            row.append(f"{_fmt(e.load_avg_max, 1)} / {e.cores or NA}")
        rows.append(row)
    notes = ["EM, F1, Judge per epoch: scored on a sample of eval-split answers."] if scored else []
    if loads:
        notes.append(
            "Load avg / cores: the highest 1-minute load average during the epoch's steps against the "
            "CPU threads the run used; above them, other work competed for the cores."
        )
    return ReportTable(f"{run.name} ({run.method}, {run.status})", columns, ["right"] * len(columns), rows, notes)


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
    rows, noisy = [], False
    for name, rounds in by_preset.items():
        times = steps[name]
        if not times:
            rows.append([name, rounds[0].method] + [NA] * 6)
            continue
        p10, median, p90 = quantiles(times, (0.1, 0.5, 0.9))
        relative = NA
        paired = [(m.step_ms, base_rounds[m.round]) for m in rounds if m.step_ms and m.round in base_rounds]
        if name == base:
            relative = "1.00"
        elif paired:
            ratio = ratio_ci([a for a, _ in paired], [b for _, b in paired], "median", paired=True)
            relative = f"{ratio.mean:.2f}"
            if ratio.low is not None and ratio.high is not None:
                relative += f" [{ratio.low:.2f}, {ratio.high:.2f}]"
            if noisy_ratio(rounds[0].method, ratio.low):
                relative += f" {NOISY}"
                noisy = True
        peaks = [v for v in (_number(m.peak_memory_mib) for m in rounds) if v is not None]
        uses_reference = rounds[0].reference_strategy is not None
        setup = sorted(m.setup_seconds for m in rounds)[len(rounds) // 2]
        rows.append(
            [
                name,
                rounds[0].method + (f" ({rounds[0].reference_strategy})" if uses_reference else ""),
                f"{median:.1f} ({p10:.1f} … {p90:.1f})",
                relative,
                f"{started.batch_size * 1000.0 / median:.1f}",
                _fmt(max(peaks), 1) if peaks else NA,
                _fmt(rounds[0].reference_bytes / MIB, 1) if uses_reference else "none",
                _fmt(setup, 2) if uses_reference else "–",
            ]
        )
    loads = [v for v in (_number(m.load_avg_max) for m in measured) if v is not None]
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
    )


def epoch_time_text(times: Spread | None) -> str:
    """hyperfine's style: `9.34 s ± 0.40 (8.90 … 12.50)`; one epoch: `9.34 s`."""
    if times is None:
        return NA
    if times.n < 2:
        return f"{times.median:.2f} s"
    return f"{times.median:.2f} s ± {times.std:.2f} ({times.low:.2f} … {times.high:.2f})"


def _status_text(status: str, reason: str) -> str:
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
    reference = _number(run.started.data.get("reference_seconds")) if run.started is not None else None
    entry = encoder_cache_entry(run)
    encoding = 0.0
    if entry is not None and entry not in {encoder_cache_entry(r) for r in before}:
        encoding = encodings.get(entry, 0.0)
    return run.finished.train_seconds + (reference or 0.0) + encoding


def _peak_memory(epochs: Sequence[EpochEnded]) -> tuple[float | None, str | None]:
    cuda = [v for v in (_number(e.cuda_max_allocated_mib) for e in epochs) if v is not None]
    if cuda:
        return max(cuda), "CUDA"
    rss = [v for v in (_number(e.peak_rss_mib) for e in epochs) if v is not None]
    return (max(rss), "RSS") if rss else (None, None)


def _ratio(value: float | None, base: float | None) -> float | None:
    """value / base, or None when either is unknown or the base is 0."""
    return value / base if value is not None and base else None


def _mean(values: Sequence[Any]) -> float | None:
    numbers = [v for v in values if _number(v) is not None]
    return mean(numbers) if numbers else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _is_interval(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_number(v) is not None for v in value)


def _int(value: Any) -> str:
    number = _number(value)
    return NA if number is None else f"{number:,.0f}"


def _fmt(value: Any, digits: int) -> str:
    number = _number(value)
    if number is None:
        return NA
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    return f"{number:.{digits}f}"


SEEDS_NOTE = (
    "Rows marked (N seeds): mean over the runs NAME@s0, NAME@s1, ... ± the half-width of a "
    "95% Student-t interval across seeds (pairs and splits fixed; initialisation, shuffling "
    "and dropout vary). `vqabench export --per-seed` adds every seed's own row."
)


def _pm(summary: RunSummary, key: str, digits: int) -> str:
    """A value, with ± its across-seed half-width when the row averages seeds."""
    text = _fmt(getattr(summary, key), digits)
    spread = summary.spread.get(key)
    if spread is not None and text != NA:
        text += f" ± {spread:.{digits}f}"
    return text


def _score(value: float | None, interval: list[float] | None) -> str:
    text = _fmt(value, 3)
    if interval and text != NA:
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text
