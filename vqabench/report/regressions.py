"""The Regressions table: this session against a baseline session, figure by figure, for the CI gate.

Both sides are JSON reports (:mod:`~vqabench.report.json`): each run there carries its `measurements`
(:func:`run_measurements`): the per-question exact match and judge verdict, the steady epochs' seconds
and mean step times, and the peak memory. Runs are matched by name. A figure fails the gate only when
its regression is statistically real and beyond the limit `--fail-on` sets (:func:`parse_fail_on`):

* em, judge: the exact McNemar test on the same questions (p < 0.05) and a drop beyond the limit;
* epoch_time, step_time: the ratio after/before with its 95% t-interval over both runs' epochs
  (:func:`vqabench.stats.ratio_ci`, as the efficiency table's ratio to SFT), failing when the whole
  interval lies above 1 + the limit;
* peak_memory: the ratio after/before beyond 1 + the limit (memory hardly varies between runs).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import mean
from typing import Any

from vqabench.report.model import Cell, ReportTable, figure, p_cell, word
from vqabench.report.runs import RunData, peak_memory, read_predictions, run_timing

#: A regression of a score (em, judge) fails only below this p-value of the McNemar test.
ALPHA = 0.05
SCORE_FIGURES = ("em", "judge")
TIME_FIGURES = ("epoch_time", "step_time")
MEMORY_FIGURES = ("peak_memory",)
FIGURES = (*SCORE_FIGURES, *TIME_FIGURES, *MEMORY_FIGURES)
DEFAULT_FAIL_ON = "em:-0.02, judge:-0.02, epoch_time:+10%, peak_memory:+10%"
FAIL_ON_GRAMMAR = (
    "write FIGURE:LIMIT terms separated by commas, em:-0.02 or judge:-0.02 (a drop of the score, as a "
    "fraction) and epoch_time:+10%, step_time:+10% or peak_memory:+10% (an increase, in percent), "
    f'e.g. "{DEFAULT_FAIL_ON}"'
)

REGRESSION, WITHIN_NOISE, OK = "regression", "within noise", "ok"
_SCORE = re.compile(r"^(-?\d+(?:\.\d*)?|-?\.\d+)$")
_PERCENT = re.compile(r"^\+?(\d+(?:\.\d*)?|\.\d+)%$")


class FailOnError(ValueError):
    """A --fail-on expression that does not parse: its message is one sentence."""


def parse_fail_on(text: str) -> dict[str, float]:
    """The limits of a --fail-on expression: figure -> a score's drop (a fraction, at most 0) or a time's or
    memory's relative increase (0.10 for +10%). Raises FailOnError naming the bad term and the grammar."""
    limits: dict[str, float] = {}
    terms = [t.strip() for t in text.split(",")]
    for term in terms:
        name, sep, value = (part.strip() for part in term.partition(":"))
        name = name.lower()
        number = None
        if sep and name in SCORE_FIGURES and _SCORE.match(value):
            number = float(value)
            number = number if number <= 0 else None
        elif sep and name in (*TIME_FIGURES, *MEMORY_FIGURES) and (match := _PERCENT.match(value)):
            number = float(match.group(1)) / 100.0
        if number is None or name in limits:
            why = "names a figure twice" if name in limits else "does not parse"
            raise FailOnError(f"--fail-on: the term {term!r} {why}; {FAIL_ON_GRAMMAR}.")
        limits[name] = number
    return limits


def question_key(row: dict[str, Any]) -> str:
    """A short fingerprint of a test question and its reference, to pair two runs' answers."""
    text = json.dumps([row.get("question"), row.get("reference")], ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def run_measurements(run: RunData) -> dict[str, Any]:
    """What the gate compares of a run, for the JSON report: per test question (in order) its key, exact
    match (0/1) and judge verdict (1 correct, 0 incorrect, null not graded); the steady epochs' seconds
    and mean step times in ms; the peak memory in MiB and its source (CUDA or RSS)."""
    rows = read_predictions(run) or []
    timing = run_timing(run)
    peak, source = peak_memory(run.epochs)
    verdicts = {"correct": 1, "incorrect": 0}
    return {
        "questions": [question_key(r) for r in rows],
        "em": [int(float(r.get("em") or 0) >= 0.5) for r in rows],
        "judge": [verdicts.get(str(r.get("verdict"))) for r in rows],
        "epoch_seconds": list(timing.steady_seconds),
        "step_ms": [mean(unit) for unit in timing.step_ms if unit],
        "peak_memory_mib": peak,
        "memory_source": source,
    }


@dataclass
class Comparison:
    """One figure of one run, before (the baseline) and after (this session), and the gate's verdict."""

    run: str
    figure: str
    before: float
    after: float
    change: float  # a score's difference after - before, or a time's or memory's ratio after / before
    low: float | None
    high: float | None
    p_value: float | None
    limit: float
    verdict: str
    n: int = 0  # paired questions, or epochs after + before

    @property
    def failed(self) -> bool:
        return self.verdict == REGRESSION


@dataclass
class GateResult:
    """The comparisons, the table that shows them, and the runs only one side has."""

    comparisons: list[Comparison]
    table: ReportTable
    only_baseline: list[str] = field(default_factory=list)
    only_current: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.failed]

    @property
    def failed(self) -> bool:
        return bool(self.regressions)


