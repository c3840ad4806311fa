"""The CI gate: a regression that is statistically real fails, noise of the same size does not; bad input
is one sentence and exit 2 with the store untouched; the job summary gets the Regressions table."""

from __future__ import annotations

import json
import math
import re

import pytest
from scipy.stats import binomtest
from test_headless import fake, vqabench

from vqabench.cli import main
from vqabench.gate import append_step_summary
from vqabench.report import (
    FAIL_ON_GRAMMAR,
    SCHEMA_VERSION,
    FailOnError,
    compare_reports,
    parse_fail_on,
)

LIMITS = {"em": -0.02, "judge": -0.02, "epoch_time": 0.10, "step_time": 0.10, "peak_memory": 0.10}


def document(runs: dict[str, dict]) -> dict:
    """A JSON report with only what the gate reads: each run's name, method and measurements."""
    empty = {"questions": [], "em": [], "judge": [], "epoch_seconds": [], "step_ms": []}
    return {
        "schema_version": SCHEMA_VERSION,
        "runs": [
            {"name": name, "method": name.split("-")[0], "status": "done", "measurements": {**empty, **m}}
            for name, m in runs.items()
        ],
    }


def scores(n: int, right_to_wrong: int, wrong_to_right: int) -> tuple[list[int], list[int]]:
    """Before and after on n questions: half right before; then some flip each way, the rest stay."""
    before = [1 if i % 2 == 0 else 0 for i in range(n)]
    after = list(before)
    right = [i for i in range(n) if before[i] == 1][:right_to_wrong]
    wrong = [i for i in range(n) if before[i] == 0][:wrong_to_right]
    for i in right:
        after[i] = 0
    for i in wrong:
        after[i] = 1
    return before, after


def verdicts(figure: str, before: dict, after: dict) -> dict[str, str]:
    result = compare_reports(document({"m": before}), document({"m": after}), LIMITS)
    return {c.figure: c.verdict for c in result.comparisons if c.figure == figure}


@pytest.mark.parametrize("figure", ["em", "judge"])
def test_a_score_drop_fails_only_when_mcnemar_says_it_is_real(figure):
    keys = [f"q{i}" for i in range(400)]
    # 400 questions, 30 right -> wrong and 10 wrong -> right: a drop of 20/400 = 0.05, p = binom(10 of 40) < 0.05
    before, after = scores(400, 30, 10)
    assert binomtest(10, 40, 0.5).pvalue < 0.01
    result = compare_reports(
        document({"m": {"questions": keys, figure: before}}),
        document({"m": {"questions": keys, figure: after}}),
        LIMITS,
    )
    (c,) = [c for c in result.comparisons if c.figure == figure]
    assert c.change == pytest.approx(-0.05, abs=1e-9) and c.n == 400
    assert c.p_value == pytest.approx(binomtest(10, 40, 0.5).pvalue, rel=1e-9)
    assert c.verdict == "regression" and result.failed
    # the same mean drop from balanced discordance (110 one way, 90 the other): p = 0.18, noise
    before, after = scores(400, 110, 90)
    assert binomtest(90, 200, 0.5).pvalue > 0.05
    got = verdicts(figure, {"questions": keys, figure: before}, {"questions": keys, figure: after})
    assert got == {figure: "within noise"}
    # the same mean drop on 20 questions (1 of 20 flips): too few items for a test, never a regression
    before, after = scores(20, 1, 0)
    got = verdicts(figure, {"questions": keys[:20], figure: before}, {"questions": keys[:20], figure: after})
    assert got == {figure: "within noise"}


def test_the_judge_pairs_only_questions_both_runs_graded_and_em_pairs_by_question():
    keys = [f"q{i}" for i in range(400)]
    before, after = scores(400, 30, 10)
    # the after run's questions in another order, and 50 ungraded verdicts on the 30 flips' side: still paired
    order = list(reversed(range(400)))
    ungraded = [None if i in range(1, 101, 2) else v for i, v in enumerate(after)]  # wrong-before items only
    got = compare_reports(
        document({"m": {"questions": keys, "em": before, "judge": before}}),
        document(
            {
                "m": {
                    "questions": [keys[i] for i in order],
                    "em": [after[i] for i in order],
                    "judge": [ungraded[i] for i in order],
                }
            }
        ),
        LIMITS,
    )
    by_figure = {c.figure: c for c in got.comparisons}
    assert by_figure["em"].n == 400 and by_figure["em"].change == pytest.approx(-0.05)
    assert by_figure["judge"].n == 350 and by_figure["judge"].verdict == "regression"


