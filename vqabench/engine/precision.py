"""Mixed precision (``precision = "fp32" | "bf16" | "fp16"``): autocast and, for fp16, a GradScaler.

The weights that train and the optimizer stay fp32; autocast runs the forward passes' matrix
products in bf16 or fp16. A *frozen* ``nn.Linear`` whose weights are never saved (with LoRA: every
frozen Linear, the adapters' base layers included; a copy reference's own Linears) is stored in
that dtype instead (:func:`store_frozen_linears_low`): autocast casts a Linear's weight and bias to
it at every forward anyway, so the results are bit-identical, and the weight takes half the bytes
with no per-forward cast copy. Norms, embeddings and a Linear whose weight is tied to one stay
fp32. Every forward pass through them must run under the run's autocast (the trainer's steps,
eval, generation and the precompute pass all do). Log-probs are taken from fp32 logits
(``answer_logps`` upcasts before its log-softmax) and the objectives compute in fp32, so the
losses and their small differences keep full precision. fp16's narrow range needs a GradScaler; bf16 does not.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

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


def _low_linear_params(scope: nn.Module, owners: nn.Module) -> list[torch.Tensor]:
    """The weights and biases of `scope`'s frozen ``nn.Linear`` layers that no other kind of module
    in `owners` holds (a weight tied to an embedding is read outside autocast, so it stays)."""
    elsewhere = {id(p) for m in owners.modules() if type(m) is not nn.Linear for p in m.parameters(recurse=False)}
    found: dict[int, torch.Tensor] = {}
    for m in scope.modules():
        if type(m) is not nn.Linear:  # exactly nn.Linear: a subclass may read its weight outside F.linear
            continue
        params = [p for p in (m.weight, m.bias) if p is not None]
        if any(p.requires_grad for p in params):
            continue
        found.update((id(p), p) for p in params if id(p) not in elsewhere and p.is_floating_point())
    return list(found.values())


def store_frozen_linears_low(scope: nn.Module, owners: nn.Module, dtype: torch.dtype) -> int:
    """Store `scope`'s frozen Linear weights and biases in `dtype`, in place; returns the bytes saved.

    In place (``param.data``), so a copy reference that shares a tensor with the policy keeps sharing it.
    Exact only while every forward through them runs under autocast to `dtype`.
    """
    saved = 0
    with torch.no_grad():
        for p in _low_linear_params(scope, owners):
            if p.dtype != dtype:
                saved += p.numel() * (p.element_size() - torch.empty(0, dtype=dtype).element_size())
                p.data = p.data.to(dtype)
    return saved


def low_frozen_weights(
    precision: str, train: str, model: nn.Module, reference: tuple[nn.Module, nn.Module] | None = None
) -> int:
    """Store a run's frozen Linears in its autocast dtype where that changes no saved weight; bytes saved.

    Under LoRA every frozen Linear of `model` (a checkpoint holds the adapters alone); for any other
    `train` the frozen parts are saved in the full checkpoint, so they stay as they are. `reference`:
    a copy reference's (part, whole model): its own part never reaches a checkpoint. fp32: nothing.
    """
    if precision == "fp32":
        return 0
    dtype = DTYPES[precision]
    saved = store_frozen_linears_low(model, model, dtype) if train == "lora" else 0
    if reference is not None:
        saved += store_frozen_linears_low(reference[0], reference[1], dtype)
    return saved
