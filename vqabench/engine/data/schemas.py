"""Row schemas of image preference datasets, detected from the columns and overridable.

Three kinds, all ending in (question, image, chosen, rejected):

* ``preference`` — TRL-style (``prompt``/``question``, ``image``/``images``, ``chosen``,
  ``rejected``), RLAIF-V (``question``, ``image``, ``chosen``, ``rejected``) and the like;
* ``llava`` — LLaVA-style JSON such as ``alexshengzhili/mllm-dpo``: an image path, a question
  as a ``{"from": "human", "value": ...}`` turn (or its Python repr, or a ``conversations``
  list), and chosen/rejected as ``{"from": "gpt", ...}`` turns or whole conversations;
* ``vlfeedback`` — ``prompt``, ``img_path``/``image`` and ``completions`` rated per aspect:
  chosen is the best weighted-mean rating, rejected the worst.

Text in any of the conversational forms (strings, role/content or from/value turns, lists
of them, TRL content parts) reduces to the user turn for the question and the assistant turn
for an answer, with image placeholders such as ``<image>`` stripped.
"""

from __future__ import annotations

import ast
import json
import math
import re
import string
from dataclasses import dataclass, field
from typing import Any

from vqabench.engine.data.records import DataError
from vqabench.spec import DatasetSpec

PREFERENCE, LLAVA, VLFEEDBACK = "preference", "llava", "vlfeedback"
#: Our column names; `DatasetSpec.columns` maps these to the dataset's own names.
OUR_COLUMNS = ("question", "image", "chosen", "rejected", "completions")
QUESTION_COLUMNS = ("question", "prompt", "query", "instruction", "conversations")
IMAGE_COLUMNS = ("image", "images", "img_path", "image_path", "img", "image_file")
VLFEEDBACK_ASPECTS = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")

#: Skip reasons this module reports (keys of QualityReport.skipped).
EMPTY_QUESTION = "empty_question"
EMPTY_ANSWER = "empty_answer"
IDENTICAL_ANSWERS = "identical_answers"
RATING_TIE = "rating_tie"  # two completions share the best (or the worst) rating
MISSING_RATING = "missing_rating"  # a completion lacks a rating, or it is not a number
SMALL_MARGIN = "small_margin"  # best minus worst rating is below dataset.min_margin
TOO_FEW_COMPLETIONS = "too_few_completions"

_PLACEHOLDER = re.compile(r"</?(?:image|img|imagehere|image_placeholder)>|<\|image(?:_pad)?\|>", re.IGNORECASE)
_USER_ROLES = frozenset({"user", "human"})
_ASSISTANT_ROLES = frozenset({"assistant", "gpt", "model", "bot"})
_TEXT_KEYS = ("value", "content", "text")


@dataclass(frozen=True)
class RowPair:
    """A row reduced to plain text, with its image cell still to be resolved."""

    question: str
    image: Any
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Schema:
    """Which columns hold what, for one dataset."""

    kind: str
    image: str  # a column, or a template such as "{id}.jpg" filled from the row
    question: str | None = None  # None: the user turn of `chosen`
    chosen: str | None = None
    rejected: str | None = None
    completions: str | None = None
    aspect_weights: dict[str, float] = field(default_factory=dict)
    min_margin: float = 0.0

    @property
    def image_is_template(self) -> bool:
        return "{" in self.image

    def columns_used(self) -> list[str]:
        """The dataset columns this schema reads (others need not be converted to Python)."""
        image = _template_fields(self.image) if self.image_is_template else [self.image]
        named = [self.question, self.chosen, self.rejected, self.completions, *image]
        return list(dict.fromkeys(c for c in named if c))

    def describe(self) -> dict[str, Any]:
        """The resolved mapping, for the run's data report."""
        cols = {k: getattr(self, k) for k in OUR_COLUMNS if getattr(self, k) is not None}
        out: dict[str, Any] = {"schema": self.kind, "columns": cols}
        if self.kind == VLFEEDBACK:
            out["aspect_weights"] = dict(self.aspect_weights)
            out["min_margin"] = self.min_margin
        return out


# ---------------------------------------------------------------------------------- text


def clean_text(text: str) -> str:
    """Strip image placeholders and collapse whitespace."""
    return " ".join(_PLACEHOLDER.sub(" ", text).split())


def _is_turn(value: Any) -> bool:
    return isinstance(value, dict) and any(k in value for k in _TEXT_KEYS)


def _parse_structured(text: str) -> Any:
    """A JSON or Python-literal turn (or list of turns) stored as a string, else the string."""
    head = text.lstrip()[:1]
    if head not in ("{", "["):
        return text
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if _is_turn(value) or (isinstance(value, list) and value and all(_is_turn(v) for v in value)):
            return value
        return text
    return text


