"""What the dashboard shows, apart from the widgets: the runs of one session, live or stored.

A :class:`SessionView` is filled either by the runner's notifications as they arrive
(:meth:`SessionView.apply`) or from the results store for a previous session
(:meth:`SessionView.from_store`). Widgets only read it. The per-run numbers that the report
also shows are handed to :mod:`vqabench.report` as :class:`~vqabench.report.RunData`, so the
efficiency panel and the Markdown export agree. No textual import here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from statistics import mean

from vqabench.events import EpochEnded, Evaluated, Progress, RunFailed, RunFinished, RunStarted
from vqabench.report import RunData, RunSummary, aggregate_seeds, run_setup, session_run_data, summarize_runs
from vqabench.runner import (
    DONE,
    FINAL_STATUSES,
    QUEUED,
    RUNNING,
    InvalidWorkerLine,
    Notification,
    RunnerFinished,
    RunQueued,
    RunStatusChanged,
    WorkerEvent,
    WorkerStderr,
)
from vqabench.spec import RunSpec
from vqabench.store import ResultsStore, SessionRecord

#: Status of a run that is listed but not started: no runner has queued it yet.
PLANNED = "planned"
#: stderr lines kept per run for the log panel.
STDERR_KEPT = 200
#: Live telemetry samples kept per run for its sparklines.
TELEMETRY_KEPT = 120

Clock = Callable[[], float]

_PHASE_NAMES = {
    "base": "base model",
    "images": "images",
    "encode": "encoding",
    "reference": "reference",
    "train": "train",
    "eval": "eval",
    "generate": "test answers",
    "judge": "judging",
}


@dataclass(frozen=True)
class TelemetrySample:
    """One progress report's telemetry (events.Progress); None where it was not measured."""

    rss_mib: float | None = None
    gpu_process_mib: float | None = None
    gpu_device_mib: float | None = None
    gpu_util: float | None = None


