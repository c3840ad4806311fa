"""Judging answers after the fact: a JSONL file, a stored run's predictions, two runs head to head.

The study behind vqabench ran out of API quota after 100 answers; a user with new credits
re-judges old runs here without retraining. Judgments go through the same cache, so only
answers never judged before cost a request.
"""

from __future__ import annotations

import json
from pathlib import Path

from vqabench import stats
from vqabench.events import Evaluated
from vqabench.judges import JudgeInputError, JudgeItem, cached_compare, judge_file, read_items
from vqabench.report import encoder_cache_text
from vqabench.scoring import judge_with_cache, score_items
from vqabench.spec import JudgeSpec, default_cache_dir
from vqabench.store import ResultsStore, RunRecord, StoreError


def judge_answers_file(path: Path, judge_spec: JudgeSpec, out_path: Path, cache_dir: Path | None = None) -> str:
    """Judge `{"question","reference","prediction"}` lines; write verdicts; a one-line summary."""
    if not path.is_file():
        raise JudgeInputError(f"the answers file {path} does not exist.")
    with judge_with_cache(judge_spec, cache_dir or default_cache_dir()) as (judge, cache):
        summary = judge_file(path, judge, out_path, cache=cache)
        return f"{judge.describe()}: {summary.describe()}; verdicts written to {out_path}."


def find_run(store: ResultsStore, run_id: int) -> RunRecord:
    for session in store.list_sessions():
        for run in store.runs(session.id):
            if run.id == run_id:
                return run
    raise StoreError(f"the results store {store.path} has no run {run_id}; 'vqabench export' lists runs by session.")


def _test_predictions(store: ResultsStore, run: RunRecord) -> Path:
    paths = [e.predictions for e in store.evals(run.id) if e.split == "test" and e.predictions]
    if not paths:
        raise StoreError(f"run {run.id} ({run.name}) has no stored test predictions to judge; it did not finish.")
    return Path(paths[-1])  # the store finds it in its own folder first (ResultsStore.run_file)


def compare_runs(
    store: ResultsStore, run_a: int, run_b: int, judge_spec: JudgeSpec, cache_dir: Path | None = None
) -> str:
    """Win rate of run A's test answers against run B's, each pair asked in both orders."""
    a, b = find_run(store, run_a), find_run(store, run_b)
    items_a, _ = read_items(_test_predictions(store, a))
    items_b, _ = read_items(_test_predictions(store, b))
    if [(i.question, i.reference) for i in items_a] != [(i.question, i.reference) for i in items_b]:
        raise StoreError(f"runs {run_a} and {run_b} answered different test questions; compare runs on the same data.")
    if judge_spec.limit is not None:
        items_a, items_b = items_a[: judge_spec.limit], items_b[: judge_spec.limit]
    with judge_with_cache(judge_spec, cache_dir or default_cache_dir()) as (judge, cache):
        result = stats.win_rate(cached_compare(judge, cache), items_a, items_b)
    bias = "n/a" if result.first_position_rate is None else f"{result.first_position_rate:.2f}"
    caches = {run.name: encoder_cache_text(run.started) for run in (a, b)}
    warning = ""
    if len({text == "off" for text in caches.values() if text is not None}) == 2:
        warning = (
            f"\nWarning: {a.name} ran with encoder cache {caches[a.name]} and {b.name} with {caches[b.name]}; "
            f"their answers compare, their times do not."
        )
    return (
        f"{a.name} (run {a.id}) vs {b.name} (run {b.id}), {judge.describe()}, {result.n} questions asked "
        f"in both orders: {a.name} wins {result.a_wins} ({result.a_rate:.1%}), {b.name} wins {result.b_wins} "
        f"({result.b_rate:.1%}), ties {result.ties} ({result.unparseable} with an unparseable reply); "
        f"score {result.a_score:.3f} for {a.name} (0.5 = even); the judge picked the first-shown answer "
        f"in {bias} of its decisive replies."
    ) + warning


def rejudge_run(store: ResultsStore, run_id: int, judge_spec: JudgeSpec, cache_dir: Path | None = None) -> Evaluated:
    """Judge a stored run's test predictions again and record the new score as its latest eval."""
    run = find_run(store, run_id)
    path = _test_predictions(store, run)
    items, _ = read_items(path)
    summary = score_items(
        [JudgeItem(i.question, i.reference, i.prediction) for i in items], judge_spec, cache_dir or default_cache_dir()
    )
    verdicts = path.with_name(f"{path.stem}.{summary.judge}.jsonl")
    with verdicts.open("w", encoding="utf-8") as fh:
        for item, verdict in zip(items, summary.verdicts, strict=False):
            fh.write(
                json.dumps(
                    {
                        "question": item.question,
                        "reference": item.reference,
                        "prediction": item.prediction,
                        "verdict": verdict,
                    }
                )
                + "\n"
            )
    event = summary.to_event("test", str(path))
    store.add_eval(run.id, event)
    return event
