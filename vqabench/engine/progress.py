"""A run's progress events, throttled to a few a second, with the latest telemetry sample."""

from __future__ import annotations

import time
from collections.abc import Callable

from vqabench import events as ev

Emit = Callable[[ev.Event], None]


class Throttled:
    """Progress events at most every `interval` seconds (always the last step), with the latest
    telemetry sample once `telemetry` is set (a function returning Progress's telemetry fields)."""

    def __init__(self, emit: Emit, interval: float = 0.25):
        self.emit, self.interval, self.last = emit, interval, 0.0
        self.telemetry: Callable[[], dict[str, float | None]] | None = None

    def __call__(self, phase: str, epoch: int, step: int, steps: int, loss: float | None, message: str = "") -> None:
        now = time.monotonic()
        if step >= steps or now - self.last >= self.interval:
            self.last = now
            sample = self.telemetry() if self.telemetry is not None else {}
            self.emit(
                ev.Progress(
                    phase=phase, epoch=epoch, step=step, steps=steps, running_loss=loss, message=message, **sample
                )
            )

    def reporter(self, phase: str, message: str) -> Callable[[int, int], None]:
        """A ``progress(i, n)`` callback for a preparation phase (epoch 0, no loss)."""
        return lambda i, n: self(phase, 0, i, n, None, message)
