"""The report's building blocks: a table (:class:`ReportTable`), its cells, and the notes
and number formats every table shares."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

NA = "n/a"


MIB = 2**20


#: A run's timing is flagged as disturbed above this coefficient of variation of its epoch times.
NOISY_CV = 0.15


#: Methods whose training step does strictly more work than SFT's, which scores the chosen answer
#: only: each also runs the rejected answer through the decoder (objectives.OBJECTIVE_INPUTS,
#: needs_rejected), and DPO, IPO and KTO with a copy or adapter reference one more decoder pass.
MORE_WORK_THAN_SFT = frozenset({"dpo", "ipo", "kto", "orpo", "simpo"})


NOISY = "noisy"


NOISY_NOTE = (
    f"{NOISY}: the 95% interval reaches 1 (or lies below it) for a method whose step does strictly more "
    "work than SFT's (it also scores the rejected answer; DPO, IPO and KTO with a copy or adapter "
    "reference run one more decoder pass), so the timing could not tell its cost from SFT's: that is "
    "noise, not a finding; more rounds or epochs, or a quieter machine, narrow the interval."
)


#: Load from other work beyond the cores left idle, as a share of the cores, that marks a timing disturbed.
LOAD_SLACK = 0.05


TOO_FEW = "too few items"


BASE = "base"


BASE_NOTE = (
    "base: the starting model (the checkpoint the runs without `after` start from), before any training, "
    "answering the same test questions, scored by the same judge; a method's row minus it is what its "
    "training gained."
)


MODEL_NOTE = (
    "Model: the model family and its parameter count (all parameters, shared ones once; "
    "`vqabench models` lists the families)."
)


SEEDS_NOTE = (
    "Rows marked (N seeds): mean over the runs NAME@s0, NAME@s1, ... ± the half-width of a "
    "95% Student-t interval across seeds (pairs and splits fixed; initialisation, shuffling "
    "and dropout vary). `vqabench export --per-seed` adds every seed's own row."
)


@dataclass
class ReportTable:
    """A table as text cells; `align` is "left" or "right" per column."""

    title: str
    columns: list[str]
    align: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def is_interval(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(as_number(v) is not None for v in value)


def fmt_int(value: Any) -> str:
    number = as_number(value)
    return NA if number is None else f"{number:,.0f}"


def fmt(value: Any, digits: int) -> str:
    number = as_number(value)
    if number is None:
        return NA
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    return f"{number:.{digits}f}"


def p_text(p: float | None) -> str:
    if p is None:
        return TOO_FEW
    return "< 0.001" if p < 0.001 else f"{p:.3f}"
