"""One training run inside the worker: data → model → caches → reference → epochs → test scores.

`_execute` is the table of contents; each phase lives in the module named for it
(`vqabench.engine.prepare`, `vqabench.engine.phases`). Everything is reported as events
through `emit`; nothing here writes to stdout.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from vqabench import events as ev
from vqabench.engine import distributed, phases, prepare
from vqabench.engine.data.records import DataError
from vqabench.engine.precision import check_precision
from vqabench.engine.progress import Emit, Throttled
from vqabench.spec import RunSpec, default_cache_dir


def execute(spec: RunSpec, emit: Emit) -> None:
    """Run one spec end to end, emitting events; raises on failure (the worker reports it)."""
    t_start = time.perf_counter()
    torch.manual_seed(spec.seed)
    ranks, device = distributed.start(spec.device)
    completed = False
    try:
        check_precision(spec.precision, device)
        with distributed.NodePreparation(ranks) as preparation:
            _execute(spec, emit if ranks.is_main else _silent, ranks, device, t_start, preparation)
        completed = True
    finally:
        distributed.finish(ranks, completed)


def _silent(event: ev.Event) -> None:
    """Ranks other than 0 report nothing: one run, one event stream."""


def _execute(
    spec: RunSpec,
    emit: Emit,
    ranks: distributed.Ranks,
    device: torch.device,
    t_start: float,
    preparation: distributed.NodePreparation,
) -> None:
    cache_dir = Path(spec.cache_dir) if spec.cache_dir else default_cache_dir()
    out_dir = Path(spec.output_dir) if spec.output_dir else Path("vqabench-results") / "runs" / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = Throttled(emit)

    # Each node's first process builds the base checkpoint and fills the caches, while the others
    # wait for it outside any collective (preparing has no time limit; a collective has one).
    preparation.begin()
    spec, loaded, data = prepare.data_and_model(spec, cache_dir, device, emit)  # train resolved for the family
    prepared = prepare.caches(spec, data, loaded, device, cache_dir, emit, progress)
    preparation.done()  # caches complete, every process has its data: collectives may start
    torch.manual_seed(prepared.spec.seed)  # dropout and shuffling vary with the run seed only

    run = phases.Context(
        prepared.spec, loaded, data, prepared.encoded, emit, ranks, device, cache_dir, out_dir, progress
    )
    reference = phases.reference(run)
    started = phases.start(run, prepared, reference)  # run_started
    base = phases.base_answers(run, started)
    train_seconds = phases.train(run, started)  # epoch_ended after each epoch
    phases.test(run, started, base, train_seconds, t_start)  # test (and base) scores, run_finished


__all__ = ["DataError", "execute"]