@pytest.mark.parametrize("figure,key", [("epoch_time", "epoch_seconds"), ("step_time", "step_ms")])
def test_a_time_fails_only_when_its_whole_interval_lies_above_the_limit(figure, key):
    base = [10.0, 10.1, 9.9, 10.0]
    tight = [12.0, 12.1, 11.9, 12.0]  # 20% slower, epochs agree: the interval is about [1.19, 1.21]
    result = compare_reports(document({"m": {key: base}}), document({"m": {key: tight}}), LIMITS)
    (c,) = result.comparisons
    # geometric means: exp(mean log after - mean log before)
    expected = math.exp(sum(map(math.log, tight)) / 4 - sum(map(math.log, base)) / 4)
    assert c.change == pytest.approx(expected, rel=1e-9) and c.low is not None and c.low > 1.1
    assert c.verdict == "regression" and result.failed
    wide = [7.0, 18.0, 8.0, 17.0]  # as slow on average, but the epochs spread from 7 to 18 s
    got = compare_reports(document({"m": {key: base}}), document({"m": {key: wide}}), LIMITS)
    (c,) = got.comparisons
    assert c.change > 1.1 and c.low is not None and c.low < 1.1
    assert c.verdict == "within noise" and not got.failed
    one = compare_reports(document({"m": {key: [10.0]}}), document({"m": {key: [12.0]}}), LIMITS)
    assert [c.verdict for c in one.comparisons] == ["within noise"]  # one epoch each: no interval


def test_memory_fails_beyond_its_limit_and_only_against_the_same_source():
    before = {"peak_memory_mib": 1000.0, "memory_source": "CUDA"}
    assert verdicts("peak_memory", before, {**before, "peak_memory_mib": 1150.0}) == {"peak_memory": "regression"}
    assert verdicts("peak_memory", before, {**before, "peak_memory_mib": 1050.0}) == {"peak_memory": "ok"}
    assert verdicts("peak_memory", before, {"peak_memory_mib": 1500.0, "memory_source": "RSS"}) == {}


def test_runs_only_one_side_has_are_listed_in_one_sentence_and_the_table_names_each_figure():
    keys = [f"q{i}" for i in range(400)]
    before, after = scores(400, 30, 10)
    result = compare_reports(
        document({"sft": {"questions": keys, "em": before}, "kto": {}}),
        document({"sft": {"questions": keys, "em": after}, "simpo": {}}),
        {"em": -0.02},
    )
    assert (result.only_baseline, result.only_current) == (["kto"], ["simpo"])
    assert result.table.notes[0] == (
        "Compared the 1 run(s) both sessions have (sft); only in the baseline: kto; only in this session: simpo."
    )
    assert result.table.columns == ["Run", "Figure", "Before", "After", "Change [95% CI]", "p", "Limit", "Verdict"]
    (row,) = result.table.rows
    assert row[:4] == ["sft", "em", "0.500", "0.450"] and row[4].startswith("-0.050 [")
    assert row[5] == "0.002" and row[6:] == ["-0.020", "regression"]


def test_fail_on_parses_the_documented_grammar_and_names_a_bad_term():
    assert parse_fail_on("em:-0.02, judge:-0.02, epoch_time:+10%, peak_memory:+10%") == {
        "em": -0.02,
        "judge": -0.02,
        "epoch_time": pytest.approx(0.10),
        "peak_memory": pytest.approx(0.10),
    }
    assert parse_fail_on("step_time:5%") == {"step_time": pytest.approx(0.05)}
    for bad, term in [
        ("em:0.02", "em:0.02"),  # a score's limit is a drop
        ("em:-0.02, epoch_time:10", "epoch_time:10"),  # a time's limit is in percent
        ("speed:+10%", "speed:+10%"),
        ("em -0.02", "em -0.02"),
        ("em:-0.02, em:-0.05", "em:-0.05"),
    ]:
        with pytest.raises(FailOnError) as caught:
            parse_fail_on(bad)
        message = str(caught.value)
        assert f"'{term}'" in message and FAIL_ON_GRAMMAR in message and "\n" not in message


