"""`vqabench probe`: the interleaved step-cost probe, run in one worker process and stored.

The host side of :mod:`vqabench.engine.probe`: it selects presets as ``--headless`` does
(``--preset``, ``--set``), starts one worker with the probe plan, records its events in the
results store as a session of its own (``vqabench export`` prints its table again), and
returns the table of :func:`vqabench.report.probe_table`. No torch here.
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
from vqabench.spec import ProbePlan, default_cache_dir
from vqabench.store import ResultsStore

#: Called with one line of news for the user (a round's result, a failure).
Say = Callable[[str], None]


@dataclass
class ProbeOutcome:
    """What a probe left: its session, its table (None when nothing was measured), and why it failed."""

    session_id: int
    table: ReportTable | None
    error: str | None = None
    measured: list[ProbeMeasured] = field(default_factory=list)


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
) -> ProbeOutcome:
    """Probe the selected presets' step cost in one worker; store and return the result.

    Raises SpecError (a bad preset or option) before anything starts, StoreError for an unusable store.
    `on_start` gets the worker process (the dashboard terminates it when the user quits).
    """
    chosen = select_presets(selection, overrides)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    plan = ProbePlan(chosen.specs, steps=steps, rounds=rounds, warmup=warmup, cache_dir=str(cache.resolve()))
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
        return ProbeOutcome(session.id, table, failure, measured)
