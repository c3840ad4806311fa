"""Mixed precision (``precision = "fp32" | "bf16" | "fp16"``): autocast and, for fp16, a GradScaler.

The weights and the optimizer stay fp32; autocast runs the forward passes' matrix products in
bf16 or fp16. Log-probs are taken from fp32 logits (``answer_logps`` upcasts before its
log-softmax) and the objectives compute in fp32, so the losses and their small differences
keep full precision. fp16's narrow range needs a GradScaler; bf16 does not.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from vqabench.spec import SpecError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(name: str, device: torch.device) -> None:
    """SpecError (one sentence) for a precision this device cannot run."""
    if name == "fp16" and device.type != "cuda":
        raise SpecError("key 'precision' has value 'fp16', which needs a CUDA GPU; use 'bf16' or 'fp32' on the CPU.")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SpecError(
            f"key 'precision' has value 'bf16', but this GPU ({torch.cuda.get_device_name(device)}) "
            f"does not support bfloat16; use 'fp16' or 'fp32'."
        )


def autocast(name: str, device: torch.device) -> Any:
    """The forward passes' autocast for precision `name` on `device`; a no-op context for fp32.

    Every forward pass of a run goes through it, the precomputed reference's included, so the
    reference strategies give the same numbers under every precision.
    """
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[name])


class Precision:
    """The autocast context of a run's forward passes and the scaler of its backward pass."""

    def __init__(self, name: str, device: torch.device):
        check_precision(name, device)
        self.name = name
        self.device = device
        self.dtype = DTYPES[name]
        # A disabled scaler passes the loss and the optimizer step straight through.
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self) -> Any:
        """Autocast to the run's dtype; a no-op context for fp32."""
        return autocast(self.name, self.device)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward pass and optimizer step; with fp16 the loss is scaled and an overflowing step skipped."""
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
