"""The worker process: ``python -m vqabench.engine.worker SPEC.json``.

Runs one training run (or, given a ``{"probe": ...}`` plan, the step-cost probe of
vqabench.engine.probe) and writes one event (vqabench.events) per stdout line, flushed,
and nothing else: before anything is imported that might print, the real stdout is kept
for events and file descriptor 1 is pointed at stderr, where all logs go. Exit code 0
only on success; on failure a ``run_failed`` event carries a one-sentence message.
Started by torchrun (one process per rank), only rank 0 writes events, a failure included.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback

from vqabench import events as ev
from vqabench.engine.errors import classify
from vqabench.event_stream import EventWriter, protocol_stream


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    emit = EventWriter(protocol_stream())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(argv) != 1:
        emit(ev.RunFailed(error_kind="config", message="usage: python -m vqabench.engine.worker SPEC.json"))
        return 2
    try:
        from vqabench.spec import SpecError, check_device, spec_from_dict

        try:
            with open(argv[0], encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise SpecError(f"cannot read the run spec '{argv[0]}': {exc}") from None
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if isinstance(data, dict) and "probe" in data:  # `vqabench probe`: every preset's step, no training
            from vqabench.engine.probe import ProbePlan, execute_probe

            plan = ProbePlan.from_dict(data, where=argv[0])
            _quiet_transformers()
            execute_probe(plan, emit)
            return 0
        spec = spec_from_dict(data, where=argv[0])
        import torch

        check_device(spec, torch.cuda.is_available(), where=argv[0])
        _quiet_transformers()
        from vqabench.engine.run import execute

        execute(spec, emit)
        return 0
    except BaseException as exc:  # every failure becomes one run_failed event
        kind, message = classify(exc)
        tb = traceback.format_exc()
        # An explained failure (a bad setting, data, a model that cannot do what was asked) is its
        # sentence: the log, which the host shows under a failed run, does not repeat it as a stack
        # trace. The event keeps the traceback for the store either way.
        logging.getLogger("vqabench.worker").error("%s\n%s", message, tb if kind == "internal" else "")
        if os.environ.get("RANK", "0") == "0":  # one run, one event stream: rank 0's (torchrun names the rank)
            emit(ev.RunFailed(error_kind=kind, message=message, traceback=tb))
        return 130 if kind == "cancelled" else 1


if __name__ == "__main__":
    sys.exit(main())