@dataclass
class RunView:
    """One run as the dashboard shows it: its events so far, progress and clock times."""

    name: str
    method: str
    after: str | None = None
    epochs_planned: int = 0
    setup: str = ""  # model and data (report.run_setup): runs of one setup share an SFT baseline
    status: str = PLANNED
    reason: str = ""
    pid: int | None = None
    started: RunStarted | None = None
    finished: RunFinished | None = None
    failed: RunFailed | None = None
    epochs: list[EpochEnded] = field(default_factory=list)
    final_eval: Evaluated | None = None
    base_eval: Evaluated | None = None  # the starting model's test scores, where this run made them
    phase: str = ""
    epoch: int = 0
    step: int = 0
    steps: int = 0
    running_loss: float | None = None
    phase_message: str = ""
    running_points: list[tuple[float, float]] = field(default_factory=list)  # (x in epochs, loss)
    started_at: float | None = None  # dashboard clock
    finished_at: float | None = None
    phase_first: tuple[float, int] | None = None  # (clock, step) of the phase's first report
    phase_last: tuple[float, int] | None = None  # ... and of its latest
    device: str = ""  # where the runner placed it ("GPU 1", "2 processes"; "" = the default device)
    stored_elapsed: float | None = None  # a stored run's wall time, from the store's timestamps
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_KEPT))
    stderr_total: int = 0  # lines received in all; `stderr` keeps the last STDERR_KEPT
    invalid_lines: int = 0
    telemetry: deque[TelemetrySample] = field(default_factory=lambda: deque(maxlen=TELEMETRY_KEPT))

    @classmethod
    def from_spec(cls, spec: RunSpec, status: str = PLANNED) -> RunView:
        return cls(spec.name, spec.method, spec.after, spec.epochs, run_setup(spec.to_dict()), status)

    @property
    def epochs_total(self) -> int:
        return self.started.epochs if self.started else self.epochs_planned

    @property
    def epochs_done(self) -> int:
        return max((e.epoch for e in self.epochs), default=0)

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    def run_data(self) -> RunData:
        """This run in the shape vqabench.report summarizes."""
        return RunData(
            self.name,
            self.method,
            self.status,
            self.reason,
            self.after,
            self.started,
            self.finished,
            list(self.epochs),
            self.final_eval,
            self.setup,
            self.base_eval,
        )

    def progress_fraction(self) -> float:
        """Share of the training epochs done, counting the steps of the epoch in progress."""
        if self.status == DONE:
            return 1.0
        total = self.epochs_total
        if total <= 0:
            return 0.0
        done = float(self.epochs_done)
        if self.phase == "train" and self.steps > 0 and self.epoch > self.epochs_done:
            done = (self.epoch - 1) + min(self.step, self.steps) / self.steps
        return min(done / total, 1.0)

    def elapsed(self, now: float) -> float | None:
        """Wall seconds since the worker started (until it ended), or the stored duration."""
        if self.started_at is None:
            return self.stored_elapsed
        end = self.finished_at if self.finished_at is not None else now
        return max(end - self.started_at, 0.0)

    def eta(self, now: float) -> float | None:
        """Seconds left in the current phase, plus the remaining epochs while training.

        The pace is that of this phase's reports, from its first to its latest (a slow
        start-up does not count, and a pause between reports, like the eval after an
        epoch's last step, does not slow it); the estimate then counts down until the next
        report. Later epochs take the mean of the finished ones (train + eval time) or,
        before any, this epoch's pace. Unknown: None.
        """
        if self.status != RUNNING or self.phase_first is None or self.phase_last is None or self.steps <= 0:
            return None
        (first_at, first_step), (last_at, last_step) = self.phase_first, self.phase_last
        if last_step <= first_step or last_at <= first_at:
            return None
        per_step = (last_at - first_at) / (last_step - first_step)
        left = max(self.steps - last_step, 0) * per_step
        if self.phase == "train":
            if self.epochs:
                per_epoch = mean(e.epoch_seconds + e.eval_seconds for e in self.epochs)
            else:
                per_epoch = self.steps * per_step
            left += max(self.epochs_total - self.epoch, 0) * per_epoch
        return max(left - max(now - last_at, 0.0), 0.0)

    def activity(self) -> str:
        """One line for the runs table: the reason of a final run, else what it does now."""
        if self.status in FINAL_STATUSES and self.status != DONE:
            return self.reason or self.status
        if self.status == DONE:
            e = self.final_eval
            return f"EM {e.em:.3f} F1 {e.f1:.3f}" if e is not None else ""
        if self.status == RUNNING:
            if not self.phase:
                return "starting the worker" if self.started is None else "starting"
            if self.phase == "epoch_end":
                return f"epoch {self.epoch} of {self.epochs_total} done"
            # The Epoch column says which epoch trains; the note stays short enough for 80 columns.
            text = "" if self.phase == "train" else _PHASE_NAMES.get(self.phase, self.phase)
            if self.phase == "train" and self.steps and self.step >= self.steps:
                text = "evaluating"  # the epoch's steps are done; epoch_end follows its eval
            elif self.steps:
                text = f"{text} {self.step}/{self.steps}".strip()
            if self.running_loss is not None and self.phase == "train":
                text += f" loss {self.running_loss:.3f}"
            return text
        return ""

    def apply_event(self, event: object, now: float) -> None:
        """Take in one worker event; `now` is the dashboard clock."""
        if isinstance(event, RunStarted):
            self.started = event
        elif isinstance(event, Progress):
            if (event.phase, event.epoch) != (self.phase, self.epoch) or self.phase_first is None:
                self.phase_first = (now, event.step)
                if event.phase == "train":
                    self.running_points = []
            self.phase_last = (now, event.step)
            self.phase, self.epoch = event.phase, event.epoch
            self.step, self.steps = event.step, event.steps
            self.running_loss = event.running_loss
            self.phase_message = event.message
            sample = TelemetrySample(event.rss_mib, event.gpu_process_mib, event.gpu_device_mib, event.gpu_util)
            if sample != TelemetrySample():
                self.telemetry.append(sample)
            if event.phase == "train" and event.running_loss is not None and event.steps > 0:
                x = (event.epoch - 1) + min(event.step, event.steps) / event.steps
                self.running_points.append((x, event.running_loss))
        elif isinstance(event, EpochEnded):
            self.epochs = [e for e in self.epochs if e.epoch != event.epoch] + [event]
            self.epochs.sort(key=lambda e: e.epoch)
            self.phase, self.epoch, self.step, self.steps = "epoch_end", event.epoch, 0, 0
            self.running_loss = None
            self.running_points = []
            self.phase_first = self.phase_last = None
        elif isinstance(event, Evaluated):
            if event.split == "test":
                self.final_eval = event
            elif event.split == "base":
                self.base_eval = event
        elif isinstance(event, RunFinished):
            self.finished = event
        elif isinstance(event, RunFailed):
            self.failed = event