def test_the_markdown_report_is_appended_to_the_github_step_summary(tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n")
    assert append_step_summary("## Regressions\n\n| a |", {"GITHUB_STEP_SUMMARY": str(summary)}) == summary
    assert summary.read_text() == "# earlier step\n## Regressions\n\n| a |\n"
    assert append_step_summary("x", {}) is None


def test_bad_baseline_or_fail_on_is_one_sentence_exit_2_before_anything_runs(tmp_path, capsys):
    results = tmp_path / "results"
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema_version": 1, "runs": []}))
    cases = [
        (["--baseline", str(tmp_path / "missing.json")], ["cannot read the JSON report", "missing.json"]),
        (["--baseline", str(old)], ["schema_version 1", f"schema_version {SCHEMA_VERSION}"]),
        (["--baseline", str(old), "--fail-on", "em:-0.02, time:+5%"], ["'time:+5%'", "FIGURE:LIMIT"]),
        (["--baseline", "store:last"], ["store:ID"]),
        (["--fail-on", "em:-0.02"], ["--baseline"]),
    ]
    for args, parts in cases:
        code = main(["--headless", "--preset", "sft", "--results", str(results), *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and err.startswith("vqabench: "), (args, err)
        for part in parts:
            assert part in err, (args, err)
        assert not results.exists()  # no session recorded, no run started


def test_headless_gates_on_a_baseline_it_exported_and_fails_on_a_real_regression(tmp_path, monkeypatch):
    first = vqabench(
        tmp_path, "--headless", "--preset", "sft", "--epochs", "1", "--json", "b.json", *fake(tmp_path, {})
    )
    assert first.returncode == 0, first.stdout + first.stderr
    summary = tmp_path / "summary.md"
    env_args = ["--headless", "--preset", "sft", "--epochs", "1", *fake(tmp_path, {}), "--fail-on", "peak_memory:+10%"]
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))  # the subprocesses inherit it
    same = vqabench(tmp_path, *env_args, "--baseline", "b.json")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "No regression against the baseline (1 figure(s) compared)." in same.stdout
    assert summary.read_text().count("## Regressions") == 1
    baseline = json.loads((tmp_path / "b.json").read_text())
    baseline["runs"][0]["measurements"]["peak_memory_mib"] /= 1.5  # this session now uses 50% more
    (tmp_path / "smaller.json").write_text(json.dumps(baseline))
    worse = vqabench(tmp_path, *env_args, "--baseline", "smaller.json")
    assert worse.returncode == 1, worse.stdout + worse.stderr
    assert "Regression against the baseline: sft peak_memory." in worse.stdout
    assert re.search(
        r"^\| sft +\| peak_memory \| +[\d.]+ \| +[\d.]+ \| +1\.50 \|.*\| regression +\|$", worse.stdout, re.M
    )
    assert summary.read_text().count("## Regressions") == 2
    # the standalone gate: session 3 (this one) against session 1 of the store, the default limits
    again = vqabench(tmp_path, "compare", "--baseline", "store:1", "--session", "3")
    assert again.returncode == 0 and "No regression against the baseline" in again.stdout, again.stdout + again.stderr
    assert summary.read_text().count("## Regressions") == 3


def test_a_runs_measurements_come_from_its_predictions_epochs_and_memory(tmp_path):
    from vqabench.events import EpochEnded, Evaluated
    from vqabench.report import RunData, run_measurements

    predictions = tmp_path / "predictions.jsonl"
    rows = [
        {"question": "what shape?", "reference": "circle", "prediction": "circle", "em": 1.0, "verdict": "correct"},
        {"question": "what color?", "reference": "red", "prediction": "blue", "em": 0.0, "verdict": "incorrect"},
        {
            "question": "what shape?",
            "reference": "square",
            "prediction": "a square",
            "em": 0.0,
            "verdict": "unparseable",
        },
    ]
    predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def epoch(i: int, seconds: float, steps: list[float], rss: float) -> EpochEnded:
        numbers = dict(train_loss=1.0, eval_loss=1.0, eval_seconds=0.1, samples_per_s=1.0, lr=1e-4)
        more = dict(reference_bytes=0, chosen_logp=0.0, rejected_logp=0.0, reward_margin=0.0, pref_accuracy=0.5)
        return EpochEnded(
            epoch=i, epochs=3, epoch_seconds=seconds, peak_rss_mib=rss, is_best=False, step_ms=steps, **numbers, **more
        )

    run = RunData(
        "sft",
        "sft",
        "done",
        epochs=[epoch(1, 9.0, [50.0, 70.0], 600.0), epoch(2, 4.0, [20.0, 30.0], 650.0), epoch(3, 5.0, [40.0], 640.0)],
        final_eval=Evaluated(split="test", n=3, em=1 / 3, f1=0.5, predictions=str(predictions)),
    )
    m = run_measurements(run)
    assert m["em"] == [1, 0, 0] and m["judge"] == [1, 0, None]
    assert len(set(m["questions"])) == 3  # the same question with another reference is another item
    assert m["epoch_seconds"] == [4.0, 5.0]  # three epochs: the first left out as warm-up
    assert m["step_ms"] == [25.0, 40.0]
    assert (m["peak_memory_mib"], m["memory_source"]) == (650.0, "RSS")
