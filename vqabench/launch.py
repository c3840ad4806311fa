"""How the runner starts a run: which devices it gets and the command line that starts it.

Host side, no torch: the runner asks :func:`visible_gpus` which GPUs exist, checks a session
with :func:`check_launch` before anything starts (one sentence per problem), places each run
with a :class:`DevicePool`, and builds its command with :func:`launch_command`:

* a run with ``gpus`` gets ``nproc_per_node`` of them, free at that moment, through
  ``CUDA_VISIBLE_DEVICES``; runs on different GPUs train at the same time;
* a run without ``gpus`` takes one of the host's ``parallel`` slots (1 unless ``--parallel``):
  on a CPU, runs stay sequential, because concurrent runs would distort each other's epoch
  times;
* a run with ``nproc_per_node`` or ``nnodes`` above 1 starts through torchrun
  (``python -m torch.distributed.run``), which starts one worker per process.

The GPUs the host can see come from ``$VQABENCH_VISIBLE_GPUS`` when it is set (a comma list
of ids, possibly empty: tests use it to pretend devices exist, users to fence a session off),
else from ``nvidia-smi``, restricted by the host's ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vqabench.spec import RunSpec, SpecError

VISIBLE_GPUS_ENV = "VQABENCH_VISIBLE_GPUS"
TORCHRUN_MODULE = "torch.distributed.run"


@dataclass(frozen=True)
class Placement:
    """Where one run trains: its GPUs (empty = the host's default device) and its host slot."""

    gpus: tuple[int, ...] = ()
    host_slot: bool = False
    concurrent_runs: int = 1  # how many runs may share the host while this one trains

    def label(self, spec: RunSpec) -> str:
        """Short text for the runs table and the log ('GPU 1', 'GPUs 0,1, 2 processes', 'cpu');
        empty for a single process on the default device."""
        parts = []
        if self.gpus:
            parts.append(f"GPU{'s' if len(self.gpus) > 1 else ''} {','.join(map(str, self.gpus))}")
        elif spec.device != "auto":
            parts.append(spec.device)
        if spec.nproc_per_node > 1:
            parts.append(f"{spec.nproc_per_node} processes")
        if spec.nnodes > 1:
            parts.append(f"node {spec.node_rank} of {spec.nnodes}")
        return ", ".join(parts)

    def env(self) -> dict[str, str]:
        """What the worker's environment gets: its GPUs, numbered as nvidia-smi numbers them."""
        if not self.gpus:
            return {}
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpus)), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


class DevicePool:
    """Hands out GPUs (one run each) and the host's `parallel` slots for runs without GPUs."""

    def __init__(self, parallel: int = 1) -> None:
        self.parallel = max(parallel, 1)
        self.host_free = self.parallel
        self.busy: set[int] = set()

    def acquire(self, spec: RunSpec) -> Placement | None:
        """A placement for `spec` now, or None when what it needs is busy."""
        if spec.gpus:
            free = [g for g in spec.gpus if g not in self.busy]
            if len(free) < spec.nproc_per_node:
                return None
            chosen = tuple(free[: spec.nproc_per_node])
            self.busy.update(chosen)
            return Placement(gpus=chosen)
        if self.host_free <= 0:
            return None
        self.host_free -= 1
        return Placement(host_slot=True, concurrent_runs=self.parallel)

    def release(self, placement: Placement) -> None:
        self.busy.difference_update(placement.gpus)
        if placement.host_slot:
            self.host_free += 1

    @property
    def idle(self) -> bool:
        return not self.busy and self.host_free == self.parallel


def visible_gpus(env: Mapping[str, str] | None = None) -> list[int]:
    """Ids of the GPUs this host can place runs on ([] without a GPU)."""
    env = os.environ if env is None else env
    raw = env.get(VISIBLE_GPUS_ENV)
    if raw is not None:
        try:
            return [int(x) for x in raw.split(",") if x.strip()]
        except ValueError:
            raise SpecError(
                f"${VISIBLE_GPUS_ENV} has value {raw!r}; give GPU ids as a comma list like 0,1 (or leave it empty)."
            ) from None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    ids = [int(line) for line in out.stdout.split() if line.strip().isdigit()] if out.returncode == 0 else []
    fenced = env.get("CUDA_VISIBLE_DEVICES")
    if fenced is not None:
        allowed = {x.strip() for x in fenced.split(",")}
        ids = [i for i in ids if str(i) in allowed]
    return ids


