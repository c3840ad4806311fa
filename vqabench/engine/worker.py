"""The worker process: ``python -m vqabench.engine.worker SPEC.json``.

Runs one training run and writes one event (vqabench.events) per stdout line, flushed,
and nothing else: before anything is imported that might print, the real stdout is kept
for events and file descriptor 1 is pointed at stderr, where all logs go. Exit code 0
only on success; on failure a ``run_failed`` event carries a one-sentence message.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
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


def classify(exc: BaseException) -> tuple[str, str]:
    """(error kind, one-sentence message) for a failure."""
    from vqabench.engine.cache import CacheError
    from vqabench.engine.data.records import DataError
    from vqabench.engine.model import ModelError
    from vqabench.engine.trainer import NumericsError
    from vqabench.judges import JudgeError
    from vqabench.spec import SpecError

    text = str(exc).strip() or type(exc).__name__
    for cls, kind in (
        (SpecError, "config"),
        (CacheError, "disk"),
        (DataError, "data"),
        (ModelError, "model"),
        (NumericsError, "numerics"),
        (JudgeError, "judge"),
    ):
        if isinstance(exc, cls):
            return kind, text
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return "memory", f"the run ran out of memory ({text.splitlines()[0]}); lower batch_size."
    if isinstance(exc, KeyboardInterrupt):
        return "cancelled", "the run was interrupted."
    return "internal", f"internal error {type(exc).__name__}: {text.splitlines()[0]}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    emit = EventWriter(protocol_stream())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(argv) != 1:
        emit(ev.RunFailed(error_kind="config", message="usage: python -m vqabench.engine.worker SPEC.json"))
        return 2
    try:
        from vqabench.spec import SpecError, spec_from_dict

        try:
            with open(argv[0], encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise SpecError(f"cannot read the run spec '{argv[0]}': {exc}") from None
        spec = spec_from_dict(data, where=argv[0])
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        from vqabench.engine.run import execute

        execute(spec, emit)
        return 0
    except BaseException as exc:  # every failure becomes one run_failed event
        kind, message = classify(exc)
        tb = traceback.format_exc()
        logging.getLogger("vqabench.worker").error("%s\n%s", message, tb)
        emit(ev.RunFailed(error_kind=kind, message=message, traceback=tb))
        return 130 if kind == "cancelled" else 1


if __name__ == "__main__":
    sys.exit(main())
