"""Answer metrics with SQuAD's normalisation: exact match and token F1 (pure Python, no torch).

Follows the official SQuAD v1.1 evaluation script for normalisation and F1, and SQuAD v2.0
for empty answers (both empty scores 1, one empty scores 0).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised answers are identical, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over the normalised answers' bags of tokens."""
    predicted_tokens = normalize_answer(prediction).split()
    reference_tokens = normalize_answer(reference).split()
    if not predicted_tokens or not reference_tokens:
        return float(predicted_tokens == reference_tokens)
    shared = sum((Counter(predicted_tokens) & Counter(reference_tokens)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(predicted_tokens)
    recall = shared / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def mean_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> tuple[float, float]:
    """Mean exact match and mean token F1; a reference may be a list of acceptable answers.

    With several acceptable answers each prediction scores its best match, as SQuAD does.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"mean_scores got {len(predictions)} predictions for "
            f"{len(references)} references; they must pair up one to one."
        )
    if not predictions:
        raise ValueError("mean_scores needs at least one prediction; got none.")
    em_total = 0.0
    f1_total = 0.0
    for prediction, reference in zip(predictions, references, strict=True):
        answers = [reference] if isinstance(reference, str) else list(reference)
        if not answers:
            raise ValueError(
                f"mean_scores got an empty list of reference answers for "
                f"prediction {prediction!r}; give at least one answer."
            )
        em_total += max(exact_match(prediction, answer) for answer in answers)
        f1_total += max(token_f1(prediction, answer) for answer in answers)
    return em_total / len(predictions), f1_total / len(predictions)