def _occurrences(keys: Sequence[str]) -> list[tuple[str, int]]:
    """Keys made unique by their occurrence (a question asked twice pairs first with first)."""
    seen: dict[str, int] = {}
    out = []
    for key in keys:
        seen[key] = seen.get(key, 0) + 1
        out.append((key, seen[key]))
    return out


def _paired(before: dict[str, Any], after: dict[str, Any], figure_name: str) -> tuple[list[int], list[int]]:
    """The two runs' 0/1 scores on the questions both have (and both graded, for the judge)."""
    b_index = {k: i for i, k in enumerate(_occurrences(before.get("questions") or []))}
    b_scores, a_scores = before.get(figure_name) or [], after.get(figure_name) or []
    pairs_b, pairs_a = [], []
    for i, key in enumerate(_occurrences(after.get("questions") or [])):
        j = b_index.get(key)
        if j is None or i >= len(a_scores) or j >= len(b_scores):
            continue
        if a_scores[i] in (0, 1) and b_scores[j] in (0, 1):
            pairs_b.append(int(b_scores[j]))
            pairs_a.append(int(a_scores[i]))
    return pairs_b, pairs_a


def compare_score(run: str, name: str, before: dict, after: dict, limit: float) -> Comparison | None:
    """em or judge: McNemar on the paired questions; a regression when p < ALPHA and the drop is beyond `limit`."""
    from vqabench.stats import mcnemar_exact, paired_bootstrap

    b, a = _paired(before, after, name)
    if not a:
        return None
    diff = paired_bootstrap(a, b)
    test = mcnemar_exact(a, b)
    worse = diff.mean_diff < limit
    if worse and test.p_value is not None and test.p_value < ALPHA:
        verdict = REGRESSION
    elif worse:
        verdict = WITHIN_NOISE
    else:
        verdict = OK
    return Comparison(
        run, name, mean(b), mean(a), diff.mean_diff, diff.low, diff.high, test.p_value, limit, verdict, len(a)
    )


def compare_time(run: str, name: str, before: dict, after: dict, limit: float) -> Comparison | None:
    """epoch_time or step_time: the ratio after/before with its 95% t-interval over both runs' epochs; a
    regression when the whole interval lies above 1 + `limit`."""
    from vqabench.stats import ratio_ci

    key = "epoch_seconds" if name == "epoch_time" else "step_ms"
    b = [float(v) for v in before.get(key) or [] if isinstance(v, (int, float)) and v > 0]
    a = [float(v) for v in after.get(key) or [] if isinstance(v, (int, float)) and v > 0]
    if not a or not b:
        return None
    ratio = ratio_ci([[v] for v in a], [[v] for v in b])
    if ratio.low is not None and ratio.low > 1.0 + limit:
        verdict = REGRESSION
    elif ratio.mean > 1.0 + limit:
        verdict = WITHIN_NOISE
    else:
        verdict = OK
    return Comparison(
        run, name, mean(b), mean(a), ratio.mean, ratio.low, ratio.high, None, limit, verdict, len(a) + len(b)
    )


def compare_memory(run: str, before: dict, after: dict, limit: float) -> Comparison | None:
    """peak_memory: a regression when after/before exceeds 1 + `limit` (same source, CUDA or RSS, on both)."""
    b, a = before.get("peak_memory_mib"), after.get("peak_memory_mib")
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b <= 0:
        return None
    if before.get("memory_source") != after.get("memory_source"):
        return None
    ratio = a / b
    verdict = REGRESSION if ratio > 1.0 + limit else OK
    return Comparison(run, "peak_memory", float(b), float(a), ratio, None, None, None, limit, verdict)


