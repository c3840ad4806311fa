"""Exact match and token F1 with SQuAD normalisation, on SQuAD's classic examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vqabench.metrics import exact_match, mean_scores, normalize_answer, token_f1

# SQuAD v1.1 dev, "Super Bowl 50": where did it take place? (three annotators' answers)
SUPER_BOWL_ANSWERS = [
    "Santa Clara, California",
    "Levi's Stadium",
    "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California.",
]


@pytest.mark.parametrize(
    "raw,normalized",
    [
        ("The Denver Broncos", "denver broncos"),
        ("  A   quick,\tbrown fox. ", "quick brown fox"),
        ("Levi's Stadium.", "levis stadium"),
        ("an apple a day", "apple day"),
        ("theatre anthem", "theatre anthem"),  # articles only as whole words
        ("", ""),
    ],
)
def test_normalize_answer_follows_squad(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_exact_match_ignores_case_punctuation_and_articles():
    assert exact_match("the Denver Broncos!", "Denver Broncos") == 1.0
    assert exact_match("Broncos", "Denver Broncos") == 0.0
    assert exact_match("yes", "Yes.") == 1.0


def test_token_f1_on_squad_examples():
    # "levis stadium" against 11 normalised tokens: precision 1, recall 2/11 -> F1 4/13
    assert token_f1("Levi's Stadium", SUPER_BOWL_ANSWERS[2]) == pytest.approx(4 / 13)
    # "denver broncos" vs "broncos": precision 1/2, recall 1 -> 2/3
    assert token_f1("the Denver Broncos", "Broncos") == pytest.approx(2 / 3)
    assert token_f1("Santa Clara", "Santa Clara, California") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert token_f1("Carolina Panthers", "Denver Broncos") == 0.0


def test_token_f1_counts_repeated_tokens_once_per_match():
    # bags: pred {blue: 2}, ref {blue: 1, circle: 1}: one shared -> precision 1/2, recall 1/2
    assert token_f1("blue blue", "blue circle") == pytest.approx(0.5)


def test_token_f1_on_empty_answers():
    assert token_f1("", "") == 1.0
    assert token_f1("the", "a") == 1.0  # both normalise to nothing
    assert token_f1("", "red") == 0.0
    assert token_f1("red", "") == 0.0


def test_mean_scores_takes_the_best_reference_and_averages():
    em, f1 = mean_scores(["Levi's Stadium", "circle", "no"], [SUPER_BOWL_ANSWERS, "a circle", "yes"])
    assert em == pytest.approx(2 / 3)
    assert f1 == pytest.approx(2 / 3)
    em, f1 = mean_scores(["Santa Clara"], [SUPER_BOWL_ANSWERS])
    assert em == 0.0
    assert f1 == pytest.approx(0.8)


def test_mean_scores_rejects_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        mean_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one prediction"):
        mean_scores([], [])
    with pytest.raises(ValueError, match="empty list of reference answers"):
        mean_scores(["red"], [[]])


def test_metrics_module_does_not_import_torch():
    code = "import sys, vqabench.metrics; sys.exit('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
