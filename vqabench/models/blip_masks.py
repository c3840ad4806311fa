"""Make BLIP's text decoder honour the cross-attention mask on transformers 5.

transformers 5's ``BlipTextLayer`` hands the question mask to its cross-attention as
``attention_mask``, and ``BlipTextSelfAttention`` then reads ``encoder_attention_mask``
(which nobody passes) for cross-attention: the mask is dropped and padded question
positions are attended to, so an answer's score depends on how far its question was padded.
:func:`honour_cross_attention_mask` adds a forward pre-hook to every cross-attention module
that passes the mask on under the name the attention reads. Where the caller already passes
``encoder_attention_mask`` (transformers 4.x passes it positionally) the hook changes nothing.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_MARK = "_vqabench_cross_mask_hook"


def _pass_mask_on(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    if kwargs.get("encoder_hidden_states") is not None and kwargs.get("encoder_attention_mask") is None:
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs = {**kwargs, "encoder_attention_mask": mask}
    return args, kwargs


def cross_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention cores of every BLIP text layer's cross-attention inside `model`."""
    found: list[nn.Module] = []
    for layer in model.modules():
        cross = getattr(layer, "crossattention", None) if type(layer).__name__ == "BlipTextLayer" else None
        core = getattr(cross, "self", None)
        if isinstance(core, nn.Module):
            found.append(core)
    return found


def honour_cross_attention_mask(model: nn.Module) -> int:
    """Hook every BLIP cross-attention in `model` (once); returns how many are hooked."""
    hooked = 0
    for module in cross_attention_modules(model):
        if not getattr(module, _MARK, False):
            module.register_forward_pre_hook(_pass_mask_on, with_kwargs=True)
            setattr(module, _MARK, True)
        hooked += 1
    return hooked