def compare_reports(baseline: dict[str, Any], current: dict[str, Any], limits: dict[str, float]) -> GateResult:
    """This session (`current`, a JSON report) against `baseline` (another), for the figures `limits` names."""
    before = {r["name"]: r for r in baseline.get("runs") or [] if isinstance(r, dict) and "name" in r}
    after = {r["name"]: r for r in current.get("runs") or [] if isinstance(r, dict) and "name" in r}
    comparisons: list[Comparison] = []
    shared = [name for name in after if name in before]
    for name in shared:
        b, a = before[name].get("measurements") or {}, after[name].get("measurements") or {}
        for figure_name in FIGURES:
            if figure_name not in limits:
                continue
            limit = limits[figure_name]
            if figure_name in SCORE_FIGURES:
                found = compare_score(name, figure_name, b, a, limit)
            elif figure_name in TIME_FIGURES:
                found = compare_time(name, figure_name, b, a, limit)
            else:
                found = compare_memory(name, b, a, limit)
            if found is not None:
                comparisons.append(found)
    only_baseline = [n for n in before if n not in after]
    only_current = [n for n in after if n not in before]
    return GateResult(
        comparisons,
        regressions_table(comparisons, shared, only_baseline, only_current, limits),
        only_baseline,
        only_current,
    )


def methods_sentence(shared: Sequence[str], only_baseline: Sequence[str], only_current: Sequence[str]) -> str:
    """One sentence: which runs both sessions have, and which only one has."""
    text = f"Compared the {len(shared)} run(s) both sessions have ({', '.join(shared) or 'none'})"
    if only_baseline:
        text += f"; only in the baseline: {', '.join(only_baseline)}"
    if only_current:
        text += f"; only in this session: {', '.join(only_current)}"
    return text + "."


def _value_cell(c: Comparison, value: float) -> Cell:
    if c.figure in SCORE_FIGURES:
        return figure(value, 3, "fraction")
    if c.figure == "epoch_time":
        return figure(value, 2, "s")
    if c.figure == "step_time":
        return figure(value, 1, "ms")
    return figure(value, 1, "MiB")


def _limit_text(c: Comparison) -> str:
    return f"{c.limit:+.3f}" if c.figure in SCORE_FIGURES else f"+{c.limit:.0%}"


def regressions_table(
    comparisons: Sequence[Comparison],
    shared: Sequence[str],
    only_baseline: Sequence[str],
    only_current: Sequence[str],
    limits: dict[str, float],
) -> ReportTable:
    """Run, figure, before, after, change with its 95% interval, p, the limit and the verdict."""
    rows: list[list[Cell]] = []
    for c in comparisons:
        interval = [c.low, c.high] if c.low is not None and c.high is not None else None
        if c.figure in SCORE_FIGURES:
            change = figure(c.change, 3, "fraction", interval=interval, signed=True)
            p = p_cell(c.p_value)
        else:
            change = figure(c.change, 2, "×", interval=interval)
            p = word(None)
        limit = word(_limit_text(c))
        rows.append(
            [
                word(c.run),
                word(c.figure),
                _value_cell(c, c.before),
                _value_cell(c, c.after),
                change,
                p,
                limit,
                word(c.verdict),
            ]
        )
    notes = [
        methods_sentence(shared, only_baseline, only_current),
        "Before: the baseline session; after: this one. em, judge: the share of the questions both runs answered "
        "(judge: both graded), the change after − before with a 95% paired bootstrap interval, and p of the exact "
        f"McNemar test on the questions only one run got right; a regression when p < {ALPHA} and the drop is "
        "beyond the limit (fewer than 30 questions: too few items, never a regression).",
        "epoch_time (s), step_time (mean per step, ms): the mean over the steady epochs, and the ratio after / "
        "before with a 95% Student-t interval over both runs' epochs (as Relative to SFT); a regression when the "
        "whole interval lies above 1 + the limit (fewer than 2 epochs each: no interval, never a regression). "
        "peak_memory (MiB): a regression when after / before exceeds 1 + the limit.",
        "within noise: worse than the limit, but not beyond chance; it does not fail the gate. Limits: "
        + ", ".join(f"{k}:{v:+.3f}" if k in SCORE_FIGURES else f"{k}:+{v:.0%}" for k, v in limits.items())
        + ".",
    ]
    columns = ["Run", "Figure", "Before", "After", "Change [95% CI]", "p", "Limit", "Verdict"]
    return ReportTable("Regressions", columns, ["left", "left"] + ["right"] * 5 + ["left"], rows, notes, "regressions")
