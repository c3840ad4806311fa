"""The runner: one worker subprocess per run, in dependency order, with clean cancellation.

No UI here: the headless console and the Textual dashboard drive the same Runner::

    runner = Runner(specs, runs_dir=results / "runs", session="20260526-101500-3")
    runner.subscribe(callback)          # plain callable, called on the event loop's thread
    states = await runner.run()         # returns when every run is final
    runner.cancel("dpo-beta0.1")        # one run (queued or running); from any thread
    runner.cancel()                     # everything: the running worker and all queued runs

Notifications (dataclasses below) reach subscribers in order: :class:`RunQueued` for every
run, then per run :class:`RunStatusChanged` (running, then done / failed / skipped /
cancelled), :class:`WorkerEvent` for each valid stdout line (the events.py protocol),
:class:`WorkerStderr` for each log line, :class:`InvalidWorkerLine` for stdout that is not
an event (counted, logged, skipped), and finally :class:`RunnerFinished`. A subscriber that
raises is logged and the runs go on. ``runner.states`` holds each run's :class:`RunState`.

Runs go one at a time by default, so timings on one device do not interfere. With ``gpus``
(``--gpus 0,1``) independent runs train at the same time, one per free GPU, each seeing its
own through ``CUDA_VISIBLE_DEVICES``; ``parallel`` (``--parallel N``) lets N runs without GPUs
share the host (their epoch times are then measured concurrently, which the spec records as
``concurrent_runs``). A run waits for its ``after`` target either way. A run with
``nproc_per_node`` or ``nnodes`` above 1 starts through torchrun (vqabench/launch.py builds
every command line and places every run). Before a run starts the
runner sets its ``output_dir`` (``<runs_dir>/<session>-<run>/``), ``cache_dir`` and, for a
run with ``after``, ``init_checkpoint`` (the target's ``run_finished.checkpoint``), writes
``spec.json`` there and starts ``<worker_cmd> spec.json`` in its own process group (a run whose
``after`` is not among the specs keeps the ``init_checkpoint`` it was given). A run
whose worker crashes fails alone; its dependants are skipped ("skipped: sft failed"); the
others go on. Cancelling sends SIGTERM to the worker's process group, SIGKILL after
``grace_seconds``, and always SIGKILLs what is left of the group once the worker has exited,
so no grandchild outlives its run. If the task running :meth:`Runner.run` is itself
cancelled, the running workers are terminated the same way before the cancellation goes on.
torchrun starts each rank in a session of its own: the runner signals every process group
below the worker it started, not only the worker's own. On Linux a single-process run with a
``python -m MODULE`` worker starts through vqabench/preload_launcher.py, which has the worker
forked from a server that imported it (and torch) once per session; the launcher forwards
signals and exit codes, so none of the above changes (``VQABENCH_PRELOAD=0``: no server).
A host killed with SIGKILL cannot clean up; its worker then runs to its end on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vqabench.events import (
    EpochEnded,
    Evaluated,
    Event,
    EventError,
    Progress,
    RunFailed,
    RunFinished,
    RunStarted,
    parse_event,
)
from vqabench.launch import DevicePool, Placement, check_launch, is_distributed, launch_command, visible_gpus
from vqabench.preload_launcher import PreloadServer, preload_module
from vqabench.presets import order_runs
from vqabench.spec import RunSpec, default_cache_dir

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, SKIPPED, CANCELLED = ("queued", "running", "done", "failed", "skipped", "cancelled")
#: Set by the results store, never by a runner: the host process died before the run ended.
INTERRUPTED = "interrupted"
STATUSES = (QUEUED, RUNNING, DONE, FAILED, SKIPPED, CANCELLED, INTERRUPTED)
FINAL_STATUSES = frozenset({DONE, FAILED, SKIPPED, CANCELLED, INTERRUPTED})


def status_line(status: str, reason: str) -> str:
    """'failed: why' for a console or status bar; the reason alone when it already names its status."""
    if reason.startswith(status):  # e.g. "skipped: sft failed"
        return reason
    return status + (f": {reason}" if reason else "")


#: stderr lines kept per run for the failure message and the dashboard.
STDERR_TAIL = 80
#: Longest stdout line accepted from a worker (a run_started with a large config is long).
LINE_LIMIT = 16 * 2**20


def default_worker_cmd() -> list[str]:
    """The real worker, run by the same interpreter as the host."""
    return [sys.executable, "-m", "vqabench.engine.worker"]


@dataclass(frozen=True)
class RunQueued:
    """A run will be started when its turn comes (position = its place in the order)."""

    run: str
    spec: RunSpec
    position: int


@dataclass(frozen=True)
class RunStatusChanged:
    """A run's status moved on; `reason` is one sentence for failed/skipped/cancelled.

    For "running", `spec` is the spec as written for the worker (output_dir, cache_dir and
    init_checkpoint filled in) and `pid` its process; `exit_code` is set once it exited.
    """

    run: str
    status: str
    reason: str = ""
    spec: RunSpec | None = None
    pid: int | None = None
    exit_code: int | None = None
    device: str = ""  # for "running": where it trains ("GPU 1", "2 processes"; "" = the default device)


@dataclass(frozen=True)
class WorkerEvent:
    """One valid event from a worker's stdout, with the raw line it came from."""

    run: str
    event: Event
    line: str


