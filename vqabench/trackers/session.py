"""The runner subscriber that turns each run's events into tracker calls (see the package docstring)."""

from __future__ import annotations

import dataclasses
import logging
import statistics
from pathlib import Path
from typing import Any

from vqabench.events import EpochEnded, Evaluated, Progress, RunFailed, RunFinished, RunStarted
from vqabench.runner import (
    CANCELLED,
    DONE,
    FAILED,
    SKIPPED,
    Notification,
    RunnerFinished,
    RunQueued,
    RunStatusChanged,
    WorkerEvent,
)
from vqabench.trackers import Tracker, Warn, make_tracker

log = logging.getLogger(__name__)

#: epoch_end fields that are not one number per epoch (lists, flags, the counters).
_NOT_EPOCH_FIGURES = {"epoch", "epochs", "is_best", "rank_peak_mib", "step_ms"}
_RUN_FACTS = (
    "device",
    "torch_version",
    "trainable_params",
    "total_params",
    "reference_strategy",
    "reference_bytes",
    "steps_per_epoch",
    "world_size",
    "backend",
    "global_batch",
    "per_device_batch",
    "telemetry",
)


def epoch_figures(event: EpochEnded) -> dict[str, float]:
    """Every number of an epoch_end event, as ``epoch/<field>`` (None: not measured, left out)."""
    out: dict[str, float] = {}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if f.name in _NOT_EPOCH_FIGURES or value is None or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[f"epoch/{f.name}"] = float(value)
    out["epoch/epoch"] = float(event.epoch)
    return out


def step_figures(event: EpochEnded, steps_per_epoch: int) -> list[tuple[int, dict[str, float]]]:
    """(global step, figures) for each step whose time the epoch reported, with the epoch's lr."""
    times = event.step_ms or []
    spe = max(steps_per_epoch, len(times), 1)
    first = (event.epoch - 1) * spe
    return [
        (first + round((i + 1) * spe / len(times)), {"train/step_ms": float(ms), "train/lr": float(event.lr)})
        for i, ms in enumerate(times)
    ]


def quality_figures(event: Evaluated) -> dict[str, float]:
    """The test (or base) split's answer quality, as ``test/em`` and so on."""
    out = {f"{event.split}/em": float(event.em), f"{event.split}/f1": float(event.f1), f"{event.split}/n": event.n}
    if event.judge_score is not None:
        out[f"{event.split}/judge_score"] = float(event.judge_score)
        out[f"{event.split}/judge_n"] = float(event.judge_n)
        out[f"{event.split}/unparseable"] = float(event.unparseable)
    return out


def efficiency_figures(finished: RunFinished, epochs: list[EpochEnded]) -> dict[str, float]:
    """The run's efficiency row: times, throughput, step time and peak memory over its epochs."""
    out = {
        "final/total_seconds": float(finished.total_seconds),
        "final/train_seconds": float(finished.train_seconds),
        "final/best_epoch": float(finished.best_epoch),
        "final/best_eval_loss": float(finished.best_eval_loss),
    }
    if epochs:
        out["final/samples_per_s"] = statistics.fmean(e.samples_per_s for e in epochs)
        out["final/epoch_seconds_mean"] = statistics.fmean(e.epoch_seconds for e in epochs)
        out["final/peak_rss_mib"] = max(e.peak_rss_mib for e in epochs)
        steps = [ms for e in epochs for ms in e.step_ms or []]
        if steps:
            out["final/step_ms_median"] = statistics.median(steps)
        for name in ("cuda_max_allocated_mib", "gpu_process_peak_mib", "rank_peak_max_mib"):
            values = [v for e in epochs if (v := getattr(e, name)) is not None]
            if values:
                out[f"final/{name}"] = max(values)
    return out


@dataclasses.dataclass
class _RunLog:
    report_to: list[str]
    trackers: dict[str, Tracker] = dataclasses.field(default_factory=dict)
    steps_per_epoch: int = 1
    epochs: list[EpochEnded] = dataclasses.field(default_factory=list)
    summary: dict[str, float] = dataclasses.field(default_factory=dict)
    started: bool = False
    finished: bool = False


