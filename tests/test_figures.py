"""Pictures of a session: the chart data (vqabench.charts) agrees with the report's tables, the
Pareto front is right, and the export writes SVG figures that parse, hold one series per run
and are linked from the Markdown with paths that resolve."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from fake_worker import worker_cmd
from rich.console import Console

from vqabench.charts import cost_charts, interval, loss_curve, pareto_front, quality_vs_cost
from vqabench.cli import main
from vqabench.events import EpochEnded
from vqabench.headless import run_headless
from vqabench.presets import Overrides
from vqabench.report import RunSummary, build_report
from vqabench.store import ResultsStore

SVG = "{http://www.w3.org/2000/svg}"
RUNS = ("sft", "orpo", "dpo-beta0.1", "dpo-beta0.5")


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Path:
    """A stored session of four runs from the canned-event worker; dpo-beta0.5 fails in epoch 2."""
    tmp = tmp_path_factory.mktemp("figures")
    plan = {"default": {"eval_extra": {"em_ci": [0.55, 0.7]}}, "runs": {"dpo-beta0.5": {"fail_in_epoch": 2}}}
    code = run_headless(
        ",".join(RUNS),
        Overrides(epochs=3),
        tmp / "results",
        worker_cmd=worker_cmd(tmp, plan),
        cache_dir=tmp / "cache",
        console=Console(file=io.StringIO()),
    )
    assert code == 1  # the failed run
    return tmp / "results"


def epoch(n: int, train: float, evaluation: float) -> EpochEnded:
    return EpochEnded(
        epoch=n,
        epochs=3,
        train_loss=train,
        eval_loss=evaluation,
        epoch_seconds=1.0,
        eval_seconds=0.1,
        samples_per_s=1.0,
        lr=1e-4,
        peak_rss_mib=1.0,
        reference_bytes=0,
        chosen_logp=-1.0,
        rejected_logp=-2.0,
        reward_margin=1.0,
        pref_accuracy=0.5,
        is_best=False,
    )


def test_a_live_train_curve_grows_with_the_running_loss_and_skips_nan():
    epochs = [epoch(1, 2.0, 2.5), epoch(2, float("nan"), 1.5)]
    train = loss_curve("sft", "train", epochs, [(1.5, 1.8), (2.25, 0.9), (2.5, 0.8)])
    # epoch 2's NaN train loss is left out; running points of epochs already finished are too
    assert train.points == [(1.0, 2.0), (2.25, 0.9), (2.5, 0.8)]
    assert loss_curve("sft", "eval", epochs, [(2.5, 0.8)]).points == [(1.0, 2.5), (2.0, 1.5)]
    with pytest.raises(ValueError, match="loss kind 'test'"):
        loss_curve("sft", "test", epochs)


def test_pareto_front_keeps_the_runs_no_other_beats_on_cost_and_quality():
    # (cost, quality): b is cheaper and better than c; a is cheapest; d is best; e equals b
    points = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.6), (5.0, 0.8), (2.0, 0.7)]
    assert pareto_front(points) == {0, 1, 3, 4}
    assert pareto_front([]) == set()


def test_cost_charts_take_the_report_numbers_with_stages_and_intervals(session):
    with ResultsStore(session, create=False) as store:
        report = build_report(store, 1)
    by_key = {c.key: c for c in cost_charts(report.summaries)}
    assert list(by_key) == ["relative_epoch_time", "aligned_seconds", "peak_memory_mib", "reference_mib"]
    efficiency = next(t for t in report.tables if t.title == "Efficiency")
    column = next(i for i, c in enumerate(efficiency.columns) if c.startswith("Relative to SFT"))
    relative = {row[0]: row[column].split()[0] for row in efficiency.rows}  # the ratio, without its interval
    for bar in by_key["relative_epoch_time"].bars:
        assert (f"{bar.value:.2f}" if bar.value is not None else "n/a") == relative[bar.run]
    aligned = {b.run: b for b in by_key["aligned_seconds"].bars}
    assert aligned["sft"].parts == pytest.approx((6.0, 0.0))  # 3 epochs of 2.0 s, all SFT stage
    assert aligned["dpo-beta0.1"].parts == pytest.approx((6.0, 9.6))  # SFT stage, then 3 × 3.2 s of DPO
    assert aligned["orpo"].parts == pytest.approx((0.0, 6.6))  # ORPO starts from the base model
    assert aligned["dpo-beta0.5"].value is None and aligned["dpo-beta0.5"].missing == "n/a"
    reference = {b.run: b for b in by_key["reference_mib"].bars}
    assert reference["orpo"].value is None and reference["orpo"].missing == "none"
    assert reference["dpo-beta0.1"].value == pytest.approx(6.0)
    assert by_key["peak_memory_mib"].unit == "MiB (RSS)"


def test_an_across_seed_spread_becomes_the_whisker():
    summary = RunSummary(
        "dpo (3 seeds)", "dpo", "done", 3.0, 1.5, 10.0, 1.0, 500.0, "RSS", 6.0, 0.0, True, 0.6, 0.7, None, seeds=3
    )
    summary.spread = {"relative_epoch_time": 0.25}
    summary.intervals = {"em": [0.5, 0.65]}
    assert interval(summary, "relative_epoch_time") == (1.25, 1.75)
    assert interval(summary, "em") == (0.5, 0.65)
    assert interval(summary, "aligned_seconds") is None
    bar = cost_charts([summary])[0].bars[0]
    assert (bar.low, bar.value, bar.high) == (1.25, 1.5, 1.75)


def test_quality_vs_cost_has_a_point_per_finished_run_and_marks_the_front(session):
    with ResultsStore(session, create=False) as store:
        report = build_report(store, 1)
    data = quality_vs_cost(report.summaries)
    points = {p.run: p for p in data.points}
    assert set(points) == {"sft", "orpo", "dpo-beta0.1"} and data.missing == ["dpo-beta0.5"]
    assert (points["sft"].low, points["sft"].em, points["sft"].high) == (0.55, 0.6, 0.7)
    # sft: cheapest (6.0 s); orpo: 6.6 s and better EM; dpo-beta0.1: 15.6 s and worse than orpo
    assert {r for r, p in points.items() if p.pareto} == {"sft", "orpo"}


def svg_ids(path: Path) -> list[str]:
    root = ET.parse(path).getroot()  # raises if the file is not well-formed XML
    assert root.tag == f"{SVG}svg"
    return [e.get("id", "") for e in root.iter()]


def test_export_writes_svg_figures_with_one_series_per_run_linked_from_the_markdown(session, tmp_path, capsys):
    out = tmp_path / "r.md"
    assert main(["export", "--last", "-o", str(out), "--results", str(session)]) == 0
    assert "and 3 SVG figure(s) to" in capsys.readouterr().out
    text = out.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["r_files/loss.svg", "r_files/cost.svg", "r_files/quality-vs-cost.svg"]
    assert all((out.parent / link).is_file() for link in links)  # relative links resolve

    loss = svg_ids(tmp_path / "r_files" / "loss.svg")
    for kind in ("train", "eval"):
        assert sorted(i for i in loss if i.startswith(f"loss-{kind}-")) == sorted(f"loss-{kind}-{r}" for r in RUNS)
    cost = svg_ids(tmp_path / "r_files" / "cost.svg")
    relative = [i for i in cost if i.startswith("bar-relative_epoch_time-")]
    assert sorted(relative) == sorted(f"bar-relative_epoch_time-{r}" for r in RUNS)  # dpo-beta0.5: epoch 1 ran
    stages = [i for i in cost if i.startswith("bar-aligned_seconds-")]
    assert sorted(stages) == [
        "bar-aligned_seconds-dpo-beta0.1-SFT_stage",
        "bar-aligned_seconds-dpo-beta0.1-preference_stage",
        "bar-aligned_seconds-orpo-preference_stage",
        "bar-aligned_seconds-sft-SFT_stage",
    ]
    reference = [i for i in cost if i.startswith("bar-reference_mib-")]
    assert reference == ["bar-reference_mib-dpo-beta0.1", "bar-reference_mib-dpo-beta0.5"]
    quality = svg_ids(tmp_path / "r_files" / "quality-vs-cost.svg")
    assert sorted(i for i in quality if i.startswith("point-")) == ["point-dpo-beta0.1", "point-orpo", "point-sft"]
    assert "pareto-front" in quality


def test_no_figures_writes_the_markdown_alone(session, tmp_path):
    out = tmp_path / "plain.md"
    assert main(["export", "--last", "--no-figures", "-o", str(out), "--results", str(session)]) == 0
    assert "## Figures" not in out.read_text() and "](" not in out.read_text()
    assert not (tmp_path / "plain_files").exists()


def test_losses_of_very_different_scales_go_on_a_log_axis():
    from vqabench.charts import LossCurve, log_scale

    dpo = LossCurve("dpo", "train", [(1.0, 0.69), (2.0, 0.6)])
    ipo = LossCurve("ipo", "train", [(1.0, 24.7), (2.0, 20.1)])  # IPO's squared loss, as measured
    assert log_scale([dpo, ipo]) and not log_scale([dpo])
    assert not log_scale([dpo, LossCurve("x", "train", [(1.0, -0.1), (2.0, 20.0)])])  # a log axis needs > 0
    assert not log_scale([])
