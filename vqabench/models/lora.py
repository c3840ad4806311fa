"""LoRA adapters on a model's language model (``train = "lora"``), through peft.

The adapters go on the Linear modules inside the family's :meth:`~ModelFamily.lora_scope`
(BLIP: the answer decoder; a causal VLM: its language model) whose names end with one of
the spec's ``lora_targets`` (empty: the family's defaults); everything else, the vision part
included, stays frozen. The model becomes a ``peft.PeftModel`` that still answers to its
parts' attribute names and to ``.config``, so the rest of the engine is unchanged. A LoRA
checkpoint holds only the adapter, plus the ``origin`` of the model under it
(:attr:`LoadedModel.origin`); loading it (:mod:`vqabench.models.checkpoints`) rebuilds that
model and merges the adapter in, so a DPO run after a LoRA SFT run starts from SFT's merged
weights and trains a new adapter of its own.
"""

from __future__ import annotations

import re

from torch import nn

from vqabench.models.family import LoadedModel
from vqabench.spec import RunSpec, SpecError

_LAYER_INDEX = re.compile(r"\.\d+\.")


def candidate_modules(scope: nn.Module) -> list[str]:
    """The Linear modules an adapter can go on, per-layer names shown once (``layer.*``)."""
    names = (_LAYER_INDEX.sub(".*.", n) for n, m in scope.named_modules() if isinstance(m, nn.Linear))
    return list(dict.fromkeys(names))


def target_modules(scope: nn.Module, targets: list[str], where: str = "the language model") -> list[str]:
    """Full names of the Linear modules in `scope` that end with a target; SpecError for a target matching none."""
    linear = [n for n, m in scope.named_modules() if isinstance(m, nn.Linear)]
    chosen: list[str] = []
    for target in targets:
        hits = [n for n in linear if n == target or n.endswith("." + target)]
        if not hits:
            raise SpecError(
                f"key 'lora_targets' has value {target!r}, which matches no module of {where}; "
                f"candidates (matched as name suffixes) are {', '.join(candidate_modules(scope))}."
            )
        chosen += [n for n in hits if n not in chosen]
    return chosen


def resolved_targets(loaded: LoadedModel, targets: list[str]) -> list[str]:
    """The spec's targets, or the family's defaults when it names none."""
    return list(targets) if targets else list(loaded.family.lora_targets)


def attach(loaded: LoadedModel, spec: RunSpec) -> None:
    """Wrap `loaded.model` in peft with fresh adapters on the spec's targets inside the family's LoRA scope."""
    from peft import LoraConfig, get_peft_model

    scope = loaded.family.lora_scope(loaded.model)
    names = target_modules(loaded.model.get_submodule(scope), resolved_targets(loaded, spec.lora_targets))
    config = LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=[f"{scope}.{n}" for n in names],
        bias="none",
    )
    loaded.model = get_peft_model(loaded.model, config)