class SessionTrackers:
    """Runner subscriber: one tracker run per vqabench run, for the trackers its spec's report_to names.

    `warn(run, sentence)` is called once per tracker that fails; that tracker is then dropped for
    the run, and the run, the other trackers and the results store go on.
    """

    def __init__(self, session_label: str, results_dir: Path | str, warn: Warn) -> None:
        self.group = session_label
        self.results_dir = Path(results_dir)
        self.warn = warn
        self.runs: dict[str, _RunLog] = {}

    def __call__(self, note: Notification) -> None:
        if isinstance(note, RunQueued):
            if note.spec.report_to:
                self.runs[note.run] = _RunLog(list(note.spec.report_to))
            return
        if isinstance(note, RunnerFinished):
            for name in list(self.runs):
                self._finish(name, CANCELLED if note.cancelled else FAILED)
            return
        run = self.runs.get(getattr(note, "run", ""))
        if run is None:
            return
        if isinstance(note, RunStatusChanged) and note.status in (DONE, FAILED, CANCELLED, SKIPPED):
            self._finish(note.run, note.status)
        elif isinstance(note, WorkerEvent):
            self._event(note.run, run, note.event)

    def _event(self, name: str, run: _RunLog, event: object) -> None:
        if isinstance(event, RunStarted):
            run.steps_per_epoch = max(event.steps_per_epoch, 1)
            config = {**event.config, "run": {k: getattr(event, k) for k in _RUN_FACTS}}
            self._start(name, run, config)
        elif isinstance(event, Progress) and event.phase == "train" and event.running_loss is not None:
            step = (event.epoch - 1) * run.steps_per_epoch + event.step
            self._log(name, run, {"train/running_loss": float(event.running_loss)}, step)
        elif isinstance(event, EpochEnded):
            run.epochs.append(event)
            for step, figures in step_figures(event, run.steps_per_epoch):
                self._log(name, run, figures, step)
            self._log(name, run, epoch_figures(event), event.epoch * run.steps_per_epoch)
        elif isinstance(event, Evaluated):
            figures = quality_figures(event)
            run.summary.update(figures)
            self._log(name, run, figures, len(run.epochs) * run.steps_per_epoch)
        elif isinstance(event, RunFinished):
            run.summary.update(efficiency_figures(event, run.epochs))
        elif isinstance(event, RunFailed):
            self._finish(name, FAILED)

    def _start(self, name: str, run: _RunLog, config: dict[str, Any]) -> None:
        if run.started:
            return
        run.started = True
        for tracker_name in run.report_to:
            try:
                tracker = make_tracker(tracker_name, self.results_dir)
                tracker.start(f"{self.group}-{name}", self.group, config)
            except Exception as exc:
                self._failed(name, tracker_name, "could not start", exc)
                continue
            run.trackers[tracker_name] = tracker

    def _log(self, name: str, run: _RunLog, figures: dict[str, float], step: int) -> None:
        for tracker_name, tracker in list(run.trackers.items()):
            try:
                tracker.log(figures, step)
            except Exception as exc:
                del run.trackers[tracker_name]
                self._failed(name, tracker_name, "stopped logging", exc)

    def _finish(self, name: str, status: str) -> None:
        run = self.runs.get(name)
        if run is None or run.finished:
            return
        run.finished = True
        for tracker_name, tracker in run.trackers.items():
            try:
                tracker.finish(run.summary, status)
            except Exception as exc:
                self._failed(name, tracker_name, "could not finish its run", exc)
        run.trackers.clear()

    def _failed(self, name: str, tracker_name: str, what: str, exc: Exception) -> None:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        sentence = (
            f"the {tracker_name} tracker {what} ({type(exc).__name__}: {reason}); "
            "training and the results store carry on without it."
        )
        log.warning("run %s: %s", name, sentence)
        self.warn(name, sentence)
