"""Loading and saving models of any family: by hub id, local folder, built-in variant, or LoRA adapter.

A checkpoint vqabench saves is the model's own ``save_pretrained`` folder, its tokenizer,
and ``vqabench.json`` (family, image format, source, origin). A LoRA checkpoint holds only
the adapter; loading it rebuilds the model under it from ``origin`` and merges the adapter
in. The family is read from the config's ``model_type`` (:mod:`vqabench.models.registry`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vqabench.models import registry
from vqabench.models.family import ADAPTER_CONFIG, META_FILE, ImageFormat, LoadedModel, ModelError


def _rgb(values: Any, where: object) -> tuple[float, float, float]:
    numbers = tuple(float(v) for v in values)
    if len(numbers) != 3:
        raise ModelError(f"{where}: an image mean/std needs 3 values (one per RGB channel), not {len(numbers)}.")
    return numbers[0], numbers[1], numbers[2]


def model_type_of(name_or_path: str) -> str:
    """The ``model_type`` of a hub id's or folder's config; ModelError when there is none."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not read the config of model '{name_or_path}': {first}") from exc
    return str(config.model_type)


def load_pretrained(name_or_path: str) -> LoadedModel:
    """Any supported model by hub id or local folder (a LoRA adapter folder is merged into its origin)."""
    path = Path(name_or_path)
    local = path.exists()
    if local and (path / ADAPTER_CONFIG).exists():
        return load_adapter_checkpoint(path)
    if not local and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        raise ModelError(
            f"model '{name_or_path}' is neither an existing folder nor a hub id like 'Qwen/Qwen2-VL-2B-Instruct'."
        )
    family = registry.family_for(model_type_of(name_or_path))
    loaded = family.from_pretrained(name_or_path)
    meta_path = path / META_FILE if local else None
    if meta_path is not None and meta_path.exists():  # vqabench's own record wins over the processor config
        meta = json.loads(meta_path.read_text())
        if "image_mean" in meta:
            loaded.image = ImageFormat(
                int(meta.get("image_size", loaded.image.size)),
                _rgb(meta["image_mean"], meta_path),
                _rgb(meta["image_std"], meta_path),
            )
    return loaded


def build_variant(
    name: str, seed: int, texts: Iterable[str] | None = None, tokenizer: Any | None = None
) -> LoadedModel:
    """A built-in random variant by name; ModelError naming the variants for an unknown name."""
    found = registry.variant(name)
    if found is None:
        raise ModelError(
            f"no built-in model is named '{name}'; built-in models are {', '.join(registry.variant_names())}."
        )
    return found.build(seed, texts, tokenizer)


def save_checkpoint(loaded: LoadedModel, folder: Path) -> None:
    """Save model (or only its LoRA adapter), tokenizer and vqabench's facts for :func:`load_pretrained`."""
    folder.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    loaded.family.save_extra(loaded, folder)
    meta = {
        "family": loaded.family.name,
        "image_size": loaded.image.size,
        "image_mean": list(loaded.image.mean),
        "image_std": list(loaded.image.std),
        "source": loaded.source,
        "origin": loaded.origin,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def checkpoint_fingerprint(folder: Path) -> str:
    """Hash of a checkpoint's weight files: keys caches derived from those weights."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise ModelError(f"checkpoint folder '{folder}' has no weight files (.safetensors or .bin).")
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    if (Path(folder) / ADAPTER_CONFIG).exists():  # an adapter is only as fixed as the model under it
        origin = json.loads((Path(folder) / META_FILE).read_text()).get("origin") or {}
        base = Path(str(origin.get("model", "")))
        h.update((checkpoint_fingerprint(base) if base.is_dir() else json.dumps(origin, sort_keys=True)).encode())
    return h.hexdigest()[:16]


def rebuild_origin(origin: dict[str, Any], tokenizer: Any | None = None) -> LoadedModel:
    """The model an adapter belongs to, from a checkpoint's recorded origin (a variant, folder or hub id)."""
    name, seed = str(origin.get("model", "")), int(origin.get("seed", 0))
    if registry.variant(name) is not None:
        return build_variant(name, seed, tokenizer=tokenizer)
    return load_pretrained(name)


def load_adapter_checkpoint(folder: Path) -> LoadedModel:
    """A LoRA checkpoint as a plain model: its origin rebuilt, the adapter merged into the weights."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    folder = Path(folder)
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    origin = meta.get("origin")
    if not origin:
        raise ModelError(
            f"LoRA checkpoint '{folder}' does not name the model its adapter belongs to "
            f"('origin' in {META_FILE}); save it with vqabench."
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    base = rebuild_origin(origin, tokenizer)
    merged = PeftModel.from_pretrained(base.model, str(folder)).merge_and_unload()
    image = ImageFormat(
        int(meta.get("image_size", base.image.size)),
        _rgb(meta.get("image_mean", base.image.mean), meta_path),
        _rgb(meta.get("image_std", base.image.std), meta_path),
    )
    return base.family.make_loaded(
        merged,
        tokenizer,
        image,
        f"{folder} (LoRA adapter merged into {base.source})",
        {"model": str(folder.resolve())},
    )
