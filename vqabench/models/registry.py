"""Which family serves a model: a config's ``model_type`` → its module, and the built-in variants by name.

Family modules are imported lazily (vLLM's registry does the same), so listing what is
supported imports no model code. A family module defines ``FAMILY`` (its :class:`ModelFamily`)
and ``VARIANTS`` (its built-in random variants).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the registry is read by the host (preset checks), which never imports torch
    from vqabench.models.family import LoadedModel, ModelFamily

#: Family module by the config's ``model_type``.
FAMILY_MODULES: dict[str, str] = {
    "blip": "vqabench.models.blip",
    "qwen2_vl": "vqabench.models.qwen2_vl",
    "qwen2_5_vl": "vqabench.models.qwen2_5_vl",
    "llava": "vqabench.models.llava",
    "gemma3": "vqabench.models.gemma3",
    "idefics3": "vqabench.models.idefics3",
    "paligemma": "vqabench.models.paligemma",
    "smolvlm": "vqabench.models.idefics3",
    "mllama": "vqabench.models.mllama",
}
#: Built-in variants by the name a preset's ``model`` gives, and the family module that builds them.
VARIANT_MODULES: dict[str, str] = {
    "embedded-init": "vqabench.models.blip",
    "blip-vqa-base-random": "vqabench.models.blip",
    "qwen2-vl-tiny-random": "vqabench.models.qwen2_vl",
    "qwen2-vl-2b-random": "vqabench.models.qwen2_vl",
    "qwen2-vl-7b-random": "vqabench.models.qwen2_vl",
    "qwen2.5-vl-tiny-random": "vqabench.models.qwen2_5_vl",
    "qwen2.5-vl-3b-random": "vqabench.models.qwen2_5_vl",
    "llava-tiny-random": "vqabench.models.llava",
    "llava-1.5-7b-random": "vqabench.models.llava",
    "idefics3-tiny-random": "vqabench.models.idefics3",
    "smolvlm-256m-random": "vqabench.models.idefics3",
    "paligemma-tiny-random": "vqabench.models.paligemma",
    "paligemma-3b-random": "vqabench.models.paligemma",
    "gemma3-tiny-random": "vqabench.models.gemma3",
    "gemma3-4b-random": "vqabench.models.gemma3",
    "mllama-tiny-random": "vqabench.models.mllama",
    "llama-3.2-11b-vision-random": "vqabench.models.mllama",
}

#: The ``train`` value a run whose preset names none gets, by family module: BLIP trains its
#: answer decoder (the study's setting); every other family is a causal VLM and trains its
#: language model (:data:`CAUSAL_DEFAULT_TRAIN`). Torch-free, so the host resolves it for the
#: models it can place (:func:`vqabench.presets.with_family_train`) and the worker for the rest.
DEFAULT_TRAIN: dict[str, str] = {"vqabench.models.blip": "decoder"}
CAUSAL_DEFAULT_TRAIN = "lm"


@dataclass(frozen=True)
class Variant:
    """A model the package builds itself, with random weights: by name in a preset's ``model``.

    `build(seed, texts, tokenizer)` makes it; a variant whose tokenizer is trained in-process
    trains it on `texts` (the run's own questions and answers), or reuses `tokenizer` (a
    checkpoint's) so that a saved variant can be rebuilt exactly.
    """

    name: str
    family: str  # the family's name
    description: str
    build: Callable[[int, Iterable[str] | None, Any | None], LoadedModel]
    #: A variant whose tokenizer is trained on the run's text needs it at build time.
    needs_texts: bool = False
    #: Sized like a released checkpoint (for timing and memory at real scale), not a tiny test model.
    real_size: bool = False
    #: Hash of what the package ships for it (config, vocabulary): part of keys of things built from it.
    fingerprint: Callable[[], str] | None = None


def _family_module(module_name: str) -> Any:
    return importlib.import_module(module_name)


def supported_model_types() -> list[str]:
    return sorted(FAMILY_MODULES)


def family_for(model_type: str) -> ModelFamily:
    """The family serving a config's `model_type`; ModelError naming what is supported otherwise."""
    from vqabench.models.family import ModelError

    module_name = FAMILY_MODULES.get(model_type)
    if module_name is None:
        raise ModelError(
            f"model_type '{model_type}' is not a vision-language model vqabench can train; "
            f"supported model types are {', '.join(supported_model_types())}."
        )
    family: ModelFamily = _family_module(module_name).FAMILY
    return family


def default_train(module_name: str) -> str:
    """The ``train`` value that a family module's models get when a preset names none."""
    return DEFAULT_TRAIN.get(module_name, CAUSAL_DEFAULT_TRAIN)


def default_train_of(family: ModelFamily) -> str:
    """The ``train`` value for a loaded model's family when its preset names none (the worker's case)."""
    return default_train(type(family).__module__)


def family_module_of(model: str, model_type: str | None = None) -> str | None:
    """The family module serving a preset's `model`: a built-in variant's, or that of its config's `model_type`."""
    if model == "embedded":
        return FAMILY_MODULES["blip"]
    if model in VARIANT_MODULES:
        return VARIANT_MODULES[model]
    return FAMILY_MODULES.get(model_type) if model_type is not None else None


def family_named(name: str) -> ModelFamily:
    """A family by its user-facing name (as saved in a checkpoint's vqabench.json)."""
    from vqabench.models.family import ModelError

    for module_name in dict.fromkeys(FAMILY_MODULES.values()):
        family: ModelFamily = _family_module(module_name).FAMILY
        if family.name == name:
            return family
    raise ModelError(f"no model family is named '{name}'.")


def variant_names() -> list[str]:
    """The built-in variants' names, without importing any model code."""
    return list(VARIANT_MODULES)


def variants() -> dict[str, Variant]:
    """Every built-in variant, by name, in the registry's order."""
    found: dict[str, Variant] = {}
    for module_name in dict.fromkeys(VARIANT_MODULES.values()):
        for variant in _family_module(module_name).VARIANTS:
            found[variant.name] = variant
    return {name: found[name] for name in VARIANT_MODULES if name in found}


def variant(name: str) -> Variant | None:
    """A built-in variant by name (None: not one), importing only its family's module."""
    module_name = VARIANT_MODULES.get(name)
    if module_name is None:
        return None
    for found in _family_module(module_name).VARIANTS:
        if found.name == name:
            return found
    return None


def preloaded_modules() -> tuple[str, ...]:
    """What a preload server imports before it forks workers: the embedded default's family."""
    return (FAMILY_MODULES["blip"],)
