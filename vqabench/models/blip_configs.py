"""Real-size BLIP without downloading weights: the public blip-vqa-base configuration.

Timing and memory do not depend on weight values, so ``blip-vqa-base-random`` builds
``BlipForQuestionAnswering`` from the architecture values of ``Salesforce/blip-vqa-base``
shipped in ``vqabench/assets/blip-vqa-base.json`` (each value's source is named there and
in ``docs/telemetry.md``). transformers is imported lazily.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import BlipConfig

BLIP_VQA_BASE_ASSET = Path(__file__).resolve().parent.parent / "assets" / "blip-vqa-base.json"

#: BlipForQuestionAnswering attribute -> the name used in reports
BLIP_VQA_PARTS = {
    "vision_model": "vision_encoder",
    "text_encoder": "question_encoder",
    "text_decoder": "answer_decoder",
}


def blip_vqa_base_values() -> dict[str, Any]:
    """The shipped asset: the config values, their sources and the public checks."""
    return json.loads(BLIP_VQA_BASE_ASSET.read_text(encoding="utf-8"))


def blip_vqa_base_config() -> BlipConfig:
    """A transformers BlipConfig with the architecture of Salesforce/blip-vqa-base."""
    from transformers import BlipConfig

    return BlipConfig.from_dict(blip_vqa_base_values()["config"])


def _unique_parameters(module: Any) -> dict[int, Any]:
    return {id(p): p for p in module.parameters()}


def parameter_breakdown(model: Any) -> dict[str, int]:
    """Parameter counts of a BLIP VQA model by part, plus total and trainable.

    Tied tensors count once, in the part that holds them (the answer decoder's LM head shares
    its weight with the decoder's word embeddings). ``other`` is whatever sits outside the
    three parts (0 for BlipForQuestionAnswering).
    """
    everything = _unique_parameters(model)
    counts: dict[str, int] = {}
    inside: dict[int, Any] = {}
    for attribute, name in BLIP_VQA_PARTS.items():
        part = _unique_parameters(getattr(model, attribute))
        counts[name] = sum(p.numel() for p in part.values())
        inside.update(part)
    counts["other"] = sum(p.numel() for key, p in everything.items() if key not in inside)
    counts["total"] = sum(p.numel() for p in everything.values())
    counts["trainable"] = sum(p.numel() for p in everything.values() if p.requires_grad)
    return counts