def _role(turn: dict[str, Any]) -> str:
    return str(turn.get("from") or turn.get("role") or "").lower()


def _turn_text(turn: dict[str, Any]) -> str:
    for key in _TEXT_KEYS:
        if key in turn and turn[key] is not None:
            content = turn[key]
            break
    else:
        return ""
    if isinstance(content, list):  # TRL content parts: [{"type": "image"}, {"type": "text", "text": ...}]
        parts = [p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
        parts += [p for p in content if isinstance(p, str)]
        return clean_text(" ".join(parts))
    return clean_text(str(content))


def _text(value: Any, roles: frozenset[str], last: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        value = _parse_structured(value)
        if isinstance(value, str):
            return clean_text(value)
    if isinstance(value, dict):
        return _turn_text(value) if _is_turn(value) else ""
    if isinstance(value, (list, tuple)):
        if not value:
            return ""
        if all(isinstance(v, str) for v in value):
            return clean_text(value[-1] if last else value[0])
        turns = [v for v in value if _is_turn(v)]
        matching = [t for t in turns if _role(t) in roles]
        chosen = matching or turns
        if not chosen:
            return ""
        return _turn_text(chosen[-1] if last else chosen[0])
    return clean_text(str(value))


def question_text(value: Any) -> str:
    """The question in a cell: a string, a turn, or the first user turn of a conversation."""
    return _text(value, _USER_ROLES, last=False)


def answer_text(value: Any) -> str:
    """The answer in a cell: a string, a turn, or the last assistant turn of a conversation."""
    return _text(value, _ASSISTANT_ROLES, last=True)


# ------------------------------------------------------------------------------ ratings


def completion_list(value: Any) -> list[dict[str, Any]]:
    """Completions as a list of dicts (datasets returns a Sequence of structs as a dict of lists)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        n = max((len(v) for v in lists), default=0)
        return [{k: (v[i] if isinstance(v, list) and i < len(v) else None) for k, v in value.items()} for i in range(n)]
    if isinstance(value, list):
        return [c for c in value if isinstance(c, dict)]
    return []


def aspect_rating(annotations: Any, aspect: str) -> float | None:
    """One aspect's rating as a number, or None when missing or not numeric (e.g. "N/A")."""
    if isinstance(annotations, str):
        try:
            annotations = json.loads(annotations)
        except ValueError:
            return None
    if not isinstance(annotations, dict):
        return None
    entry = annotations.get(aspect)
    raw = entry.get("Rating") if isinstance(entry, dict) else entry
    if raw is None or isinstance(raw, bool):
        return None
    try:
        number = float(str(raw).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def completion_score(completion: dict[str, Any], weights: dict[str, float]) -> float | None:
    """Weighted mean of a completion's aspect ratings; None if any weighted aspect is unusable."""
    total = 0.0
    weight_sum = 0.0
    for aspect, weight in weights.items():
        if weight == 0:
            continue
        rating = aspect_rating(completion.get("annotations"), aspect)
        if rating is None:
            return None
        total += weight * rating
        weight_sum += weight
    return total / weight_sum


def rated_pair(completions: Any, weights: dict[str, float], min_margin: float) -> tuple[str, str] | str:
    """(chosen, rejected) responses from rated completions, or the reason there is no pair."""
    items = completion_list(completions)
    if len(items) < 2:
        return TOO_FEW_COMPLETIONS
    scores = [completion_score(c, weights) for c in items]
    if any(s is None for s in scores):
        return MISSING_RATING
    best, worst = max(scores), min(scores)  # type: ignore[type-var]
    if scores.count(best) > 1 or scores.count(worst) > 1:
        return RATING_TIE
    if best - worst < min_margin:  # type: ignore[operator]
        return SMALL_MARGIN
    return (
        answer_text(items[scores.index(best)].get("response")),
        answer_text(items[scores.index(worst)].get("response")),
    )


# ------------------------------------------------------------------------------- schema


def _first_present(candidates: tuple[str, ...], columns: list[str]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def _looks_llava(value: Any) -> bool:
    if isinstance(value, str):
        value = _parse_structured(value)
    if isinstance(value, dict):
        return "from" in value or "value" in value
    if isinstance(value, list):
        return any(isinstance(v, dict) and "from" in v for v in value)
    return False


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def resolve_schema(spec: DatasetSpec, columns: list[str], first_row: dict[str, Any] | None, name: str) -> Schema:
    """Decide the schema and columns from `spec.schema`, `spec.columns` and the dataset's columns."""
    have = ", ".join(columns) or "none"
    for ours, theirs in spec.columns.items():
        if ours not in OUR_COLUMNS:
            raise DataError(f"dataset.columns.{ours}: unknown name; allowed names are {', '.join(OUR_COLUMNS)}.")
        needed = _template_fields(theirs) if ours == "image" and "{" in theirs else [theirs]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(
                f"dataset.columns.{ours} = {theirs!r}: dataset '{name}' has no column "
                f"'{missing[0]}'; its columns are {have}."
            )
    mapped = dict(spec.columns)

    def pick(ours: str, candidates: tuple[str, ...]) -> str | None:
        return mapped.get(ours) or _first_present(candidates, columns)

    chosen, rejected = pick("chosen", ("chosen",)), pick("rejected", ("rejected",))
    completions = pick("completions", ("completions",))
    kind = spec.schema
    if kind == "auto":
        if completions and not (chosen and rejected):
            kind = VLFEEDBACK
        elif chosen and rejected:
            sample = (first_row or {}).get(chosen)
            kind = LLAVA if _looks_llava(sample) or "conversations" in columns else PREFERENCE
        else:
            raise DataError(
                f"dataset '{name}' has no chosen/rejected columns (its columns are {have}); set "
                f'dataset.columns.chosen and dataset.columns.rejected, or dataset.schema = "vlfeedback" '
                f"with dataset.columns.completions for rated completions."
            )
    image = pick("image", IMAGE_COLUMNS)
    if image is None:
        raise DataError(
            f"dataset '{name}' has no image column (its columns are {have}); "
            f"set dataset.columns.image to the column holding the image or its path."
        )
    question = pick("question", QUESTION_COLUMNS)

    if kind == VLFEEDBACK:
        if completions is None:
            raise DataError(
                f"dataset '{name}' has no completions column for schema \"vlfeedback\" "
                f"(its columns are {have}); set dataset.columns.completions."
            )
        if question is None:
            raise DataError(
                f"dataset '{name}' has no prompt column (its columns are {have}); set dataset.columns.question."
            )
        weights = _aspect_weights(spec, first_row.get(completions) if first_row else None)
        return Schema(
            VLFEEDBACK,
            image,
            question=question,
            completions=completions,
            aspect_weights=weights,
            min_margin=spec.min_margin,
        )
    if not (chosen and rejected):
        raise DataError(
            f"dataset '{name}' has no chosen/rejected columns for schema \"{kind}\" (its columns are {have}); "
            f"set dataset.columns.chosen and dataset.columns.rejected."
        )
    return Schema(kind, image, question=question, chosen=chosen, rejected=rejected)


def _aspect_weights(spec: DatasetSpec, sample_completions: Any) -> dict[str, float]:
    weights = dict(spec.aspect_weights) or {a: 1.0 for a in VLFEEDBACK_ASPECTS}
    for aspect, weight in weights.items():
        if weight < 0:
            raise DataError(f"dataset.aspect_weights.{aspect} = {weight}: weights must not be negative.")
    if sum(weights.values()) <= 0:
        raise DataError("dataset.aspect_weights: at least one weight must be greater than 0.")
    items = completion_list(sample_completions)
    annotations = items[0].get("annotations") if items else None
    if isinstance(annotations, str):
        try:
            annotations = json.loads(annotations)
        except ValueError:
            annotations = None
    if isinstance(annotations, dict) and spec.aspect_weights:
        present = [a for a, v in annotations.items() if v is not None]
        for aspect in spec.aspect_weights:
            if aspect not in annotations:
                raise DataError(
                    f"dataset.aspect_weights.{aspect}: the completions rate no such aspect; "
                    f"they rate {', '.join(present)}."
                )
    return weights


def read_row(schema: Schema, row: dict[str, Any]) -> RowPair | str:
    """Reduce one row to a RowPair, or return the reason it cannot give a pair."""
    if schema.image_is_template:
        values = {k: row.get(k) for k in _template_fields(schema.image)}
        image = None if any(v is None or v == "" for v in values.values()) else schema.image.format_map(values)
    else:
        image = row.get(schema.image)
    if schema.kind == VLFEEDBACK:
        question = question_text(row.get(schema.question or ""))
        picked = rated_pair(row.get(schema.completions or ""), schema.aspect_weights, schema.min_margin)
        if isinstance(picked, str):
            return picked
        chosen, rejected = picked
    else:
        chosen_cell = row.get(schema.chosen or "")
        source = row.get(schema.question) if schema.question else chosen_cell
        question = question_text(source)
        chosen = answer_text(chosen_cell)
        rejected = answer_text(row.get(schema.rejected or ""))
    if not question:
        return EMPTY_QUESTION
    if not chosen or not rejected:
        return EMPTY_ANSWER
    if chosen.casefold() == rejected.casefold():
        return IDENTICAL_ANSWERS
    return RowPair(question, image, chosen, rejected)
