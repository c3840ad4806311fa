"""Experiment trackers (a preset's ``report_to``, or ``--report-to`` for a session).

**Where logging happens: on the host, from the event stream.** The runner already receives every
event of every run, and the stream is rank 0's alone, so "only rank 0 logs" holds with nothing
added to the worker. Logging on the host also keeps the tracker libraries (and their threads,
services and failures) out of the training process, and one tracker failure cannot stop a run: a
subscriber's exception never reaches the worker. What reaches the host per step:

* step time: exact, from each ``epoch_end``'s ``step_ms`` (every step's time, evenly thinned to
  at most 2,048 per epoch, which then land on their own steps);
* learning rate: the optimizer's rate for the epoch (vqabench decays it once per epoch), logged at
  the same steps;
* train loss: the epoch's running mean loss from the throttled ``progress`` events (a few per
  second, always the epoch's last step), logged at the step it was reported.

Per epoch, every number of ``epoch_end`` (losses, preference metrics, memory, times, EM/F1/judge
when scored) at the epoch's last global step; the run's whole config as hyper-parameters; at the
end the test (and base) quality and the efficiency figures. One tracker run per vqabench run,
named ``<session label>-<run>`` as the store names the run's files, grouped by the session label.

A tracker that fails (missing package, no disk, a bad URI, an exception inside the library) is
dropped for that run with one warning naming the reason; the run and the results store go on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from vqabench.spec import TRACKERS


class Tracker(Protocol):
    """One tracker run: started once, logged to by global step, finished once."""

    def start(self, name: str, group: str, config: dict[str, Any]) -> None: ...

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self, summary: dict[str, float], status: str) -> None:
        """`summary`: the final quality and efficiency figures; `status`: "done", "failed" or "cancelled"."""


def make_tracker(name: str, results_dir: Path) -> Tracker:
    """The tracker called `name` (one of spec.TRACKERS), writing under `results_dir` by default.

    Imports its library only here, so a session without trackers never loads one.
    """
    if name == "tensorboard":
        from vqabench.trackers.tensorboard import TensorBoardTracker

        return TensorBoardTracker(results_dir)
    if name == "mlflow":
        from vqabench.trackers.mlflow import MlflowTracker

        return MlflowTracker(results_dir)
    if name == "trackio":
        from vqabench.trackers.trackio import TrackioTracker

        return TrackioTracker(results_dir)
    if name == "wandb":
        from vqabench.trackers.wandb import WandbTracker

        return WandbTracker(results_dir)
    raise ValueError(f"unknown tracker {name!r}; known trackers are {', '.join(TRACKERS)}")


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys (``dataset.source``), the shape hyper-parameter panels show."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


#: Called with (run, one sentence) when a tracker fails; front ends print it.
Warn = Callable[[str, str], None]
