"""Judging answers after the fact: a JSONL file of answers, or a stored run's predictions.

The study behind vqabench ran out of API quota after 100 answers; a user with new credits
re-judges old runs here without retraining. Judgments go through the same cache, so only
answers never judged before cost a request.
"""
from __future__ import annotations

import json
from pathlib import Path

from vqabench.events import Evaluated
from vqabench.judges import JudgeInputError, JudgeItem, judge_file, make_judge, read_items
from vqabench.judges.cache import JudgmentCache, default_cache_path
from vqabench.scoring import score_items
from vqabench.spec import JudgeSpec, default_cache_dir
from vqabench.store import ResultsStore, RunRecord, StoreError


def judge_answers_file(path: Path, judge_spec: JudgeSpec, out_path: Path, cache_dir: Path | None = None) -> str:
    """Judge `{"question","reference","prediction"}` lines; write verdicts; a one-line summary."""
    if not path.is_file():
        raise JudgeInputError(f"the answers file {path} does not exist.")
    judge = make_judge(judge_spec)
    cache = JudgmentCache(default_cache_path(cache_dir or default_cache_dir())) if judge.uses_cache else None
    summary = judge_file(path, judge, out_path, cache=cache)
    return f"{judge.describe()}: {summary.describe()}; verdicts written to {out_path}."


def find_run(store: ResultsStore, run_id: int) -> RunRecord:
    for session in store.list_sessions():
        for run in store.runs(session.id):
            if run.id == run_id:
                return run
    raise StoreError(f"the results store {store.path} has no run {run_id}; 'vqabench export' lists runs by session.")


def rejudge_run(store: ResultsStore, run_id: int, judge_spec: JudgeSpec,
                cache_dir: Path | None = None) -> Evaluated:
    """Judge a stored run's test predictions again and record the new score as its latest eval."""
    run = find_run(store, run_id)
    tests = [e for e in store.evals(run.id) if e.split == "test" and e.predictions]
    if not tests:
        raise StoreError(f"run {run_id} ({run.name}) has no stored test predictions to judge; it did not finish.")
    path = Path(tests[-1].predictions)
    items, _ = read_items(path)
    summary = score_items([JudgeItem(i.question, i.reference, i.prediction) for i in items], judge_spec,
                          cache_dir or default_cache_dir())
    verdicts = path.with_name(f"{path.stem}.{summary.judge}.jsonl")
    with verdicts.open("w", encoding="utf-8") as fh:
        for item, verdict in zip(items, summary.verdicts):
            fh.write(json.dumps({"question": item.question, "reference": item.reference,
                                 "prediction": item.prediction, "verdict": verdict}) + "\n")
    event = summary.to_event("test", str(path))
    store.add_eval(run.id, event)
    return event
