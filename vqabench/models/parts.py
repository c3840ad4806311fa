"""Which weights train, in any family: freezing, train/eval modes, dropout, parameter counts.

The family names the trainable modules for each ``train`` value
(:meth:`~vqabench.models.family.ModelFamily.trainable_modules`); everything here works from
that list, so the engine never names a model's parts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vqabench.models.family import LoadedModel


def trainable_part(loaded: LoadedModel, train: str) -> nn.Module:
    """The module that trains (with LoRA: the one the adapters sit in), as one module.

    Several modules (a language model and its projector) are held in a ``ModuleList`` that
    shares their parameters: the best-epoch copy, DDP and a copy reference all take it whole.
    """
    modules = loaded.family.trainable_modules(loaded.model, train)
    return modules[0] if len(modules) == 1 else nn.ModuleList(modules)


def freeze_for_training(loaded: LoadedModel, train: str) -> None:
    """Freeze everything outside the trainable part (with LoRA: all but the adapters)."""
    part = trainable_part(loaded, train)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    for name, p in part.named_parameters():
        p.requires_grad_(train != "lora" or "lora_" in name)


def set_train_mode(loaded: LoadedModel, train: str) -> None:
    """Frozen parts in eval mode, the trainable part in train mode."""
    loaded.model.eval()
    trainable_part(loaded, train).train()


def disable_dropout(model: nn.Module) -> int:
    """Set the model's own dropout probabilities to 0 (TRL's ``disable_dropout``); returns how many.

    The reference always runs in eval mode; with the policy's dropout off as well, policy and
    reference give identical log-probs at step 0, so DPO starts at exactly log 2. LoRA's
    dropout (peft's ``lora_dropout`` modules) is left at the spec's ``lora_dropout``: it is a
    setting of its own, and with the adapters starting at zero it does not move step 0.
    """
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and "lora_dropout" not in name.split("."):
            module.p = 0.0
            count += 1
    return count


class RecomputedForward:
    """A block's forward that keeps only its inputs for backward and runs again there (under grad only).

    Set as the block's ``forward`` attribute, so the block and its submodules (LoRA's adapters
    included) stay where they are; non-reentrant checkpointing works under autocast and DDP.
    """

    def __init__(self, forward: Any):
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # eval, generation and the reference keep nothing anyway
            return self.forward(*args, **kwargs)
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def checkpoint_mlp_blocks(loaded: LoadedModel) -> int:
    """Recompute each decoder layer's MLP in backward (``activation_checkpointing = "mlp"``); returns how many.

    ModelError when the family has none it can recompute; a block already wrapped stays as it is.
    """
    blocks = loaded.family.checkpointed_blocks(loaded.model)
    for block in blocks:
        if not isinstance(block.__dict__.get("forward"), RecomputedForward):
            block.forward = RecomputedForward(block.forward)
    return len(blocks)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
