"""The weights of the best epoch so far (lowest eval loss), kept on the CPU for the test answers.

Only the parameters that train are copied: the frozen ones (the encoders, and with LoRA the
whole base decoder) cannot differ between epochs. With LoRA that is the adapters alone, not
a second copy of the decoder per new best epoch (at the study model's real size, r 16 trains 3.8M of
the decoder's 137.9M values: docs/benchmarks.md §8).
"""

from __future__ import annotations

import torch
from torch import nn


class BestWeights:
    """A CPU copy of `part`'s trainable parameters, taken by :meth:`keep`, put back by :meth:`restore`."""

    def __init__(self, part: nn.Module):
        self.part = part
        self.state: dict[str, torch.Tensor] | None = None

    def keep(self) -> None:
        """Copy the trainable parameters as they are now (the epoch that just became the best)."""
        self.state = {
            name: p.detach().to("cpu", copy=True) for name, p in self.part.named_parameters() if p.requires_grad
        }

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.state or {}).values())

    @torch.no_grad()
    def restore(self) -> bool:
        """Put the kept values back into the same parameters; False when nothing was kept."""
        if self.state is None:
            return False
        params = dict(self.part.named_parameters())
        missing = sorted(set(self.state) - set(params))
        if missing:
            raise RuntimeError(f"the best epoch's weights name parameters the model no longer has: {missing[:3]}")
        for name, value in self.state.items():
            params[name].copy_(value)
        return True
