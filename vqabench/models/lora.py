"""LoRA adapters on the answer decoder (``train = "lora"``), through peft.

The adapters go on the decoder's Linear modules whose names end with one of the spec's
``lora_targets`` (by default its self- and cross-attention projections and its feed-forward
projections); everything else, the encoders included, stays frozen. The model becomes a
``peft.PeftModel`` that still answers to ``.text_decoder``, ``.vision_model`` and ``.config``,
so the rest of the engine is unchanged. A LoRA checkpoint holds only the adapter, plus the
``origin`` of the model under it (:attr:`LoadedModel.origin`); loading it rebuilds that model
and merges the adapter in, so a DPO run after a LoRA SFT run starts from SFT's merged weights
and trains a new adapter of its own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import nn

from vqabench.engine import model as blip
from vqabench.spec import RunSpec, SpecError

_LAYER_INDEX = re.compile(r"\.\d+\.")


def candidate_modules(decoder: nn.Module) -> list[str]:
    """The decoder's Linear modules an adapter can go on, per-layer names shown once (``layer.*``)."""
    names = (_LAYER_INDEX.sub(".*.", n) for n, m in decoder.named_modules() if isinstance(m, nn.Linear))
    return list(dict.fromkeys(names))


def target_modules(decoder: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the decoder's Linear modules that end with a target; SpecError for a target matching none."""
    linear = [n for n, m in decoder.named_modules() if isinstance(m, nn.Linear)]
    chosen: list[str] = []
    for target in targets:
        hits = [n for n in linear if n == target or n.endswith("." + target)]
        if not hits:
            raise SpecError(
                f"key 'lora_targets' has value {target!r}, which matches no module of the answer decoder; "
                f"candidates (matched as name suffixes) are {', '.join(candidate_modules(decoder))}."
            )
        chosen += [n for n in hits if n not in chosen]
    return chosen


def attach(loaded: blip.LoadedModel, spec: RunSpec) -> None:
    """Wrap `loaded.model` in peft with fresh adapters on the spec's decoder targets; only they train."""
    from peft import LoraConfig, get_peft_model

    names = target_modules(loaded.model.text_decoder, spec.lora_targets)
    config = LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=[f"text_decoder.{n}" for n in names],
        bias="none",
    )
    loaded.model = get_peft_model(loaded.model, config)


def rebuild_origin(origin: dict[str, Any]) -> blip.LoadedModel:
    """The model an adapter belongs to, from a checkpoint's recorded origin."""
    name, seed = str(origin.get("model", "")), int(origin.get("seed", 0))
    if name == "embedded-init":
        return blip.build_embedded(seed)
    if name == "blip-vqa-base-random":
        return blip.build_random_blip_vqa_base(seed)
    return blip.load_pretrained(name)


def load_adapter_checkpoint(folder: Path) -> blip.LoadedModel:
    """A LoRA checkpoint as a plain model: its origin rebuilt, the adapter merged into the weights."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    folder = Path(folder)
    meta_path = folder / blip.META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    origin = meta.get("origin")
    if not origin:
        raise blip.ModelError(
            f"LoRA checkpoint '{folder}' does not name the model its adapter belongs to "
            f"('origin' in {blip.META_FILE}); save it with vqabench."
        )
    base = rebuild_origin(origin)
    merged = PeftModel.from_pretrained(base.model, str(folder)).merge_and_unload()
    return blip.LoadedModel(
        merged,
        AutoTokenizer.from_pretrained(str(folder)),
        int(meta.get("image_size", base.image_size)),
        tuple(meta.get("image_mean", base.image_mean)),
        tuple(meta.get("image_std", base.image_std)),
        f"{folder} (LoRA adapter merged into {base.source})",
        {"model": str(folder.resolve())},
    )
