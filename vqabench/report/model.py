"""The report's building blocks: a table (:class:`ReportTable`), its cells, and the notes
and number formats every table shares."""

from __future__ import annotations

import math
from collections.abc import Sequence
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


#: What a figure may carry beside its value: "std", "min", "max", "p10", "p90", "half_width" (across
#: seeds), "cores", "source" (of a memory peak), "noisy", "best" (epoch), counts by reason.
Detail = float | str | bool | None


@dataclass
class Cell:
    """One cell of a table: the figure (`value`: a number, a word, or None when not measured), its 95%
    interval (`low`, `high`) where it has one, its `unit`, other figures it shows (`details`), and
    `text`, what the Markdown and the console print. Build cells with :func:`figure` and :func:`word`,
    which write `text` from the figures, so a rendering cannot disagree with the data."""

    text: str
    value: float | str | None = None
    unit: str | None = None
    low: float | None = None
    high: float | None = None
    details: dict[str, Detail] = field(default_factory=dict)


@dataclass
class ReportTable:
    """A table of typed cells, found by its `name` ("quality", "efficiency", ...); `align` is "left" or
    "right" per column; `notes` define its columns."""

    title: str
    columns: list[str]
    align: list[str]
    cells: list[list[Cell]]
    notes: list[str] = field(default_factory=list)
    name: str = ""

    @property
    def rows(self) -> list[list[str]]:
        """The cells as the text they print."""
        return [[cell.text for cell in row] for row in self.cells]


def word(text: str | None, *, unit: str | None = None) -> Cell:
    """A cell that is a word ("decoder", "built in 1.20 s", a run's name); None prints "n/a"."""
    return Cell(NA if text is None else text, text, unit)


def figure(
    value: Any,
    digits: int,
    unit: str | None = None,
    *,
    interval: Sequence[float] | None = None,
    half_width: float | None = None,
    signed: bool = False,
    thousands: bool = False,
    details: dict[str, Detail] | None = None,
) -> Cell:
    """A number printed with `digits` decimals ("n/a" when not measured), with its 95% interval as
    "[low, high]" or its across-seed half-width as "± h"; `signed` prints "+" on positive numbers."""
    number = as_number(value)
    sign = "+" if signed else ""
    if number is None:
        text = NA
    elif math.isinf(number):
        text = "inf" if number > 0 else "-inf"
    else:
        text = f"{number:{sign}{',' if thousands else ''}.{digits}f}"
    cell = Cell(text, number, unit, details=dict(details or {}))
    if number is not None and interval:
        cell.low, cell.high = float(interval[0]), float(interval[1])
        cell.text += f" [{cell.low:{sign}.{digits}f}, {cell.high:{sign}.{digits}f}]"
    if number is not None and half_width is not None:
        cell.details["half_width"] = half_width
        cell.text += f" ± {half_width:.{digits}f}"
    return cell


def missing(text: str = "–", unit: str | None = None) -> Cell:
    """A cell with no figure on purpose ("–": the column does not apply to this row)."""
    return Cell(text, None, unit)


def p_cell(p: float | None) -> Cell:
    """A p-value: "< 0.001" below it, else three decimals; too few items for a test: the words."""
    if p is None:
        return word(TOO_FEW)
    return Cell(p_text(p), p, "probability")


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def is_interval(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(as_number(v) is not None for v in value)


def p_text(p: float | None) -> str:
    if p is None:
        return TOO_FEW
    return "< 0.001" if p < 0.001 else f"{p:.3f}"