def torchrun_available(python: str = sys.executable) -> bool:
    """Whether torch.distributed.run can be started by `python` (checked without importing torch)."""
    if python != sys.executable:
        probe = f"import importlib.util as u, sys; sys.exit(0 if u.find_spec('{TORCHRUN_MODULE}') else 1)"
        try:
            return subprocess.run([python, "-c", probe], capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False
    torch_spec = importlib.util.find_spec("torch")
    if torch_spec is None or not torch_spec.submodule_search_locations:
        return False
    return any((Path(p) / "distributed" / "run.py").is_file() for p in torch_spec.submodule_search_locations)


def is_distributed(spec: RunSpec) -> bool:
    return spec.nproc_per_node > 1 or spec.nnodes > 1


def launch_command(
    spec: RunSpec, worker_cmd: Sequence[str], spec_path: Path, python: str = sys.executable
) -> list[str]:
    """The command that starts `spec`'s worker: itself, or torchrun starting one per process.

    One node: ``--standalone`` (torchrun picks a free port, so concurrent runs never collide).
    Several: a static rendezvous at ``rdzv_endpoint`` with this node's ``node_rank``.
    ``--no-python`` lets torchrun start the worker command exactly as the runner would.
    """
    if not is_distributed(spec):
        return [*worker_cmd, str(spec_path)]
    command = [python, "-m", TORCHRUN_MODULE, f"--nproc-per-node={spec.nproc_per_node}"]
    if spec.nnodes == 1:
        command.append("--standalone")
    else:
        command += [
            f"--nnodes={spec.nnodes}",
            f"--node-rank={spec.node_rank}",
            "--rdzv-backend=static",
            f"--rdzv-endpoint={spec.rdzv_endpoint}",
        ]
    return [*command, "--max-restarts=0", "--no-python", *worker_cmd, str(spec_path)]


def check_launch(specs: Sequence[RunSpec], gpus: Sequence[int], *, has_torchrun: bool | None = None) -> None:
    """Refuse, in one sentence, a session whose runs cannot be placed or started."""
    visible = list(gpus)
    shown = ", ".join(map(str, visible))
    for spec in specs:
        for gpu in spec.gpus:
            if gpu not in visible:
                where = (
                    f"no GPU is visible here (${VISIBLE_GPUS_ENV} or nvidia-smi)"
                    if not visible
                    else (f"the visible GPUs are {shown}")
                )
                raise SpecError(
                    f"run '{spec.name}': --gpus / key 'gpus' names GPU {gpu}, which does not exist; {where}."
                )
        if spec.gpus and spec.nproc_per_node > len(spec.gpus):
            raise SpecError(
                f"run '{spec.name}': key 'nproc_per_node' has value {spec.nproc_per_node}, but the run may use "
                f"{len(spec.gpus)} GPU(s) (gpus = {spec.gpus}); list at least {spec.nproc_per_node} or lower it."
            )
        uses_cuda = spec.device == "cuda" or (spec.device == "auto" and bool(visible))
        if not spec.gpus and uses_cuda and spec.nproc_per_node > len(visible):
            raise SpecError(
                f"run '{spec.name}': key 'nproc_per_node' has value {spec.nproc_per_node}, but this machine has "
                f'{len(visible)} visible GPU(s); use at most {len(visible)} or set device = "cpu".'
            )
        if is_distributed(spec):
            if has_torchrun is None:
                has_torchrun = torchrun_available()
            if not has_torchrun:
                raise SpecError(
                    f"run '{spec.name}' sets nproc_per_node = {spec.nproc_per_node} and nnodes = {spec.nnodes}, "
                    f"which start it through torchrun, but {TORCHRUN_MODULE} is not installed for "
                    f"{sys.executable}; install torch there or set both to 1."
                )
