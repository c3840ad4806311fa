"""The worker side of the event protocol's transport: which stream carries events, and how.

Events (vqabench.events) travel as one JSON line each on the process's original stdout.
:func:`protocol_stream` keeps that stream for events and points file descriptor 1 at
stderr, so nothing a library prints can corrupt the protocol; :class:`EventWriter` writes
and flushes one event per line. Every process that speaks the protocol (the worker, the
base-checkpoint builder) uses these two, which depend on nothing but the stdlib and
events.py: this is what keeps the engine's modules free of an import circle through the
worker.
"""

from __future__ import annotations

import os
import sys
from typing import IO

from vqabench import events as ev


class EventWriter:
    """Writes events as JSON lines to the stream kept for the protocol."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def __call__(self, event: ev.Event) -> None:
        self.stream.write(ev.encode_event(event) + "\n")
        self.stream.flush()


def protocol_stream() -> IO[str]:
    """Keep fd 1 for events; send everything else written to stdout to stderr."""
    sys.stdout.flush()
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "w", buffering=1, encoding="utf-8")
