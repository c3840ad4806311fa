"""Scores a run's answers: exact match, token F1, the configured judge, and their intervals."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vqabench import metrics, stats
from vqabench.engine.data.records import PreferencePair
from vqabench.judges import Grade, JudgeItem, judge_items, make_judge, resolve_judge_name, score
from vqabench.judges.cache import JudgmentCache, default_cache_path
from vqabench.spec import RunSpec

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


def _interval(values: list[float]) -> list[float] | None:
    if len(values) < 2:
        return None
    _, low, high = stats.bootstrap_ci(values, n_resamples=2000, seed=0, level=0.95)
    return [low, high]


def score_answers(spec: RunSpec, cache_dir: Path, pairs: list[PreferencePair], answers: list[str],
                  progress: Callable[[int, int], None] | None, with_intervals: bool) -> ScoreSummary:
    """EM and F1 on every answer, the judge on the first `judge.limit` (all by default)."""
    refs = [p.chosen for p in pairs]
    ems = [metrics.exact_match(a, r) for a, r in zip(answers, refs)]
    f1s = [metrics.token_f1(a, r) for a, r in zip(answers, refs)]
    n = len(answers)
    summary = ScoreSummary(n=n, em=sum(ems) / n if n else 0.0, f1=sum(f1s) / n if n else 0.0)
    judge = make_judge(spec.judge)
    limit = n if spec.judge.limit is None else min(spec.judge.limit, n)
    items = [JudgeItem(p.question, p.chosen, a) for p, a in zip(pairs[:limit], answers[:limit])]
    cache = JudgmentCache(default_cache_path(cache_dir)) if judge.uses_cache else None
    verdicts = judge_items(judge, items, cache, on_progress=progress)
    js = score(verdicts)
    summary.judge = f"{resolve_judge_name(spec.judge.name)}"
    summary.judge_score, summary.judge_n, summary.unparseable = js.score, js.n, js.unparseable
    summary.verdicts = [v.grade.value for v in verdicts]
    if with_intervals and n:
        summary.extra["em_ci"] = _interval(ems)
        summary.extra["f1_ci"] = _interval(f1s)
        graded = [(1.0 if v.grade is Grade.CORRECT else 0.0, ems[i]) for i, v in enumerate(verdicts)
                  if v.grade is not Grade.UNPARSEABLE]
        if graded:
            summary.extra["judge_ci"] = _interval([g for g, _ in graded])
            summary.extra["judge_kappa"] = stats.cohen_kappa([int(g) for g, _ in graded],
                                                             [int(e) for _, e in graded])
        summary.extra["judge_describe"] = judge.describe()
    return summary
