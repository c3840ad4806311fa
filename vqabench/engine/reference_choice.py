"""Which exact reference a run keeps when its preset asks for ``reference = "auto"``.

Every strategy gives the same log-probs (see :mod:`vqabench.engine.reference`); they differ in
cost. ``precompute`` scores every pair once before training and then costs nothing per step and
no resident bytes, so it pays off once the run reads the table at least twice (two epochs) and
the table fits the cache folder. Under LoRA the ``adapter`` reference costs no resident bytes
either, only one extra pass per step. Otherwise the ``copy`` reference, which needs neither.
Pure Python (no torch), so the decision is tested with plain numbers.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Columns a precomputed table keeps per pair (chosen, rejected, KTO's mismatched), float32 each.
TABLE_COLUMNS = 3
TABLE_VALUE_BYTES = 4
#: torch.save's zip framing of the table (two splits of three tensors), with room to spare.
TABLE_FRAMING_BYTES = 64 * 1024


@dataclass(frozen=True)
class ReferenceChoice:
    """The strategy a preset asked for, the one the run keeps, and why (one short phrase)."""

    asked: str
    chosen: str
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def label(self) -> str:
        """'precompute (auto: 3 epochs, table fits)'; just the strategy when it was asked for by name."""
        return f"{self.chosen} (auto: {self.why})" if self.asked == "auto" else self.chosen


def precomputed_table_bytes(pairs: int) -> int:
    """Bytes a precomputed reference table takes on disk for `pairs` train and eval pairs."""
    return pairs * TABLE_COLUMNS * TABLE_VALUE_BYTES + TABLE_FRAMING_BYTES


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or, before it exists, its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def choose_reference(asked: str, *, train: str, epochs: int, table_bytes: int, free: int) -> ReferenceChoice:
    """The cheapest exact reference for `asked` = "auto"; any other strategy is kept as asked.

    precompute when the run has at least two epochs and a table of `table_bytes` fits the `free`
    bytes of the cache folder; else adapter under ``train = "lora"``; else copy.
    """
    if asked != "auto":
        return ReferenceChoice(asked, asked, "asked for")
    fits = table_bytes <= free
    if epochs >= 2 and fits:
        return ReferenceChoice(asked, "precompute", f"{epochs} epochs, table fits")
    blocker = f"{epochs} epoch{'s' if epochs != 1 else ''}" if epochs < 2 else "table does not fit"
    if train == "lora":
        return ReferenceChoice(asked, "adapter", f"LoRA, {blocker}")
    return ReferenceChoice(asked, "copy", blocker)
