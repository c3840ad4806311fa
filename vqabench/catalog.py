"""What `vqabench models` lists: the model families and the built-in variants, with parameter counts.

UI-free: :func:`catalog` gathers the rows, :func:`catalog_text` lays them out as plain text.
Variants are built on torch's meta device (shapes without storage), so counting a 7B variant
takes seconds and no memory. A variant that fails to build shows its error in its own row.
The random causal variants' tokenizers are trained without run text here (bytes and special
tokens only); a run trains up to a few hundred merges more, which adds their embedding rows.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from vqabench.models.registry import FAMILY_MODULES, variants

#: Released checkpoints each family loads by hub id: examples, not a whitelist (any checkpoint whose
#: config names one of the family's model types loads). Data, so that no host module names a family.
HUB_EXAMPLES_FILE = Path(__file__).with_name("assets") / "hub-examples.json"


def hub_examples() -> dict[str, tuple[str, ...]]:
    data = json.loads(HUB_EXAMPLES_FILE.read_text(encoding="utf-8"))
    return {k: tuple(v) for k, v in data.items() if not k.startswith("_")}


@dataclass(frozen=True)
class FamilyRow:
    name: str
    model_types: tuple[str, ...]
    trains: tuple[str, ...]  # the `train` values the family supports
    hub_examples: tuple[str, ...]


@dataclass(frozen=True)
class VariantRow:
    name: str
    family: str
    real_size: bool
    parameters: int | None  # None when the build failed
    error: str | None = None  # one sentence, when the build failed
    description: str = ""


def family_rows() -> list[FamilyRow]:
    """Every family once, in the registry's order, with all the model types it serves."""
    rows: dict[str, FamilyRow] = {}
    examples = hub_examples()
    for module_name in dict.fromkeys(FAMILY_MODULES.values()):
        family = importlib.import_module(module_name).FAMILY
        types = tuple(t for t, m in FAMILY_MODULES.items() if m == module_name)
        rows[family.name] = FamilyRow(
            family.name,
            types,
            tuple(family.train_parts),
            getattr(family, "hub_examples", None) or examples.get(family.name, ()),
        )
    return list(rows.values())


def count_variant_parameters(name: str, device: str = "meta") -> int:
    """A built-in variant's parameter count (tied weights once), built on `device`."""
    import torch

    from vqabench.models.parts import count_parameters

    variant = variants()[name]
    torch.manual_seed(0)
    with torch.device(device):
        loaded = variant.build(0, None, None)
    return count_parameters(loaded.model)[1]


def _one_sentence(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0].strip()
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if text.endswith(".") else text + "."


def variant_rows() -> list[VariantRow]:
    """Every built-in variant with its parameter count, or the error that stopped its build."""
    rows = []
    for name, variant in variants().items():
        try:
            count: int | None = count_variant_parameters(name)
            error = None
        except Exception as exc:  # a broken variant is one row's error, not the command's
            count, error = None, _one_sentence(exc)
        rows.append(VariantRow(name, variant.family, variant.real_size, count, error, variant.description))
    return rows


def short_count(n: int) -> str:
    """2_208_985_600 -> '2.21B', 212_480 -> '0.21M', 950 -> '950'."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e4:
        return f"{n / 1e6:.2f}M"
    return str(n)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


def catalog_text() -> str:
    """The plain-text listing `vqabench models` prints."""
    lines = ["Model families (a preset's model: a hub id or local folder whose config has one of these types)", ""]
    lines += _table(
        ["Family", "Model types", "train values", "Hub ids, for example"],
        [[f.name, ", ".join(f.model_types), ", ".join(f.trains), ", ".join(f.hub_examples)] for f in family_rows()],
    )
    lines += ["", "Built-in variants (a preset's model by name; random weights, no download)", ""]
    rows = []
    for v in variant_rows():
        size = "real size" if v.real_size else "tiny"
        count = f"{v.parameters:,} ({short_count(v.parameters)})" if v.parameters is not None else f"n/a: {v.error}"
        rows.append([v.name, v.family, size, count])
    lines += _table(["Variant", "Family", "Size", "Parameters"], rows)
    lines += [
        "",
        "Parameters: counted on torch's meta device (no memory); a causal variant's tokenizer is trained on",
        "the run's text, which adds up to a few hundred vocabulary rows to the count shown here.",
    ]
    return "\n".join(lines) + "\n"
