"""Tuning: one Optuna study per preset, whose trials are ordinary runs of the runner.

Each selected preset gets its own study in one storage (an SQLite file beside results.db by
default) and the same budget of trials. The budget is fixed when the study is created: that
process enqueues `trials` WAITING trials and every process (on this machine or another one
pointed at the same storage) pops them one at a time, so two processes share the budget, no
trial runs twice and none is added. TPE samples each popped trial's setting, seeded by the
study's seed and the trial's number (two processes never draw the same random start), and
MedianPruner stops a trial whose per-epoch objective lags (the runner cancels its run). Trial 0
runs the preset's own setting (when it lies inside the space), so the summary can show what
tuning gained over it, on eval.

Selection is on the eval split only: trials run with ``score_test`` false, so their worker
never holds a test pair. When every trial of a study has finished, its best setting is
retrained once as an ordinary run that scores the test split (the ``<preset>.tuned`` run);
a preset that starts from another (`after`) starts from that preset's tuned run's
checkpoint, so SFT is tuned first. Retraining rather than reusing the best trial's
checkpoint keeps the test split out of every trial's worker; the retrain repeats the best
trial's seed, data and setting.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from vqabench.events import EpochEnded
from vqabench.preload_launcher import PreloadServer
from vqabench.runner import (
    CANCELLED,
    DONE,
    Notification,
    Runner,
    RunnerFinished,
    RunState,
    WorkerEvent,
    shared_preload_server,
)
from vqabench.spec import RunSpec, SpecError, TuneParam, TuneSpace, tune_space
from vqabench.store import ResultsStore, SessionRecord

#: The default storage's file name, beside the results store's results.db.
STUDY_DB = "tune.db"
#: Seconds between looks at a study whose last trials other processes are still running.
POLL_SECONDS = 1.0
PRUNED_REASON = "pruned by the tuner (MedianPruner)"
INTERRUPTED_REASON = "interrupted"
#: A running trial writes a heartbeat to the storage this often (seconds); one whose heartbeat is
#: older than GRACE_SECONDS (its process killed, its machine gone) is marked failed by the next
#: process that looks. A trial of this machine whose process is gone is failed at once.
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 60

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class TuneSettings:
    """What `vqabench tune` was asked for, beside the presets."""

    trials: int
    storage: str | None = None  # an Optuna storage URL; None = sqlite:///<results>/tune.db
    study: str | None = None  # the studies' common name; None = derived from the presets and settings
    seed: int = 0  # TPE's seed (each trial's sampler draws from seed + trial number)
    prune: bool = True

    def validate(self) -> None:
        if self.trials < 1:
            raise SpecError(f"--trials has value {self.trials}; it must be at least 1.")


@dataclass
class Tuned:
    """What tuning one preset came to (the console summary's and the report's row is built from it)."""

    preset: str
    method: str
    study: str
    objective: str
    after: str | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_value: float | None = None
    best_trial: int | None = None
    final_run: str | None = None  # the retrained best setting, scored on test once
    final_state: RunState | None = None
    reason: str = ""  # why there is no tuned run (no trial finished, its start failed, ...)


def storage_url(storage: str | None, results_dir: Path) -> str:
    return storage or f"sqlite:///{(Path(results_dir) / STUDY_DB).resolve()}"


def shown_url(url: str) -> str:
    """The URL with any password replaced by ***, for messages and records."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@", 1)[-1] if "@" in url else url


