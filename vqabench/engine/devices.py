"""How a run's or a probe's device is named in its events (run_started, probe_started)."""

from __future__ import annotations

import os
import platform

import torch

from vqabench.engine.distributed import Ranks


def describe(device: torch.device) -> str:
    """The device and, for a CPU, its processor and thread count."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def describe_all(device: torch.device, ranks: Ranks) -> str:
    """The device, the GPUs the runner placed the run on, and the processes that share the work."""
    text = describe(device)
    placed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device.type == "cuda" and placed:
        text += f", CUDA_VISIBLE_DEVICES={placed}"
    if ranks.distributed:
        text += f", {ranks.world_size} processes ({ranks.backend})"
    return text
