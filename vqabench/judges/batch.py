"""Judging many answers: through the cache with progress, or a whole JSONL file at once.

`judge_file` backs ``vqabench judge FILE.jsonl --judge NAME``: each input line is
``{"question": ..., "reference": ..., "prediction": ...}`` (other keys are kept) and each
output line is the input plus the verdict, the judge's reply and the judge's identity.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from vqabench.judges.base import Judge, JudgeItem, JudgeSummary, Verdict, score
from vqabench.judges.cache import CachedJudge, JudgmentCache

#: Called with (answers judged so far, answers to judge); cached answers count at once.
ProgressCallback = Callable[[int, int], None]
ITEM_KEYS = ("question", "reference", "prediction")


class JudgeInputError(ValueError):
    """A judge input file that cannot be read; the message names the file, line and key."""


def judge_items(
    judge: Judge,
    items: Sequence[JudgeItem],
    cache: JudgmentCache | None = None,
    on_progress: ProgressCallback | None = None,
) -> list[Verdict]:
    """Grade `items` in order, answering from `cache` where it can and filling it as it goes."""
    if cache is not None and judge.uses_cache and not isinstance(judge, CachedJudge):
        judge = CachedJudge(judge, cache)
    total = len(items)
    done = 0

    def count(_index: int, _verdict: Verdict) -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total)

    if on_progress is not None:
        on_progress(0, total)
    return judge.grade(items, on_verdict=count)


def read_items(path: str | os.PathLike[str]) -> tuple[list[JudgeItem], list[dict]]:
    """The items of a judge input JSONL file, and each line's object as read."""
    path = Path(path)
    items: list[JudgeItem] = []
    rows: list[dict] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise JudgeInputError(f"{path}: cannot be read ({exc.strerror or exc}).") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JudgeInputError(
                f"{path} line {number}: not valid JSON ({exc.msg}); each line must be one JSON object."
            ) from exc
        if not isinstance(row, dict):
            raise JudgeInputError(
                f"{path} line {number}: a {type(row).__name__} where a JSON object with keys question, "
                f"reference and prediction is needed."
            )
        for key in ITEM_KEYS:
            if not isinstance(row.get(key), str):
                problem = "is missing" if key not in row else f"has value {row[key]!r}"
                raise JudgeInputError(
                    f"{path} line {number}: key '{key}' {problem}; question, reference and prediction must be strings."
                )
        rows.append(row)
        items.append(JudgeItem(row["question"], row["reference"], row["prediction"]))
    return items, rows


def judge_file(
    path_in: str | os.PathLike[str],
    judge: Judge,
    out_path: str | os.PathLike[str],
    cache: JudgmentCache | None = None,
    on_progress: ProgressCallback | None = None,
) -> JudgeSummary:
    """Judge every line of a JSONL file, write the verdicts as JSONL and return the score."""
    items, rows = read_items(path_in)
    verdicts = judge_items(judge, items, cache=cache, on_progress=on_progress)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        for row, verdict in zip(rows, verdicts, strict=True):
            record = dict(row)
            record.update(verdict.to_dict())
            record.update(judge=judge.name, judge_model=judge.model, prompt_version=judge.prompt_version)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    partial.replace(out_path)
    return score(verdicts)


def cached_compare(judge: Judge, cache: JudgmentCache | None) -> Callable[[str, str, str, str], str]:
    """`judge.compare`, answered from and stored in `cache` when the judge uses one."""
    if cache is None or not judge.uses_cache or isinstance(judge, CachedJudge):
        return judge.compare
    return CachedJudge(judge, cache).compare
