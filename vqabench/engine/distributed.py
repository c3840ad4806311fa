"""Rank bookkeeping for one run on several processes: torchrun starts them, DDP trains.

The runner launches the worker through ``python -m torch.distributed.run`` when a spec sets
``nproc_per_node`` or ``nnodes`` above 1; torchrun gives every process RANK, WORLD_SIZE,
LOCAL_RANK and a rendezvous. Here each process joins the group (NCCL on CUDA, gloo on CPU)
and gets its device; the rest of the engine asks a :class:`Ranks` what it needs:

* ``is_main``: rank 0 alone writes events, checkpoints, predictions and caches;
* :meth:`Ranks.train_sampler`: a ``DistributedSampler`` over the train split (also with one
  process, so 1 and N processes see the same permutation);
* :meth:`Ranks.shard` / :meth:`Ranks.gather`: the precompute pass and test generation score a
  contiguous slice per rank, and the slices are gathered back in order; eval splits each global
  batch the same way;
* :meth:`Ranks.total`: a sum over ranks inside a step (KTO's KL reference point is a mean over
  the global batch);
* :meth:`Ranks.wrap`: the trainable part under ``DistributedDataParallel``;
* :class:`NodePreparation`: each node's first process prepares (base checkpoint, data,
  caches) while the others poll the rendezvous store, since preparing has no time limit and
  a collective has one (``COLLECTIVE_TIMEOUT``).

``batch_size`` is the global batch: each process takes ``batch_size / world_size`` rows a
step and DDP averages the gradients over ranks, so with equal per-rank batches a step is
the same as one process on the whole batch. The sampler keeps per-rank batches equal: when
the train split does not divide by the world size it repeats the first rows to even the
shards (PyTorch's rule), so 1 and N processes match exactly when ``len(train) % N == 0``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from types import TracebackType
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from vqabench.spec import SpecError

#: How long a collective waits for a rank that went silent before it fails.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
#: Seconds that replace COLLECTIVE_TIMEOUT when set (the tests shorten it).
COLLECTIVE_TIMEOUT_ENV = "VQABENCH_COLLECTIVE_TIMEOUT_S"
#: Seconds between two looks at the rendezvous store while a process waits for another's preparation.
PREPARATION_POLL_SECONDS = 0.25


class PreparationFailed(RuntimeError):
    """Another process failed while preparing the run; this one stops with its reason and kind."""

    def __init__(self, message: str, error_kind: str) -> None:
        super().__init__(message)
        self.error_kind = error_kind


class StepModule(nn.Module):
    """Lets DDP bracket a whole training step: ``wrapped(step_fn, *args)`` calls ``step_fn(*args)``.

    The engine calls the model's parts itself (encoders, then the decoder) instead of one
    ``forward``; DDP prepares its gradient all-reduce in ``forward``, so the step runs inside it.
    """

    def __init__(self, part: nn.Module):
        super().__init__()
        self.part = part

    def forward(self, step_fn: Callable[..., Any], *args: Any) -> Any:
        return step_fn(*args)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None  # "nccl" or "gloo"; None for one process
    store: dist.Store | None = field(default=None, compare=False, repr=False)  # the rendezvous store, for polling

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def node_rank(self) -> int:
        """The node this process runs on (torchrun numbers ranks node by node)."""
        return self.rank // self.local_world_size

    def per_device_batch(self, batch_size: int) -> int:
        """The rows one process takes a step; refuses a global batch that does not divide."""
        if batch_size % self.world_size:
            raise SpecError(
                f"key 'batch_size' has value {batch_size}, which {self.world_size} processes cannot split "
                f"evenly; use a multiple of {self.world_size} (batch_size is the global batch)."
            )
        return batch_size // self.world_size

    def train_sampler(self, n: int, seed: int) -> DistributedSampler:
        rows = cast("Dataset[int]", range(n))  # the sampler only needs len()
        return DistributedSampler(rows, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed)

    def shard(self, n: int) -> range:
        """This rank's contiguous slice of `n` rows (later ranks may get fewer or none)."""
        size = -(-n // self.world_size)
        return range(min(n, self.rank * size), min(n, (self.rank + 1) * size))

    def gather(self, values: Any) -> list[Any]:
        """Every rank's `values` (a tensor or a list), in rank order; moved to the CPU."""
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu()
        if not self.distributed:
            return [values]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, values)
        return out

    def gather_cat(self, values: torch.Tensor) -> torch.Tensor:
        """The shards' rows concatenated back into the full split's order."""
        return torch.cat(self.gather(values))

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (one all-reduce)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed element-wise over ranks (one all-reduce on a copy); `values` itself for one process."""
        if not self.distributed:
            return values
        summed = values.detach().clone()
        dist.all_reduce(summed)
        return summed

    def all(self, flag: bool, device: torch.device) -> bool:
        """True when every rank says True: a decision all ranks take together."""
        return self.sum([0.0 if flag else 1.0], device)[0] == 0.0

    def wrap(self, part: nn.Module, device: torch.device) -> nn.Module | None:
        """The trainable part under DDP (None for one process: no wrapper, no cost)."""
        if not self.distributed:
            return None
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # No batch norm here: buffers never change, so they are not resent every step
        # (torch 2.13 renamed the switch; older releases know only broadcast_buffers).
        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_resend: dict[str, Any] = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
        return DistributedDataParallel(
            StepModule(part), device_ids=[device.index] if device.type == "cuda" else None, **no_resend
        )


SINGLE = Ranks()


class NodePreparation:
    """The first process of each node prepares the run; every process then waits for the others by polling.

    Preparing (building the embedded base checkpoint, reading the data, decoding every image
    into the array cache, the encoder pass) runs once per node and may take far longer than a
    collective may wait (``COLLECTIVE_TIMEOUT``), so no process waits in a collective while
    another prepares. They poll keys in the run's rendezvous store (torchrun's, shared by every
    node) instead: the node's other processes wait for ``prepared/node<n>`` before they read
    the caches, and every process, once it has its data, adds itself to ``ready`` and waits
    until all have, so the run's first collective starts with every rank there. A process that
    fails before that sets ``failed`` with its reason, and the others stop with it rather than
    wait on; one that dies outright is seen by torchrun, which stops the rest.

    Used as a context manager around the run (that marks a failure): :meth:`begin` where
    preparing starts, :meth:`done` where it ends.
    """

    def __init__(self, ranks: Ranks, poll_seconds: float = PREPARATION_POLL_SECONDS) -> None:
        self.ranks = ranks
        self.store = ranks.store if ranks.distributed else None
        self.poll_seconds = poll_seconds
        self.finished = False

    @property
    def _prepared_key(self) -> str:
        return f"prepared/node{self.ranks.node_rank}"

    def begin(self) -> None:
        """Every process calls it; the node's first returns at once, the others once that one is done."""
        if self.store is not None and self.ranks.local_rank != 0:
            self._wait_until(lambda store: store.check([self._prepared_key]))

    def done(self) -> None:
        """This process has its model and data; returns when every process has."""
        if self.store is not None:
            if self.ranks.local_rank == 0:
                self.store.set(self._prepared_key, "1")
            self.store.add("ready", 1)
            self._wait_until(lambda store: store.add("ready", 0) >= self.ranks.world_size)
        self.finished = True

    def _wait_until(self, condition: Callable[[dist.Store], bool]) -> None:
        assert self.store is not None
        while not condition(self.store):
            if self.store.check(["failed"]):
                failure = json.loads(self.store.get("failed"))
                raise PreparationFailed(
                    f"rank {failure['rank']} failed while preparing the run: {failure['message']}", failure["kind"]
                )
            time.sleep(self.poll_seconds)

    def __enter__(self) -> NodePreparation:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None or self.store is None or self.finished or isinstance(exc, PreparationFailed):
            return
        from vqabench.engine.errors import classify  # the worker's one-sentence reasons

        error_kind, message = classify(exc)
        self.store.set("failed", json.dumps({"rank": self.ranks.rank, "kind": error_kind, "message": message}))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device_name: str) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun set up and pick this process's device.

    One process (no torchrun): rank 0 of 1 on the spec's device, no group. Several: NCCL and
    ``cuda:LOCAL_RANK`` when the run uses CUDA, gloo and the CPU otherwise.
    """
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if not launched_by_torchrun():
        # indexed: torch.device("cuda") != torch.device("cuda:0") would defeat "already there" checks
        return SINGLE, torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    env = os.environ
    ranks = Ranks(
        rank=int(env["RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
        backend="nccl" if use_cuda else "gloo",
    )
    if use_cuda:
        visible = torch.cuda.device_count()
        if ranks.local_world_size > visible:
            shown = env.get("CUDA_VISIBLE_DEVICES", "all")
            raise SpecError(
                f"key 'nproc_per_node' has value {ranks.local_world_size}, but this node has {visible} visible "
                f"GPU(s) (CUDA_VISIBLE_DEVICES={shown}); use at most {visible} or give the run more GPUs."
            )
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = collective_timeout(env)
    # The env:// rendezvous that init_process_group would do itself, kept for NodePreparation's polling.
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group(
        ranks.backend,
        store=dist.PrefixStore("default_pg", store),  # the prefix torch itself gives it
        rank=ranks.rank,
        world_size=ranks.world_size,
        timeout=timeout,
    )
    return replace(ranks, store=dist.PrefixStore("vqabench", store)), device


def collective_timeout(env: Mapping[str, str]) -> timedelta:
    """COLLECTIVE_TIMEOUT, or the seconds in ``$VQABENCH_COLLECTIVE_TIMEOUT_S`` when that is set."""
    raw = env.get(COLLECTIVE_TIMEOUT_ENV)
    if raw is None:
        return COLLECTIVE_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise SpecError(
            f"${COLLECTIVE_TIMEOUT_ENV} has value {raw!r}; give the seconds a collective may wait, above 0."
        )
    return timedelta(seconds=seconds)


def finish(ranks: Ranks, completed: bool) -> None:
    """Leave the process group (a no-op for one process).

    After a run that completed, every process first waits for all the others (:func:`arrive`), so
    they leave together, as torch asks of ``destroy_process_group``: the other ranks are done at
    the test answers' gather while rank 0 still judges and reports, and one that tore down its
    gloo connections that early was once killed by SIGABRT (CI, 2026-12-06). After a failure
    nothing waits: torchrun stops the others.
    """
    if not (ranks.distributed and dist.is_initialized()):
        return
    if completed:
        arrive(ranks)
    dist.destroy_process_group()


def arrive(ranks: Ranks, poll_seconds: float = PREPARATION_POLL_SECONDS) -> None:
    """Count this process in at the run's end and return once every process has.

    It waits on the rendezvous store, not in a collective, because rank 0's judging has no time
    limit and a collective has one (``COLLECTIVE_TIMEOUT``).
    """
    if ranks.store is None:
        return
    ranks.store.add("finished", 1)
    while ranks.store.add("finished", 0) < ranks.world_size:
        time.sleep(poll_seconds)


def rank_memory(fields: dict[str, Any], ranks: Ranks) -> dict[str, Any]:
    """Per-rank peak memory of an epoch, with the max and the sum over ranks.

    The peak is torch's CUDA max allocated where a GPU is in use, else the process's RSS peak.
    """
    peak = fields.get("cuda_max_allocated_mib")
    if peak is None:
        peak = fields.get("peak_rss_mib")
    peaks = ranks.gather([peak])
    per_rank = [p[0] for p in peaks]
    known = [p for p in per_rank if p is not None]
    return {
        "rank_peak_mib": per_rank,
        "rank_peak_max_mib": max(known) if known else None,
        "rank_peak_sum_mib": sum(known) if known else None,
    }
