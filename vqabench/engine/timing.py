"""Per-step wall clock and machine load of a training epoch: what makes a timing trustworthy.

:class:`StepClock` records every training step's wall-clock time and samples the 1-minute
load average (``os.getloadavg``) while the steps run. The epoch event carries the step-time
median, p10 and p90, the step times themselves (thinned evenly to at most
:data:`MAX_STEP_TIMES`) so the report can bootstrap a ratio, and the highest load average
seen next to the cores the run used, so the report can flag a disturbed timing. Documented
in ``docs/telemetry.md``.
"""

from __future__ import annotations

import os
import time
from typing import Any

#: Most step times an epoch event carries; longer epochs are thinned evenly.
MAX_STEP_TIMES = 2048
#: Seconds between two load-average samples (the kernel updates it every 5 s).
LOAD_INTERVAL = 1.0


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one), for judging the load."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def step_quantiles(step_seconds: list[float]) -> dict[str, float | None]:
    """Median, p10 and p90 of step times, in milliseconds (None without steps)."""
    if not step_seconds:
        return {"step_ms_median": None, "step_ms_p10": None, "step_ms_p90": None}
    from vqabench.stats import quantiles

    p10, median, p90 = quantiles([s * 1000.0 for s in step_seconds], (0.1, 0.5, 0.9))
    return {"step_ms_median": median, "step_ms_p10": p10, "step_ms_p90": p90}


def thinned(values: list[float], limit: int = MAX_STEP_TIMES) -> list[float]:
    """At most `limit` values, picked evenly across the list (all of them when it is short)."""
    if len(values) <= limit:
        return list(values)
    return [values[i * len(values) // limit] for i in range(limit)]


class StepClock:
    """Step times and load-average samples of one epoch; call :meth:`begin` per epoch."""

    def __init__(self, cores: int) -> None:
        self.cores = cores
        self.step_seconds: list[float] = []
        self.load_max: float | None = None
        self._last_step = 0.0
        self._last_load = 0.0

    def begin(self) -> None:
        self.step_seconds = []
        self.load_max = None
        self._last_load = 0.0
        self._sample_load(time.perf_counter())
        self._last_step = time.perf_counter()

    def step_done(self) -> None:
        """One step ended: its time is the wall clock since the previous step ended (or begin)."""
        now = time.perf_counter()
        self.step_seconds.append(now - self._last_step)
        self._last_step = now
        if now - self._last_load >= LOAD_INTERVAL:
            self._sample_load(now)

    def _sample_load(self, now: float) -> None:
        self._last_load = now
        load = load_average()
        if load is not None:
            self.load_max = load if self.load_max is None else max(self.load_max, load)

    def event_fields(self) -> dict[str, Any]:
        """The epoch event's timing fields (events.EpochEnded)."""
        self._sample_load(time.perf_counter())
        return {
            **step_quantiles(self.step_seconds),
            "step_ms": [round(s * 1000.0, 3) for s in thinned(self.step_seconds)],
            "load_avg_max": self.load_max,
            "cores": self.cores,
        }