def default_study_name(specs: Sequence[RunSpec], settings: TuneSettings) -> str:
    """A name that the same presets and settings give on any machine, so their processes join one study."""
    paths = {"output_dir", "cache_dir", "init_checkpoint", "concurrent_runs", "score_base"}
    described = [{k: v for k, v in s.to_dict().items() if k not in paths} for s in specs]
    text = json.dumps({"specs": described, "seed": settings.seed, "prune": settings.prune}, sort_keys=True)
    return "vqabench-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def open_storage(
    url: str, attempts: int = 5, heartbeat: int = HEARTBEAT_SECONDS, grace: int = GRACE_SECONDS
) -> optuna.storages.RDBStorage:
    """The study storage; an SQLite file waits for another process's write instead of failing.

    Two processes that find a new storage both create its tables, and one of them fails; it tries
    again and finds them made. Trials get a heartbeat every `heartbeat` seconds, and one silent for
    `grace` seconds is failed with its reason (see :func:`fail_orphaned_trials`). Raises SpecError
    (the URL without its password) when it cannot be opened.
    """
    from sqlalchemy.exc import IntegrityError, SQLAlchemyError

    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    if url.startswith("postgresql"):
        kwargs = {"connect_args": {"connect_timeout": 10}}
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # the heartbeat is an experimental argument
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=kwargs, heartbeat_interval=heartbeat, grace_period=grace
                )
        except ImportError:
            raise SpecError(
                f"the study storage {shown_url(url)} needs a database driver that is not installed "
                f"(psycopg, from pip install 'vqabench[tune-postgres]', for postgresql://; pymysql for mysql+pymysql://)."
            ) from None
        except SQLAlchemyError as exc:
            racing = isinstance(exc, IntegrityError) or any(w in str(exc) for w in ("already exists", "locked"))
            if not racing or attempt == attempts - 1:
                reason = type(getattr(exc, "orig", None) or exc).__name__
                raise SpecError(f"the study storage {shown_url(url)} cannot be opened ({reason}).") from None
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def fail_orphaned_trials(storage: optuna.storages.RDBStorage, name: str) -> list[int]:
    """Mark failed, with the reason, the running trials nobody runs any more; returns their numbers.

    A trial claimed on this machine whose process is gone (killed, even by SIGKILL) fails at once;
    one from anywhere whose heartbeat is older than the storage's grace period fails too, so the
    other processes do not wait for it forever.
    """
    study = optuna.load_study(storage=storage, study_name=name)
    here = socket.gethostname()
    grace = storage.grace_period or 2 * (storage.heartbeat_interval or HEARTBEAT_SECONDS)
    stale = set(storage._get_stale_trial_ids(study._study_id))  # Optuna's own heartbeat test
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
        if host == here and isinstance(pid, int) and not _alive(pid):
            reason = f"its tune process (pid {pid} on {host}) ended while it ran (killed?)"
        elif trial._trial_id in stale:
            reason = f"no heartbeat from its tune process (pid {pid} on {host}) for over {grace} s (killed?)"
        else:
            continue
        storage.set_trial_user_attr(trial._trial_id, "reason", reason)
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed.append(trial.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process failed it first
    return failed


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Heartbeat:
    """Records a running trial's heartbeat in the storage every interval, on a thread of its own."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int) -> None:
        self.storage, self.trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.storage.heartbeat_interval or HEARTBEAT_SECONDS):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a storage hiccup: the next beat tries again, within the grace period
                continue


def preset_setting(spec: RunSpec, space: TuneSpace) -> dict[str, Any] | None:
    """The preset's own values of the searched keys, when every one lies inside the space (else None)."""
    setting = {p.key: spec.resolved_beta if p.key == "beta" else getattr(spec, p.key) for p in space.params}
    for param in space.params:
        value = setting[param.key]
        inside = value in param.choices if param.choices is not None else param.low <= value <= param.high  # type: ignore[operator]
        if not inside:
            return None
    return setting


def open_study(
    storage: optuna.storages.BaseStorage, name: str, trials: int, first: dict[str, Any] | None = None
) -> optuna.Study:
    """Load the study, or create it with `trials` waiting trials (its budget); exactly one process creates it.

    `first`: the setting of trial 0 (the preset's own, so the study measures it and tuning can only
    improve on it on eval); the others are sampled.
    """
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="minimize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name)
        deadline = time.monotonic() + 120
        while "budget" not in study.user_attrs:  # its creator is still enqueuing the budget
            if time.monotonic() > deadline:
                raise SpecError(f"study {name} has no trial budget; it was not made by vqabench tune.") from None
            time.sleep(0.2)
        return study
    for number in range(trials):
        if number == 0 and first is not None:
            study.enqueue_trial(first, user_attrs={"preset_setting": True}, skip_if_exists=False)
        else:
            study.enqueue_trial({}, skip_if_exists=False)
    study.set_user_attr("budget", trials)
    return study


def pop_trial(storage: optuna.storages.BaseStorage, name: str, space: TuneSpace, settings: TuneSettings) -> Any:
    """The next waiting trial, claimed for this process (None when the budget is spent), its setting sampled."""
    study = optuna.load_study(storage=storage, study_name=name)
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            claimed = storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if not claimed:
            continue  # another process took it first
        storage.set_trial_user_attr(frozen._trial_id, "host", socket.gethostname())
        storage.set_trial_user_attr(frozen._trial_id, "pid", os.getpid())
        sampler = optuna.samplers.TPESampler(
            seed=settings.seed + frozen.number, n_startup_trials=max(2, min(10, settings.trials // 3))
        )
        pruner: optuna.pruners.BasePruner = (
            optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
            if settings.prune
            else optuna.pruners.NopPruner()
        )
        seeded = optuna.load_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner)
        seeded.get_trials(deepcopy=False)  # the study's own view of the storage learns the claimed trial
        trial = optuna.Trial(seeded, frozen._trial_id)
        for param in space.params:
            suggest(trial, param)
        return trial
    return None


def suggest(trial: optuna.Trial, param: TuneParam) -> Any:
    if param.choices is not None:
        return trial.suggest_categorical(param.key, list(param.choices))
    if param.is_int:
        return trial.suggest_int(param.key, int(param.low or 0), int(param.high or 0), log=param.log)
    return trial.suggest_float(param.key, float(param.low or 0.0), float(param.high or 0.0), log=param.log)


def objective_value(objective: str, epoch: EpochEnded) -> float:
    """The per-epoch value a trial reports: its eval loss, or the eval NLL of the chosen answers."""
    return epoch.eval_loss if objective == "eval_loss" else -epoch.chosen_logp


def wait_for_others(
    storage: optuna.storages.RDBStorage, name: str, say: Callable[[str], None], stop: threading.Event
) -> optuna.Study | None:
    """The study once no trial is waiting or running (other processes' trials included); None if stopped.

    A trial whose process died is failed on the way (:func:`fail_orphaned_trials`), so it is not waited for.
    """
    told = False
    while not stop.is_set():
        for number in fail_orphaned_trials(storage, name):
            say(f"[{name}] trial {number} failed: its process is gone")
        study = optuna.load_study(storage=storage, study_name=name)
        busy = study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
        if not busy:
            return study
        if not told:
            say(f"waiting for {len(busy)} trial(s) of study {name} that other processes are running")
            told = True
        stop.wait(POLL_SECONDS)
    return None


class Tuner:
    """Tunes presets in order, each through its study; every trial and tuned run is recorded in one session.

    With several GPUs (``gpus = [0, 1]``, one process per run) a preset's trials run one per GPU at
    once, each placed by the runner's DevicePool on its own GPU; the tuned run takes a free one.
    """

    def __init__(
        self,
        specs: Sequence[RunSpec],
        settings: TuneSettings,
        store: ResultsStore,
        session: SessionRecord,
        *,
        worker_cmd: Sequence[str] | None = None,
        cache_dir: Path | str | None = None,
        subscribers: Sequence[Callable[[Notification], None]] = (),
        say: Callable[[str], None] = print,
    ) -> None:
        settings.validate()
        self.specs = list(specs)
        self.spaces = {s.name: tune_space(s, s.name) for s in self.specs}
        self.settings = settings
        self.store = store
        self.session = session
        self.url = storage_url(settings.storage, store.results_dir)
        self.study_base = settings.study or default_study_name(self.specs, settings)
        self.worker_cmd = worker_cmd
        self.cache_dir = cache_dir
        self.subscribers = list(subscribers)
        self.say = say
        self.outcomes: dict[str, Tuned] = {}
        self._stop = threading.Event()
        self._active: dict[str, Runner] = {}  # run name -> the runner running it (one per GPU lane)
        self._lock = threading.Lock()
        self._record_lock = threading.Lock()
        self._preload: PreloadServer | None = None
        self._recorder = store.recorder(session)

    @property
    def interrupted(self) -> bool:
        return self._stop.is_set()

    @interrupted.setter
    def interrupted(self, value: bool) -> None:
        if value:
            self._stop.set()
        else:
            self._stop.clear()

    def study_name(self, preset: str) -> str:
        return f"{self.study_base}.{preset}"

    def run(self) -> dict[str, Tuned]:
        """Tune every preset (its `after` target first); returns what each came to."""
        storage = open_storage(self.url)
        self._preload = shared_preload_server(self.worker_cmd)  # torch imported once for every trial
        try:
            for spec in self.specs:
                if self.interrupted:
                    break
                self.outcomes[spec.name] = self._tune_one(storage, spec)
        finally:
            if self._preload is not None:
                self._preload.close()
        return self.outcomes

    def cancel(self, reason: str = INTERRUPTED_REASON) -> None:
        """Stop: each running trial's worker is stopped (the trial recorded FAIL with `reason`), nothing
        else starts. Safe from any thread and from a signal handler."""
        self._stop.set()
        with self._lock:
            active = list(self._active.items())
        for run_name, runner in active:
            # From another thread the runner hands the cancel to its loop and wakes it (a signal
            # handler runs on the loop's own thread, where a direct call would not wake it).
            threading.Thread(target=runner.cancel, args=(run_name, reason), daemon=True).start()

    def lanes(self, spec: RunSpec) -> list[RunSpec]:
        """The specs trials run on at once: one per GPU of `gpus` for single-process runs, else `spec`."""
        if len(spec.gpus) > 1 and spec.nproc_per_node == 1 and spec.nnodes == 1:
            return [spec.replace(gpus=[gpu]) for gpu in spec.gpus]
        return [spec]

    def _tune_one(self, storage: optuna.storages.RDBStorage, spec: RunSpec) -> Tuned:
        space = self.spaces[spec.name]
        name = self.study_name(spec.name)
        outcome = Tuned(spec.name, spec.method, name, space.objective, after=spec.after)
        if spec.after is not None:
            start = self.outcomes.get(spec.after)
            checkpoint = start.final_state.checkpoint if start and start.final_state else None
            if checkpoint is None:
                outcome.reason = f"skipped: {spec.after} has no tuned checkpoint to start from"
                return outcome
            spec = spec.replace(after=None, init_checkpoint=checkpoint)
        study = open_study(storage, name, self.settings.trials, preset_setting(spec, space))
        for key, value in (("objective", space.objective), ("method", spec.method), ("after", outcome.after)):
            study.set_user_attr(key, value)  # what the summary reads back, whichever process asks
        for number in fail_orphaned_trials(storage, name):  # a killed earlier run of this command
            self.say(f"[{spec.name}.trial{number}] failed: its process is gone")
        lanes = self.lanes(spec)
        if len(lanes) == 1:
            self._run_trials(storage, name, space, lanes[0])
        else:
            threads = [
                threading.Thread(target=self._run_trials, args=(storage, name, space, lane), name=f"lane-{lane.gpus}")
                for lane in lanes
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        done = None if self.interrupted else wait_for_others(storage, name, self.say, self._stop)
        if done is None:
            outcome.reason = INTERRUPTED_REASON
            return outcome
        finished = [t for t in done.trials if t.state == TrialState.COMPLETE]
        if not finished:
            outcome.reason = "no trial finished"
            return outcome
        best = done.best_trial
        outcome.best_params, outcome.best_value, outcome.best_trial = dict(best.params), best.value, best.number
        final = spec.replace(name=f"{spec.name}.tuned", **best.params, score_test=True, seeds=[])
        self.say(f"[{spec.name}] best of {len(done.trials)} trial(s): trial {best.number} {best.params}")
        state = self._run(final)
        outcome.final_run, outcome.final_state = final.name, state
        if state.status != DONE:
            outcome.reason = f"the tuned run {state.status}: {state.reason}"
        return outcome

    def _run_trials(self, storage: optuna.storages.RDBStorage, name: str, space: TuneSpace, spec: RunSpec) -> None:
        """Pop and run the study's waiting trials, one after another, until none is left or tune stops."""
        while not self.interrupted:
            with self._lock:  # TPE samples from the trials told so far; one lane samples at a time
                trial = pop_trial(storage, name, space, self.settings)
            if trial is None:
                return
            self._run_trial(storage, spec, space, trial)

    def _run_trial(
        self, storage: optuna.storages.RDBStorage, spec: RunSpec, space: TuneSpace, trial: optuna.Trial
    ) -> None:
        run_name = f"{spec.name}.trial{trial.number}"
        trial_spec = spec.replace(name=run_name, score_test=False, seeds=[], **trial.params)
        reported: dict[int, float] = {}
        pruned = False

        def report(note: Notification) -> None:
            nonlocal pruned
            if not (isinstance(note, WorkerEvent) and isinstance(note.event, EpochEnded)) or pruned:
                return
            value = objective_value(space.objective, note.event)
            reported[note.event.epoch] = value
            trial.report(value, note.event.epoch)
            if note.event.is_best:
                reported[0] = value  # the value at the checkpoint a retrain would keep
            if note.event.epoch < trial_spec.epochs and trial.should_prune():
                pruned = True
                self._active[run_name].cancel(run_name, reason=PRUNED_REASON)

        trial.set_user_attr("run", run_name)
        trial.set_user_attr("session", self.session.id)
        with Heartbeat(storage, trial._trial_id):
            state = self._run(trial_spec, report)
        seconds = (state.finished_at or 0.0) - (state.started_at or state.finished_at or 0.0)
        try:
            trial.set_user_attr("seconds", seconds)
            if state.status == DONE and 0 in reported:
                trial.study.tell(trial, reported[0])
            elif state.status == CANCELLED and pruned:
                trial.study.tell(trial, state=TrialState.PRUNED)
            else:
                reason = state.reason or f"the run ended {state.status} without a finished epoch"
                trial.set_user_attr("reason", reason)
                trial.study.tell(trial, state=TrialState.FAIL)
                self.say(f"[{run_name}] failed: {reason}")
        except optuna.exceptions.UpdateFinishedTrialError:  # another process failed it (no heartbeat)
            self.say(f"[{run_name}] was marked failed by another process meanwhile; its result is not counted")

    def _run(self, spec: RunSpec, observer: Callable[[Notification], None] | None = None) -> RunState:
        runner = Runner(
            [spec],
            runs_dir=self.store.results_dir / "runs",
            session=self.session.label,
            worker_cmd=self.worker_cmd,
            cache_dir=self.cache_dir,
            preload=self._preload,
        )
        runner.subscribe(self._record)
        if observer is not None:
            runner.subscribe(observer)
        for subscriber in self.subscribers:
            runner.subscribe(subscriber)
        with self._lock:
            if self.interrupted:  # stopped between the pop and here
                runner.cancel(spec.name, reason=INTERRUPTED_REASON)
            self._active[spec.name] = runner
        try:
            asyncio.run(runner.run())
        except KeyboardInterrupt:  # Ctrl-C without tune's handler: the runner has stopped the worker
            self._stop.set()
        finally:
            with self._lock:
                self._active.pop(spec.name, None)
        if runner.fatal:
            self._stop.set()
        return runner.states[spec.name]

    def _record(self, note: Notification) -> None:
        if not isinstance(note, RunnerFinished):  # one session spans many runners; tune finishes it
            with self._record_lock:  # trials on several GPUs report from their own threads
                self._recorder(note)


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial of a study as plain values (number, state, value, params, seconds, reason)."""
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": dict(t.params),
            "seconds": t.user_attrs.get("seconds"),
            "reason": t.user_attrs.get("reason", ""),
            "run": t.user_attrs.get("run"),
        }
        for t in study.trials
    ]


__all__ = [
    "STUDY_DB",
    "TuneSettings",
    "Tuned",
    "Tuner",
    "default_study_name",
    "fail_orphaned_trials",
    "open_storage",
    "shown_url",
    "storage_url",
    "trial_rows",
]