@dataclass(frozen=True)
class WorkerStderr:
    """One log line from a worker's stderr."""

    run: str
    line: str


@dataclass(frozen=True)
class InvalidWorkerLine:
    """A stdout line that is not an event; it is counted and skipped."""

    run: str
    line: str
    error: str


@dataclass(frozen=True)
class RunnerFinished:
    """Every run is final; `cancelled` says whether the whole runner was cancelled."""

    statuses: dict[str, str]
    cancelled: bool


class FatalSubscriberError(Exception):
    """Raised by a subscriber that cannot go on (the results store cannot be written).

    The runner then stops: it drops that subscriber, fails the running run with the
    exception's message (one sentence naming what failed), and cancels the rest.
    """


Notification = RunQueued | RunStatusChanged | WorkerEvent | WorkerStderr | InvalidWorkerLine | RunnerFinished
Subscriber = Callable[[Notification], None]


@dataclass
class RunState:
    """What the runner knows about one run, updated as its events arrive."""

    spec: RunSpec
    status: str = QUEUED
    reason: str = ""
    pid: int | None = None
    exit_code: int | None = None
    started_at: float | None = None  # time.time()
    finished_at: float | None = None
    phase: str = ""  # last progress phase, or "epoch_end" right after an epoch
    epoch: int = 0  # epoch of the last progress or epoch_end event
    epochs_done: int = 0
    started: RunStarted | None = None
    finished: RunFinished | None = None
    failed: RunFailed | None = None
    invalid_lines: int = 0
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL))
    cancel_requested: bool = False
    cancel_reason: str = "cancelled"  # what the final status line says (Runner.cancel's reason)
    device: str = ""  # where it trains, once started (launch.Placement.label)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def checkpoint(self) -> str | None:
        return self.finished.checkpoint if self.finished else None


