"""Scores answers: exact match, token F1, the configured judge, 95% intervals and κ.

EM and judge scores are proportions: Wilson intervals. F1 is continuous: a bootstrap interval.

One place for answer scoring, used by the worker (test and per-epoch eval answers) and by
``vqabench judge`` (re-judging stored predictions without retraining). No torch here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vqabench import metrics, stats
from vqabench.events import Evaluated
from vqabench.judges import Grade, Judge, JudgeItem, judge_items, make_judge, resolve_judge_name, score
from vqabench.judges.cache import JudgmentCache, default_cache_path
from vqabench.spec import JudgeSpec

log = logging.getLogger(__name__)


@dataclass
class ScoreSummary:
    n: int
    em: float
    f1: float
    judge: str | None = None
    judge_score: float | None = None
    judge_n: int = 0
    unparseable: int = 0
    verdicts: list[str] = field(default_factory=list)  # per judged item: correct/incorrect/unparseable
    extra: dict[str, Any] = field(default_factory=dict)  # 95% intervals and judge agreement

    def to_event(self, split: str, predictions: str | None) -> Evaluated:
        return Evaluated(
            split=split,
            n=self.n,
            em=self.em,
            f1=self.f1,
            judge=self.judge,
            judge_score=self.judge_score,
            judge_n=self.judge_n,
            unparseable=self.unparseable,
            predictions=predictions,
            extra=self.extra,
        )


def _interval(values: list[float]) -> list[float] | None:
    """95% bootstrap interval of a continuous per-item score (F1)."""
    if len(values) < 2:
        return None
    _, low, high = stats.bootstrap_ci(values, n_resamples=2000, seed=0, level=0.95)
    return None if low is None or high is None else [low, high]


def _proportion_interval(values: list[float]) -> list[float] | None:
    """95% Wilson interval of a binary per-item score (EM, a CORRECT verdict)."""
    if not values:
        return None
    interval = stats.wilson_interval(int(sum(values)), len(values))
    return [interval.low, interval.high] if interval.low is not None and interval.high is not None else None


@contextmanager
def judge_with_cache(judge_spec: JudgeSpec, cache_dir: Path) -> Iterator[tuple[Judge, JudgmentCache | None]]:
    """The judge a spec names and, where it uses one, the judgment cache in `cache_dir`, closed after."""
    judge = make_judge(judge_spec)
    cache = JudgmentCache(default_cache_path(cache_dir)) if judge.uses_cache else None
    try:
        yield judge, cache
    finally:
        if cache is not None:
            cache.close()


def score_items(
    items: Sequence[JudgeItem],
    judge_spec: JudgeSpec | None,
    cache_dir: Path,
    progress: Callable[[int, int], None] | None = None,
    with_intervals: bool = True,
) -> ScoreSummary:
    """EM and F1 on every item; the judge (None: none) on the first `judge_spec.limit` (all by default)."""
    ems = [metrics.exact_match(i.prediction, i.reference) for i in items]
    f1s = [metrics.token_f1(i.prediction, i.reference) for i in items]
    n = len(items)
    summary = ScoreSummary(n=n, em=sum(ems) / n if n else 0.0, f1=sum(f1s) / n if n else 0.0)
    if with_intervals and n:
        summary.extra["em_ci"] = _proportion_interval(ems)
        summary.extra["f1_ci"] = _interval(f1s)
    if judge_spec is None:
        return summary
    limit = n if judge_spec.limit is None else min(judge_spec.limit, n)
    with judge_with_cache(judge_spec, cache_dir) as (judge, cache):
        verdicts = judge_items(judge, list(items[:limit]), cache, on_progress=progress)
        described = judge.describe()
    js = score(verdicts)
    summary.judge = resolve_judge_name(judge_spec.name)
    summary.judge_score, summary.judge_n, summary.unparseable = js.score, js.n, js.unparseable
    summary.verdicts = [v.grade.value for v in verdicts]
    if with_intervals and n:
        graded = [
            (1 if v.grade is Grade.CORRECT else 0, int(ems[i]))
            for i, v in enumerate(verdicts)
            if v.grade is not Grade.UNPARSEABLE
        ]
        if graded:
            summary.extra["judge_ci"] = _proportion_interval([float(g) for g, _ in graded])
            summary.extra["judge_kappa"] = stats.cohen_kappa([g for g, _ in graded], [e for _, e in graded])
        summary.extra["judge_describe"] = described
    return summary