@dataclass
class SessionView:
    """The runs of one session in queue order; `live` while a runner of this app feeds it."""

    runs: dict[str, RunView]
    session_id: int | None = None
    label: str = ""
    live: bool = False
    status: str = PLANNED  # planned, running, done, failed, cancelled

    @classmethod
    def planned(cls, specs: Iterable[RunSpec]) -> SessionView:
        """Runs chosen but not started yet."""
        return cls({s.name: RunView.from_spec(s) for s in specs})

    @classmethod
    def from_store(cls, store: ResultsStore, session: SessionRecord, stderr_lines: int = 50) -> SessionView:
        """A previous session as the results store holds it."""
        records = {r.name: r for r in store.runs(session.id)}
        runs: dict[str, RunView] = {}
        for data in session_run_data(store, session.id):
            record = records[data.name]
            view = RunView(
                data.name,
                data.method,
                data.after,
                data.started.epochs if data.started else int(record.spec.get("epochs") or 0),
                data.setup,
                data.status,
                data.reason,
                record.pid,
                data.started,
                data.finished,
                record.failed,
                list(data.epochs),
                data.final_eval,
            )
            view.base_eval = data.base_eval
            view.stored_elapsed = _seconds_between(record.started_at, record.finished_at)
            view.stderr.extend(store.stderr_tail(record, stderr_lines))
            view.stderr_total = len(view.stderr)
            view.invalid_lines = record.invalid_lines
            runs[data.name] = view
        return cls(runs, session.id, session.label, False, session.status)

    def run_data(self) -> list[RunData]:
        return [r.run_data() for r in self.runs.values()]

    def summaries(self) -> list[RunSummary]:
        """The report's headline numbers, one row per preset (runs repeated per seed averaged),
        computed as vqabench.report.build_report does."""
        return aggregate_seeds(summarize_runs(self.run_data()))

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for run in self.runs.values():
            counts[run.status] = counts.get(run.status, 0) + 1
        return counts

    def apply(self, note: Notification, now: float) -> str | None:
        """Take in one runner notification; returns the run it concerned (None: the session)."""
        if isinstance(note, RunQueued):
            view = self.runs.get(note.run)
            if view is None or view.status != QUEUED:
                view = self.runs[note.run] = RunView.from_spec(note.spec, QUEUED)
            return note.run
        if isinstance(note, RunnerFinished):
            statuses = set(note.statuses.values())
            self.status = "cancelled" if note.cancelled else ("done" if statuses <= {DONE} else "failed")
            self.live = False
            return None
        view = self.runs.get(note.run)
        if view is None:
            return None
        if isinstance(note, RunStatusChanged):
            view.status, view.reason = note.status, note.reason
            if note.pid is not None:
                view.pid = note.pid
            if note.device:
                view.device = note.device
            if note.status == RUNNING:
                view.started_at = now
                view.phase = ""
            elif note.status in FINAL_STATUSES:
                if view.started_at is not None:
                    view.finished_at = now
                view.step = view.steps = 0
                view.running_points = []
        elif isinstance(note, WorkerEvent):
            view.apply_event(note.event, now)
        elif isinstance(note, WorkerStderr):
            view.stderr.append(note.line)
            view.stderr_total += 1
        elif isinstance(note, InvalidWorkerLine):
            view.invalid_lines += 1
            view.stderr.append(f"[vqabench: ignored stdout line: {note.error}] {note.line}")
            view.stderr_total += 1
        return note.run


def format_duration(seconds: float | None) -> str:
    """m:ss, or h:mm:ss from an hour on; '-' when unknown."""
    if seconds is None:
        return "-"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_bar(fraction: float, width: int) -> str:
    """A bar of full and light blocks, readable without colour."""
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    return "█" * filled + "░" * (width - filled)


def cheapest_alignment(summaries: Sequence[RunSummary]) -> str:
    """One sentence: which aligned run was cheapest to reach, and how much the others cost more."""
    aligned = sorted(
        (
            (s.aligned_seconds, s)
            for s in summaries
            if s.method != "sft" and not s.trial and s.aligned_seconds is not None
        ),
        key=lambda pair: pair[0],
    )
    if not aligned:
        return ""
    best_seconds, best = aligned[0]
    text = f"Cheapest aligned model: {_label(best)}, {best_seconds:.1f} s of training in all"
    if len(aligned) > 1 and best_seconds:
        last_seconds, last = aligned[-1]
        text += f"; {_label(last)} took {last_seconds:.1f} s, {last_seconds / best_seconds:.2f}× as long"
    return text + "."


def _label(summary: RunSummary) -> str:
    """'dpo-beta0.1 (dpo)', or the name alone when it starts with the method."""
    return summary.name if summary.name.startswith(summary.method) else f"{summary.name} ({summary.method})"


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        return max((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 0.0)
    except ValueError:
        return None