class Runner:
    """Runs specs one by one as worker subprocesses and reports what happens to subscribers."""

    def __init__(
        self,
        specs: Sequence[RunSpec],
        *,
        runs_dir: Path | str,
        session: str = "",
        worker_cmd: Sequence[str] | None = None,
        cache_dir: Path | str | None = None,
        grace_seconds: float = 5.0,
        env: dict[str, str] | None = None,
        parallel: int = 1,
        gpus: Sequence[int] | None = None,
        preload: PreloadServer | None = None,
    ) -> None:
        """`preload`: a preload server shared by runners that follow one another (``vqabench tune``'s
        trials), closed by whoever made it (:func:`shared_preload_server`); None = this runner's own."""
        self.specs = order_runs(specs)
        self.runs_dir = Path(runs_dir).resolve()
        self.session = session
        self.worker_cmd = list(worker_cmd) if worker_cmd else default_worker_cmd()
        self.cache_dir = (Path(cache_dir) if cache_dir else default_cache_dir()).resolve()
        self.grace_seconds = grace_seconds
        self.parallel = max(parallel, 1)
        #: the GPUs that exist; None = ask launch.visible_gpus() when the runs start
        self.visible_gpus = list(gpus) if gpus is not None else None
        self.states: dict[str, RunState] = {s.name: RunState(s) for s in self.specs}
        self._env = _worker_env(env)
        self._subscribers: list[Subscriber] = []
        self._cancel_all = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cancel_signals: dict[str, asyncio.Event] = {}
        self._started = False
        self._launching: set[str] = set()  # runs whose workers are being started
        # Starting models (RunSpec.starting_model_key) whose "base" scores arrived, and the run asked for
        # them meanwhile: a run that ends without them (killed, failed) passes the task to the next from there.
        self._base_scored: set[str] = set()
        self._base_scoring: dict[str, str] = {}
        self.fatal: str | None = None  # why the runs were stopped (a subscriber that cannot go on)
        self._owns_preload = preload is None
        self._preload = shared_preload_server(self.worker_cmd, env) if preload is None else preload

    # -- public API -------------------------------------------------------------------------

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback` with every notification from now on; returns an unsubscribe."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    @property
    def all_done(self) -> bool:
        return all(s.status == DONE for s in self.states.values())

    def check(self) -> None:
        """Raise SpecError (one sentence) when a run cannot be placed or started on this host."""
        if self.visible_gpus is None:
            self.visible_gpus = visible_gpus()
        check_launch(self.specs, self.visible_gpus)

    async def run(self) -> dict[str, RunState]:
        """Run every spec, each when its `after` target is done and its devices are free.

        Returns the final states. A Runner runs once; SpecError before anything starts when a
        run cannot be placed (see :meth:`check`).
        """
        if self._started:
            raise RuntimeError("this Runner has already run; make a new one")
        self.check()
        self._started = True
        self._loop = asyncio.get_running_loop()
        for position, spec in enumerate(self.specs):
            self._notify(RunQueued(spec.name, spec, position))
        pool = DevicePool(self.parallel)
        running: dict[str, asyncio.Future[None]] = {}
        try:
            while True:
                self._start_ready(pool, running)
                if not running:
                    break
                try:
                    done, _ = await asyncio.wait(list(running.values()), return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:
                    for task in running.values():
                        task.cancel()
                    await asyncio.gather(*running.values(), return_exceptions=True)
                    raise
                for name in [n for n, task in running.items() if task in done]:
                    running.pop(name).result()
        finally:
            if self._preload is not None and self._owns_preload:
                self._preload.close()
            for state in self.states.values():
                if state.status not in FINAL_STATUSES:
                    self._set_status(state, CANCELLED, "cancelled: the runner was stopped")
            self._notify(RunnerFinished({n: s.status for n, s in self.states.items()}, self._cancel_all))
        return self.states

    def _start_ready(self, pool: DevicePool, running: dict[str, asyncio.Future[None]]) -> None:
        """Start, in order, every queued run whose target is done and whose devices are free."""
        for spec in self.specs:
            state = self.states[spec.name]
            if state.status != QUEUED or spec.name in running:
                continue
            if self._cancel_all or state.cancel_requested:
                self._set_status(state, CANCELLED, self._not_started_reason())
                continue
            target = self.states.get(spec.after) if spec.after else None
            if target is not None and target.status not in FINAL_STATUSES:
                continue  # waits for its SFT
            blocker = self._blocker(spec)
            if blocker is not None:
                self._set_status(state, SKIPPED, f"skipped: {blocker.name} {blocker.status}")
                continue
            placement = pool.acquire(spec)
            if placement is None:
                continue
            running[spec.name] = asyncio.ensure_future(self._run_placed(state, placement, pool))
        if not running:  # nothing runs, so every device is free: what is left can never start
            for state in self.states.values():
                if state.status == QUEUED:
                    self._set_status(state, FAILED, f"could not be placed on the devices {state.spec.gpus}.")

    async def _run_placed(self, state: RunState, placement: Placement, pool: DevicePool) -> None:
        try:
            await self._run_one(state, placement)
        finally:
            pool.release(placement)

    def cancel(self, run_name: str | None = None, reason: str | None = None) -> None:
        """Cancel one run (queued or running) or, with no name, everything; thread-safe.

        `reason` (e.g. "pruned by the tuner") replaces "cancelled" in the run's final status line.
        """
        if reason is not None and run_name is not None and run_name in self.states:
            self.states[run_name].cancel_reason = reason
        if run_name is not None and run_name not in self.states:
            raise KeyError(f"no run named {run_name!r}; runs are {', '.join(self.states)}")
        loop = self._loop
        if loop is not None and loop.is_running():
            try:
                current = asyncio.get_running_loop()
            except RuntimeError:
                current = None
            if current is not loop:
                loop.call_soon_threadsafe(self._request_cancel, run_name)
                return
        self._request_cancel(run_name)

    # -- internals --------------------------------------------------------------------------

    def _request_cancel(self, run_name: str | None) -> None:
        if run_name is None:
            self._cancel_all = True
        targets = self.states.values() if run_name is None else [self.states[run_name]]
        for state in targets:
            if state.status in FINAL_STATUSES:
                continue
            state.cancel_requested = True
            if state.status == QUEUED and self._started and state.name not in self._launching:
                self._set_status(state, CANCELLED, self._not_started_reason())
            elif state.status == RUNNING:
                self._cancel_signals[state.name].set()

    def _not_started_reason(self) -> str:
        return f"not started: {self.fatal}" if self.fatal else "cancelled before it started"

    def _blocker(self, spec: RunSpec) -> RunState | None:
        """The `after` target's state when it did not finish, else None."""
        if spec.after is None or spec.after not in self.states:  # outside: init_checkpoint is set
            return None
        target = self.states[spec.after]
        return None if target.status == DONE else target

    def _prepare(self, state: RunState, placement: Placement) -> Path:
        """Fill in the paths of the spec and write it as JSON for the worker."""
        spec = state.spec
        folder = f"{self.session}-{spec.name}" if self.session else spec.name
        output_dir = self.runs_dir / re.sub(r"[^\w.@-]", "_", folder)
        output_dir.mkdir(parents=True, exist_ok=True)
        changes: dict[str, str | int | bool] = {"output_dir": str(output_dir), "cache_dir": str(self.cache_dir)}
        if placement.concurrent_runs > 1:
            changes["concurrent_runs"] = placement.concurrent_runs
        if spec.after in self.states:
            changes["init_checkpoint"] = self.states[spec.after].checkpoint or ""
        start = spec.starting_model_key()
        if spec.score_test and start is not None and start not in self._base_scored and start not in self._base_scoring:
            self._base_scoring[start] = spec.name  # the starting model is scored once per session
            changes["score_base"] = True
        state.spec = spec.replace(**changes)
        spec_path = output_dir / "spec.json"
        spec_path.write_text(json.dumps(state.spec.to_dict(), indent=2) + "\n")
        return spec_path

    async def _run_one(self, state: RunState, placement: Placement) -> None:
        spec_path = self._prepare(state, placement)
        worker_cmd = self.worker_cmd
        if self._preload is not None and not is_distributed(state.spec):
            worker_cmd = self._preload.command(worker_cmd)
        command = launch_command(state.spec, worker_cmd, spec_path)
        state.device = placement.label(state.spec)
        state.started_at = time.time()
        self._launching.add(state.name)
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                env={**self._env, **placement.env()},
                limit=LINE_LIMIT,
            )
        except OSError as exc:
            self._launching.discard(state.name)
            state.finished_at = time.time()
            self._set_status(state, FAILED, f"the worker could not start: {command[0]}: {exc.strerror or exc}.")
            return
        state.pid = proc.pid
        cancel_signal = self._cancel_signals[state.name] = asyncio.Event()
        self._launching.discard(state.name)
        if state.cancel_requested:  # asked for while the process was being started
            cancel_signal.set()
        self._set_status(state, RUNNING, spec=state.spec, pid=proc.pid, device=state.device)
        assert proc.stdout is not None and proc.stderr is not None
        readers = [
            asyncio.ensure_future(self._read_stdout(state, proc.stdout)),
            asyncio.ensure_future(self._read_stderr(state, proc.stderr)),
        ]
        tree = _ProcessTree(proc.pid)
        watcher = asyncio.ensure_future(tree.watch()) if is_distributed(state.spec) else None
        try:
            exited = asyncio.ensure_future(proc.wait())
            cancelled = asyncio.ensure_future(cancel_signal.wait())
            try:
                await asyncio.wait({exited, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                cancelled.cancel()
            if not exited.done():
                await self._terminate(proc, tree)
            await exited
            await tree.kill()  # grandchildren left behind by a worker that exited
            await _drain(readers)
        except asyncio.CancelledError:
            state.cancel_requested = True
            await self._terminate(proc, tree)
            await _drain(readers)
            self._finish(state, proc.returncode)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        self._finish(state, proc.returncode)

    async def _terminate(self, proc: asyncio.subprocess.Process, tree: _ProcessTree) -> None:
        """SIGTERM the worker's groups, SIGKILL after the grace period, then reap it."""
        if proc.returncode is None:
            tree.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.grace_seconds)
            except asyncio.TimeoutError:
                tree.signal(signal.SIGKILL)
                await proc.wait()
        await tree.kill()

    def _finish(self, state: RunState, code: int | None) -> None:
        state.exit_code = code
        start = state.spec.starting_model_key()
        if start is not None and self._base_scoring.get(start) == state.name:
            del self._base_scoring[start]  # scored, or the next run from this start is asked to
        state.finished_at = time.time()
        if code == 0 and state.finished is not None and state.failed is None and self.fatal is None:
            self._set_status(state, DONE, exit_code=code)
        elif self.fatal is not None:
            self._set_status(state, FAILED, self.fatal, exit_code=code)
        elif code == 0 and state.failed is None and state.spec.node_rank > 0 and not state.cancel_requested:
            # Another node of a multi-node run: its ranks are not rank 0, so they report nothing.
            reason = f"done on node {state.spec.node_rank} of {state.spec.nnodes}; node 0 records the results"
            self._set_status(state, DONE, reason, exit_code=code)
        elif state.cancel_requested:
            self._set_status(state, CANCELLED, f"{state.cancel_reason} {self._where(state)}", exit_code=code)
        elif state.failed is not None and state.failed.error_kind != "distributed":
            self._set_status(state, FAILED, state.failed.message, exit_code=code)
        elif is_distributed(state.spec) and (rank_failure := _rank_failure(state.stderr_tail)) is not None:
            self._set_status(state, FAILED, self._rank_reason(state, *rank_failure), exit_code=code)
        elif state.failed is not None:
            self._set_status(state, FAILED, state.failed.message, exit_code=code)
        else:
            self._set_status(state, FAILED, self._exit_reason(state, code), exit_code=code)

    def _rank_reason(self, state: RunState, rank: int, code: int) -> str:
        """One sentence for a multi-process run that torchrun ended because one rank failed."""
        world = state.spec.nproc_per_node * state.spec.nnodes
        if code < 0:
            try:
                description = (signal.strsignal(-code) or "").lower()
            except ValueError:
                description = ""
            how = f"was killed by signal {-code}" + (f" ({description})" if description else "")
        else:
            how = f"exited with code {code}"
        return f"rank {rank} of {world} {how} {self._where(state)}, so torchrun stopped the run."

    def _exit_reason(self, state: RunState, code: int | None) -> str:
        """One sentence for a worker that ended without a run_finished or run_failed."""
        if code is not None and code < 0:
            number = -code
            try:
                description = (signal.strsignal(number) or "").lower()
            except ValueError:
                description = ""
            how = f"signal {number}" + (f" ({description})" if description else "")
        else:
            how = f"code {code}"
        reason = f"worker exited with {how} {self._where(state)}"
        if code == 0:
            reason += " without reporting run_finished"
        last = next((line for line in reversed(state.stderr_tail) if line.strip()), None)
        if last:
            reason += f"; its last log line was: {_shorten(last.strip(), 200)}"
        return reason

    @staticmethod
    def _where(state: RunState) -> str:
        """Where in its life a run was, for a message: 'during epoch 2', ..."""
        if state.finished is not None:
            return "after reporting run_finished"
        if state.started is None:
            return "before it reported run_started"
        phase, epoch = state.phase, state.epoch
        epochs = state.started.epochs
        if phase == "train":
            return f"during epoch {epoch} of {epochs}"
        if phase == "epoch_end":
            return f"after epoch {epoch} of {epochs}"
        if phase == "eval":
            return f"while evaluating epoch {epoch}" if epoch else "while evaluating"
        if phase == "base":
            return "while building the base checkpoint"
        if phase == "reference":
            return "while preparing the reference model"
        if phase == "generate":
            return "while generating test answers"
        if phase == "judge":
            return "while judging test answers"
        return "before its first epoch"

    async def _read_stdout(self, state: RunState, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than LINE_LIMIT; the reader skipped it
                self._invalid(state, "", f"a line longer than {LINE_LIMIT} bytes")
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line.strip():
                continue
            try:
                event = parse_event(line)
            except EventError as exc:
                self._invalid(state, line, str(exc))
                continue
            self._observe(state, event)
            self._notify(WorkerEvent(state.name, event, line))

    async def _read_stderr(self, state: RunState, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            state.stderr_tail.append(line)
            self._notify(WorkerStderr(state.name, line))

    def _invalid(self, state: RunState, line: str, error: str) -> None:
        state.invalid_lines += 1
        log.warning(
            "run %s: ignored a stdout line that is not an event (%s): %s", state.name, error, _shorten(line, 200)
        )
        self._notify(InvalidWorkerLine(state.name, line, error))

    def _observe(self, state: RunState, event: Event) -> None:
        if isinstance(event, Evaluated) and event.split == "base":
            start = state.spec.starting_model_key()
            if start is not None:
                self._base_scored.add(start)
        elif isinstance(event, RunStarted):
            state.started = event
        elif isinstance(event, Progress):
            state.phase, state.epoch = event.phase, event.epoch
        elif isinstance(event, EpochEnded):
            state.phase, state.epoch = "epoch_end", event.epoch
            state.epochs_done = max(state.epochs_done, event.epoch)
        elif isinstance(event, RunFinished):
            state.finished = event
        elif isinstance(event, RunFailed):
            state.failed = event

    def _set_status(
        self,
        state: RunState,
        status: str,
        reason: str = "",
        *,
        spec: RunSpec | None = None,
        pid: int | None = None,
        exit_code: int | None = None,
        device: str = "",
    ) -> None:
        state.status, state.reason = status, reason
        self._notify(RunStatusChanged(state.name, status, reason, spec, pid, exit_code, device))

    def _notify(self, notification: Notification) -> None:
        for callback in list(self._subscribers):
            try:
                callback(notification)
            except FatalSubscriberError as exc:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)
                log.error("stopping the runs: %s", exc)
                if self.fatal is None:
                    self.fatal = str(exc)
                    self._request_cancel(None)
            except Exception:
                log.exception(
                    "a runner subscriber (%r) failed on %s; the runs go on", callback, type(notification).__name__
                )


_TORCHRUN_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_TORCHRUN_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")


def _rank_failure(lines: Sequence[str]) -> tuple[int, int] | None:
    """(rank, exit code) of the failed rank in torchrun's failure summary on stderr.

    torchrun lists every failed rank: the cause is one killed by a signal other than SIGTERM
    (torchrun stops the survivors with SIGTERM), else the lowest rank that exited with an
    error (the others may only have lost their peer), else the lowest rank.
    """
    failures: list[tuple[int, int]] = []
    rank: int | None = None
    for line in lines:
        if (m := _TORCHRUN_RANK.match(line)) is not None:
            rank = int(m.group(1))
        elif (m := _TORCHRUN_EXIT.match(line)) is not None and rank is not None:
            failures.append((rank, int(m.group(1))))
            rank = None
    if not failures:
        return None
    return min(failures, key=lambda f: (f[1] == -signal.SIGTERM, f[1] >= 0, f[0]))


def shared_preload_server(worker_cmd: Sequence[str] | None, env: dict[str, str] | None = None) -> PreloadServer | None:
    """A preload server for `worker_cmd` (None where it cannot be preloaded); it starts on first use."""
    full_env = _worker_env(env)
    module = preload_module(list(worker_cmd) if worker_cmd else default_worker_cmd(), full_env)
    return PreloadServer(module, full_env) if module else None


def _worker_env(extra: dict[str, str] | None) -> dict[str, str]:
    """The host's environment, unbuffered, with this vqabench first on the import path."""
    env = dict(os.environ)
    env.update(extra or {})
    env["PYTHONUNBUFFERED"] = "1"
    package_root = str(Path(__file__).resolve().parent.parent)
    paths = [package_root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _kill_group(pgid: int) -> None:
    _signal_group(pgid, signal.SIGKILL)


def _live_group_members(pgid: int) -> list[int]:
    """Pids of the group's processes that are not yet dead (zombies count as dead); Linux /proc."""
    return [pid for pid, (_, group) in _process_table().items() if group == pgid]


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every live process; Linux /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


class _ProcessTree:
    """The process groups under a worker: its own, and those of descendants in sessions of their own.

    torchrun starts each rank with ``start_new_session``, so killing the worker's group alone
    would orphan the ranks. The groups are noted while the worker runs (:meth:`watch`), so
    they can still be found once a killed parent no longer links to them.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.groups = {root}

    def refresh(self) -> None:
        if not os.path.isdir("/proc"):
            return
        table = _process_table()
        children: dict[int, list[int]] = {}
        for pid, (parent, _) in table.items():
            children.setdefault(parent, []).append(pid)
        todo = [self.root]
        while todo:
            for child in children.get(todo.pop(), []):
                self.groups.add(table[child][1])
                todo.append(child)

    async def watch(self, interval: float = 0.5) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(interval)

    def signal(self, signum: int) -> None:
        self.refresh()
        for group in self.groups:
            _signal_group(group, signum)

    async def kill(self) -> None:
        """SIGKILL every group and wait until none of their processes runs."""
        self.signal(signal.SIGKILL)
        for group in self.groups:
            await _wait_group_gone(group)


async def _wait_group_gone(pgid: int, timeout: float = 5.0) -> None:
    """SIGKILL is delivered asynchronously: wait until no process of the group still runs."""
    if not os.path.isdir("/proc"):
        return
    deadline = time.monotonic() + timeout
    while _live_group_members(pgid):
        if time.monotonic() > deadline:
            log.warning("processes of worker group %d survived SIGKILL for %.0f s", pgid, timeout)
            return
        _kill_group(pgid)
        await asyncio.sleep(0.02)


async def _drain(readers: Sequence[asyncio.Future[None]], timeout: float = 5.0) -> None:
    """Let the pipe readers reach EOF; give up on a pipe some stray process still holds."""
    done, pending = await asyncio.wait(readers, timeout=timeout)
    for reader in pending:
        reader.cancel()
    for reader in done:
        if reader.exception() is not None:
            log.error("reading a worker's output failed: %r", reader.exception())


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
