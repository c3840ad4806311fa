"""The report's encoder-cache accounting: who pays the encoding pass, the column, the mixed-setting warning."""

from __future__ import annotations

import pytest
from fake_worker import canned_events

from vqabench.events import EpochEnded, Evaluated, RunFinished, RunStarted
from vqabench.report import RunData, efficiency_table, mixed_encoder_cache_warning, summarize_runs
from vqabench.spec import RunSpec

BUILT = {"on": True, "built": True, "seconds": 12.5, "path": "/c/arrays/encoder/k", "bytes": 1, "dtype": "fp32"}
REUSED = {**BUILT, "built": False, "seconds": 0.0}


def run(spec: RunSpec, cache: dict | None) -> RunData:
    events = list(canned_events(spec.to_dict()))
    started = next(e for e in events if isinstance(e, RunStarted))
    if cache is not None:
        started.data["encoder_cache"] = cache
    return RunData(
        spec.name,
        spec.method,
        "done",
        after=spec.after,
        started=started,
        finished=next(e for e in events if isinstance(e, RunFinished)),
        epochs=[e for e in events if isinstance(e, EpochEnded)],
        final_eval=next(e for e in events if isinstance(e, Evaluated)),
        setup="embedded on easyvqa",
    )


def test_every_route_is_charged_the_encoding_pass_it_needs_once_whoever_built_it():
    sft = run(RunSpec(name="sft", method="sft"), BUILT)
    dpo = run(RunSpec(name="dpo", method="dpo", after="sft"), REUSED)
    orpo = run(RunSpec(name="orpo", method="orpo"), REUSED)
    plain = {s.name: s for s in summarize_runs([run(RunSpec(name="sft", method="sft"), {"on": False})])}
    summaries = {s.name: s for s in summarize_runs([sft, dpo, orpo])}
    assert summaries["sft"].aligned_seconds == plain["sft"].aligned_seconds + 12.5
    # SFT + DPO read one entry: the pass is charged once on that route
    assert summaries["dpo"].aligned_seconds == summaries["sft"].aligned_seconds + dpo.finished.train_seconds
    assert summaries["dpo"].stage_seconds == dpo.finished.train_seconds
    assert summaries["orpo"].aligned_seconds == orpo.finished.train_seconds + 12.5  # reused, yet charged
    table = efficiency_table(list(summaries.values()))
    assert table.columns[-1] == "Encoder cache"
    assert [row[-1] for row in table.rows] == ["built in 12.50 s", "reused", "reused"]
    assert any("does not depend on queue order" in note for note in table.notes)
    assert mixed_encoder_cache_warning([sft, dpo, orpo]) is None


def test_time_to_an_aligned_model_does_not_depend_on_which_run_built_the_cache():
    def aligned(order: list[tuple[RunSpec, dict]]) -> dict[str, float | None]:
        return {s.name: s.aligned_seconds for s in summarize_runs([run(spec, cache) for spec, cache in order])}

    sft, orpo = RunSpec(name="sft", method="sft"), RunSpec(name="orpo", method="orpo")
    dpo = RunSpec(name="dpo", method="dpo", after="sft")
    sft_first = aligned([(sft, BUILT), (orpo, REUSED), (dpo, REUSED)])
    orpo_first = aligned([(orpo, BUILT), (sft, REUSED), (dpo, REUSED)])
    assert sft_first == orpo_first
    assert all(value is not None for value in sft_first.values())
    # an entry built in an earlier session (every run reused it): no route is charged
    earlier = aligned([(sft, REUSED), (orpo, REUSED), (dpo, REUSED)])
    assert earlier["orpo"] == pytest.approx(sft_first["orpo"] - 12.5, abs=1e-9)
    assert earlier["dpo"] == pytest.approx(sft_first["dpo"] - 12.5, abs=1e-9)


def test_runs_with_and_without_the_cache_side_by_side_get_one_warning_sentence():
    runs = [run(RunSpec(name="sft", method="sft"), BUILT), run(RunSpec(name="sft-paper", method="sft"), None)]
    warning = mixed_encoder_cache_warning(runs)
    assert warning is not None and "sft" in warning and "sft-paper" in warning and warning.count(". ") == 0
    table = efficiency_table(summarize_runs(runs), warning)
    assert table.notes[0] == warning
    assert [row[-1] for row in table.rows] == ["built in 12.50 s", "off"]
