"""`vqabench probe`: the interleaved step-cost probe, run in one worker process and stored.

The host side of :mod:`vqabench.engine.probe`: it selects presets as ``--headless`` does
(``--preset``, ``--set``), starts one worker with the probe plan, records its events in the
results store as a session of its own (``vqabench export`` prints its table again), and
returns the table of :func:`vqabench.report.probe_table`. No torch here, but for
:func:`probe_memory` (`--memory`), which builds the models on torch's meta device in this process.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vqabench.events import EventError, ProbeMeasured, ProbeStarted, Progress, RunFailed, parse_event
from vqabench.presets import Overrides, select_presets
from vqabench.report import ReportTable, probe_table
from vqabench.runner import DONE, FAILED, _worker_env, default_worker_cmd
from vqabench.spec import ProbePlan, RunSpec, default_cache_dir
from vqabench.store import DB_NAME, ResultsStore

#: Called with one line of news for the user (a round's result, a failure).
Say = Callable[[str], None]


@dataclass
class ProbeOutcome:
    """What a probe left: its session, its table (None when nothing was measured), and why it failed."""

    session_id: int
    table: ReportTable | None
    error: str | None = None
    measured: list[ProbeMeasured] = field(default_factory=list)
    specs: list[RunSpec] = field(default_factory=list)  # the presets probed, at the probe's batch size


#: Each exact saving a run takes by default, and the preset change that turns it off.
SAVINGS_OFF: tuple[tuple[str, dict[str, object]], ...] = (
    ("no-shared-prompt", {"shared_prompt": False}),
    ("full-logits", {"answer_only_logits": False}),
    ("no-feature-cache", {"encoder_cache": "off"}),
)


def savings_variants(spec: RunSpec) -> list[RunSpec]:
    """`spec` as it is, then once with each saving it takes turned off, named NAME-<saving off>.

    A saving the preset already has off, or one its family ignores, gives a row that times the
    same step (the table shows it: two presets that do the same work overlap).
    """
    variants = [spec]
    for suffix, off in SAVINGS_OFF:
        if all(getattr(spec, key) == value for key, value in off.items()):
            continue  # already off in the preset
        if "encoder_cache" in off and not spec.uses_encoder_cache:
            continue
        variants.append(spec.replace(name=f"{spec.name}-{suffix}", **off))
    return variants


def run_probe(
    selection: str,
    overrides: Overrides,
    results_dir: Path | str,
    *,
    steps: int = 20,
    rounds: int = 3,
    warmup: int = 3,
    cache_dir: Path | str | None = None,
    worker_cmd: Sequence[str] | None = None,
    command: str = "",
    say: Say = print,
    on_start: Callable[[subprocess.Popen], None] | None = None,
    savings: bool = False,
) -> ProbeOutcome:
    """Probe the selected presets' step cost in one worker; store and return the result.

    Raises SpecError (a bad preset or option) before anything starts, StoreError for an unusable store.
    `on_start` gets the worker process (the dashboard terminates it when the user quits).
    `savings`: probe each preset also with each exact saving off (:func:`savings_variants`).
    """
    chosen = select_presets(selection, overrides)
    specs = [variant for spec in chosen.specs for variant in savings_variants(spec)] if savings else chosen.specs
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    plan = ProbePlan(specs, steps=steps, rounds=rounds, warmup=warmup, cache_dir=str(cache.resolve()))
    plan.validate("vqabench probe")
    with ResultsStore(results_dir) as store:
        session = store.begin_session(selection, command)
        folder = store.results_dir / "runs" / re.sub(r"[^\w.@-]", "_", f"{session.label}-probe")
        folder.mkdir(parents=True, exist_ok=True)
        plan_path = folder / "probe.json"
        plan_path.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        (store.results_dir / "events").mkdir(exist_ok=True)
        events_path = store.results_dir / "events" / f"{session.label}-probe.jsonl"
        stderr_path = store.results_dir / "events" / f"{session.label}-probe.stderr.log"
        say(
            f"Session {session.id}: probing {', '.join(s.name for s in chosen.specs)}: {steps} steps x "
            f"{rounds} interleaved rounds in one worker; results in {store.path}"
        )
        started: ProbeStarted | None = None
        measured: list[ProbeMeasured] = []
        failure: str | None = None
        cmd = [*(worker_cmd or default_worker_cmd()), str(plan_path)]
        with stderr_path.open("w") as stderr, events_path.open("w") as log:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True, env=_worker_env(None)
            )
            assert proc.stdout is not None
            if on_start is not None:
                on_start(proc)
            try:
                for line in proc.stdout:
                    log.write(line)
                    try:
                        event = parse_event(line)
                    except EventError:
                        continue
                    if isinstance(event, ProbeStarted):
                        started = event
                        store.add_probe(session.id, event)
                        say(f"{event.device}, start model {event.model_source}, batch {event.batch_size}")
                    elif isinstance(event, ProbeMeasured):
                        measured.append(event)
                        store.add_probe_round(session.id, event)
                        median = sorted(event.step_ms)[len(event.step_ms) // 2] if event.step_ms else float("nan")
                        say(f"round {event.round}/{rounds} {event.preset}: {median:.1f} ms/step")
                    elif isinstance(event, Progress) and event.phase == "base":
                        if event.step in (1, event.steps):
                            say(f"building the base checkpoint: step {event.step}/{event.steps}")
                    elif isinstance(event, RunFailed):
                        failure = event.message
            finally:
                code = proc.wait()
        if failure is None and code != 0:
            tail = stderr_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            failure = f"the probe worker exited with code {code}; its last log line was: {tail[0]}"
        store.finish_session(session.id, FAILED if failure else DONE)
        table = probe_table(started, measured) if started is not None and measured else None
        specs = [spec.replace(batch_size=plan.specs[0].batch_size) for spec in plan.specs]
        return ProbeOutcome(session.id, table, failure, measured, specs)


#: The spec keys a stored run must share with a preset for its peak to stand beside the preset's estimate.
_SAME_SETTINGS = ("model", "method", "train", "precision", "batch_size", "reference", "lora_r", "lora_targets")


@dataclass(frozen=True)
class MeasuredPeak:
    """A CUDA peak a session measured for a preset, and where it comes from."""

    mib: float
    where: str  # "probe session 3", "run 12 of session 4"


def stored_cuda_peaks(results_dir: Path | str, specs: Sequence[RunSpec]) -> dict[str, MeasuredPeak]:
    """The newest stored CUDA peak of each preset (by name) measured with its model, method and batch settings.

    A probe round qualifies with the same preset name and batch size; a run with the same name
    and the same :data:`_SAME_SETTINGS`. RSS peaks (CPU sessions) are left out: they hold the
    whole process, not the step's tensors. An absent store gives no peaks (nothing is created).
    """
    if not (Path(results_dir) / DB_NAME).exists():
        return {}
    wanted = {spec.name: spec for spec in specs}
    found: dict[str, MeasuredPeak] = {}
    with ResultsStore(results_dir, create=False) as store:
        for session in store.list_sessions():  # newest first
            probed = store.probe(session.id)
            if probed is not None:
                started, rounds = probed
                for event in rounds:
                    spec = wanted.get(event.preset)
                    if (
                        spec is not None
                        and event.preset not in found
                        and event.memory_source == "CUDA"
                        and event.peak_memory_mib is not None
                        and started.batch_size == spec.batch_size
                    ):
                        peak = max(e.peak_memory_mib or 0.0 for e in rounds if e.preset == event.preset)
                        found[event.preset] = MeasuredPeak(peak, f"probe session {session.id}")
            for run in store.runs(session.id):
                spec = wanted.get(run.name)
                if spec is None or run.name in found:
                    continue
                if any(run.spec.get(key) != getattr(spec, key) for key in _SAME_SETTINGS):
                    continue
                peaks = [e.cuda_max_allocated_mib for e in store.epochs(run.id) if e.cuda_max_allocated_mib]
                if peaks:
                    found[run.name] = MeasuredPeak(float(max(peaks)), f"run {run.id} of session {session.id}")
    return found


def memory_estimate_text(
    specs: Sequence[RunSpec],
    *,
    cache_rows: int = 0,
    measured: dict[str, MeasuredPeak] | None = None,
) -> str:
    """Each preset's estimated training-step peak (GiB) by term, beside its measured CUDA peak where one exists.

    Builds every model on torch's meta device (no memory, no step run); `cache_rows` are the rows of
    the in-memory encoder cache and precomputed table the probe holds (its batches' pairs).
    """
    from vqabench.engine.memory_estimate import estimate_memory

    lines = []
    for spec in specs:
        estimate = estimate_memory(spec, cache_rows=cache_rows)
        lines.append(
            f"{spec.name}: {spec.model}, train {spec.train}, {spec.method}, {spec.precision}, batch {spec.batch_size}"
        )
        for name, value in estimate.terms.items():
            if value:
                lines.append(f"  {name:<16} {value / 2**30:9.3f} GiB")
        total = estimate.gib()
        lines.append(f"  {'estimated peak':<16} {total:9.3f} GiB")
        peak = (measured or {}).get(spec.name)
        if peak is not None:
            gib = peak.mib / 1024
            where = f"CUDA, {peak.where}"
            lines.append(f"  {'measured peak':<16} {gib:9.3f} GiB ({where}); estimate/measured {total / gib:.2f}")
        lines.append(f"  assumed: {'; '.join(estimate.assumptions)}")
        lines.append("")
    lines.append(
        "Counted: weights, gradients, AdamW state, reference, autocast weight copies, saved activations, "
        "answer logits, in-memory encoder cache. Left out: CUDA context and allocator overhead, eval passes "
        "(docs/telemetry.md, 'Memory estimate')."
    )
    return "\n".join(lines) + "\n"


def measured_cuda_peaks(outcome: ProbeOutcome) -> dict[str, MeasuredPeak]:
    """The probe's own CUDA peaks, each preset's largest round; empty for a CPU probe (RSS)."""
    peaks: dict[str, MeasuredPeak] = {}
    for event in outcome.measured:
        if event.memory_source == "CUDA" and event.peak_memory_mib is not None:
            mib = max(event.peak_memory_mib, peaks[event.preset].mib if event.preset in peaks else 0.0)
            peaks[event.preset] = MeasuredPeak(mib, f"probe session {outcome.session_id}")
    return peaks


def probe_memory(
    selection: str,
    overrides: Overrides,
    results_dir: Path | str,
    *,
    steps: int = 20,
    warmup: int = 3,
) -> str:
    """`vqabench probe --memory`: the selected presets' estimates as the probe would run them, no step run.

    Raises SpecError for a bad preset or option, or a model the estimate cannot build.
    """
    chosen = select_presets(selection, overrides)
    batch = chosen.specs[0].batch_size  # the probe runs every preset at the first one's batch
    specs = [spec.replace(batch_size=batch) for spec in chosen.specs]
    measured = stored_cuda_peaks(results_dir, specs)
    return memory_estimate_text(specs, cache_rows=batch * (steps + warmup), measured=measured)
