"""Judging a run's answers, and the predictions file its test answers are written to."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vqabench import metrics
from vqabench.engine.progress import Throttled
from vqabench.judges import JudgeError, JudgeItem
from vqabench.scoring import ScoreSummary, score_items
from vqabench.spec import RunSpec

log = logging.getLogger(__name__)


def score_answers(
    spec: RunSpec, pairs: list, answers: list[str], cache_dir: Path, predictions: Path, progress: Throttled
) -> ScoreSummary:
    """Score test answers with the run's judge and write them, one JSON line per question, to `predictions`.

    A judge failure keeps EM and F1 (the answers can be judged later with `vqabench judge --run ID`).
    """
    items = judge_items_of(pairs, answers)
    try:
        summary = score_items(items, spec.judge, cache_dir, progress=progress.reporter("judge", "judging test answers"))
    except JudgeError as exc:
        # Training and answers are sound: keep them (and the runs that start from this one).
        log.error("judging the test answers failed: %s", exc)
        summary = score_items(items, None, cache_dir)
        summary.extra["judge_error"] = str(exc)
    with predictions.open("w") as fh:
        for i, (pair, answer) in enumerate(zip(pairs, answers, strict=True)):
            row = {
                "image_id": pair.image_id,
                "question": pair.question,
                "reference": pair.chosen,
                "prediction": answer,
                "em": metrics.exact_match(answer, pair.chosen),
                "f1": metrics.token_f1(answer, pair.chosen),
            }
            if i < len(summary.verdicts):
                row["verdict"] = summary.verdicts[i]
            fh.write(json.dumps(row) + "\n")
    return summary


def score_eval_answers(spec: RunSpec, pairs: list, answers: list[str], cache_dir: Path, epoch: int) -> ScoreSummary:
    """Score an epoch's eval answers, without intervals; a judge failure keeps EM and F1."""
    items = judge_items_of(pairs, answers)
    try:
        return score_items(items, spec.judge, cache_dir, with_intervals=False)
    except JudgeError as exc:
        log.error("judging epoch %d's eval answers failed: %s", epoch, exc)
        return score_items(items, None, cache_dir, with_intervals=False)


def judge_items_of(pairs: list, answers: list[str]) -> list[JudgeItem]:
    return [JudgeItem(p.question, p.chosen, a) for p, a in zip(pairs, answers, strict=True)]
