"""The Markdown report: a golden file pins the format; the numbers are checked on their own."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from fake_worker import canned_events

from vqabench.events import EpochEnded, Progress, RunFinished, RunStarted, encode_event
from vqabench.report import RunData, build_report, efficiency_table, reference_text, render_markdown, summarize_runs
from vqabench.runner import RunnerFinished, RunQueued, RunStatusChanged, WorkerEvent
from vqabench.spec import DatasetSpec, RunSpec
from vqabench.store import ResultsStore

GOLDEN = Path(__file__).parent / "golden" / "report.md"
INTERVALS = {"em_ci": [0.61, 0.67], "f1_ci": [0.66, 0.72], "judge_ci": [0.7, 0.78], "judge_kappa": 0.52}


def record(
    store: ResultsStore,
    session,
    specs: list[RunSpec],
    crash: dict[str, int] | None = None,
    extra: dict[str, dict] | None = None,
    cuda: set[str] = frozenset(),
) -> None:
    """Feed canned worker events through a recorder, as a runner would."""
    recorder = store.recorder(session)
    crash, extra = crash or {}, extra or {}
    for position, spec in enumerate(specs):
        recorder(RunQueued(spec.name, spec, position))
    statuses = {}
    for spec in specs:
        if spec.after and statuses[spec.after] != "done":
            statuses[spec.name] = "skipped"
            recorder(RunStatusChanged(spec.name, "skipped", f"skipped: {spec.after} failed"))
            continue
        recorder(RunStatusChanged(spec.name, "running", spec=spec, pid=100 + len(statuses)))
        status, reason = "done", ""
        for event in canned_events(
            spec.to_dict(),
            cuda=spec.name in cuda,
            eval_extra=extra.get(spec.name),
            checkpoint=f"/runs/{spec.name}/best",
        ):
            if isinstance(event, Progress) and crash.get(spec.name) == event.epoch:
                status, reason = "failed", f"worker exited with signal 9 (killed) during epoch {event.epoch} of 3"
                break
            recorder(WorkerEvent(spec.name, event, encode_event(event)))
        statuses[spec.name] = status
        recorder(RunStatusChanged(spec.name, status, reason, exit_code=0 if status == "done" else -9))
    recorder(RunnerFinished(statuses, cancelled=False))


def paper_like_session(tmp_path: Path, **kwargs) -> tuple[ResultsStore, int]:
    store = ResultsStore(tmp_path)
    session = store.begin_session(
        "all",
        "vqabench --headless --preset all",
        machine="testbox",
        processor="x86_64",
        started_at="2026-01-02T03:04:05+00:00",
    )
    specs = [
        RunSpec(name="orpo", method="orpo"),
        RunSpec(name="sft", method="sft"),
        RunSpec(name="dpo-beta0.1", method="dpo", beta=0.1, after="sft"),
        RunSpec(name="dpo-beta0.5", method="dpo", beta=0.5, after="sft"),
    ]
    record(store, session, specs, **kwargs)
    return store, session.id


def test_the_markdown_report_matches_the_golden_file(tmp_path):
    store, session_id = paper_like_session(tmp_path, crash={"dpo-beta0.5": 2}, extra={"dpo-beta0.1": INTERVALS})
    text = render_markdown(store, session_id)
    if os.environ.get("VQABENCH_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_the_first_line_names_machine_device_versions_and_date(tmp_path):
    store, session_id = paper_like_session(tmp_path)
    first = render_markdown(store, session_id).splitlines()[0]
    import vqabench

    for part in (
        "testbox (x86_64)",
        "device cpu",
        "torch 2.13.0+cpu",
        f"vqabench {vqabench.__version__}",
        "2026-01-02 03:04 UTC",
    ):
        assert part in first


def test_efficiency_numbers_are_ratios_to_sft_and_sums_along_the_chain(tmp_path):
    store, session_id = paper_like_session(tmp_path)
    report = build_report(store, session_id)
    efficiency = {row[0]: row for row in report.tables[1].rows}
    # canned epoch times: sft 2.0 s, dpo 3.2 s, orpo 2.2 s; three epochs each
    # three epochs: the first apart as warm-up, the median ± σ (min … max) of the other two
    assert efficiency["sft"][1:4] == ["2.00 s ± 0.00 (2.00 … 2.00)", "2.00", "1.00"]
    assert float(efficiency["dpo-beta0.1"][3]) == pytest.approx(3.2 / 2.0, abs=0.005)
    assert float(efficiency["orpo"][3]) == pytest.approx(2.2 / 2.0, abs=0.005)
    assert float(efficiency["dpo-beta0.1"][4]) == pytest.approx(3 * 3.2 + 3 * 2.0, abs=0.005)
    assert float(efficiency["orpo"][4]) == pytest.approx(3 * 2.2, abs=0.005)
    assert efficiency["dpo-beta0.1"][8] == "6.0" and efficiency["orpo"][8] == "none"
    # Peak − ORPO: the DPO run's peak memory minus the ORPO run's on the same setup
    assert efficiency["orpo"][7] == "0.0"
    dpo_peak, orpo_peak = float(efficiency["dpo-beta0.1"][6]), float(efficiency["orpo"][6])
    assert float(efficiency["dpo-beta0.1"][7]) == pytest.approx(dpo_peak - orpo_peak, abs=0.05)


def test_efficiency_shows_what_trains_its_precision_optimizer_state_and_a_zero_byte_adapter_reference(tmp_path):
    store = ResultsStore(tmp_path)
    session = store.begin_session("lora")
    specs = [
        RunSpec(name="lora-sft", method="sft", train="lora", precision="bf16"),
        RunSpec(name="lora-dpo", method="dpo", after="lora-sft", train="lora", reference="adapter", lora_r=8),
        RunSpec(name="dpo", method="dpo", after="lora-sft", reference="copy"),
    ]
    record(store, session, specs)
    table = build_report(store, session.id).tables[1]
    rows = {row[0]: dict(zip(table.columns, row, strict=True)) for row in table.rows}
    assert rows["lora-sft"]["Trains"] == "LoRA r16" and rows["lora-sft"]["Precision"] == "bf16"
    assert rows["lora-dpo"]["Trains"] == "LoRA r8" and rows["lora-dpo"]["Precision"] == "fp32"
    assert rows["lora-dpo"]["Reference memory [MiB] ↓"] == "0.0" and rows["dpo"]["Reference memory [MiB] ↓"] == "6.0"
    assert rows["dpo"]["Trains"] == "decoder" and rows["lora-sft"]["Reference memory [MiB] ↓"] == "none"
    assert rows["lora-sft"]["Optimizer state [MiB] ↓"] == f"{8_000_000 / 2**20:.1f}"
    assert rows["lora-sft"]["Trainable params"] == "1,000,000"


def test_efficiency_says_which_reference_auto_chose_and_why_and_charges_its_one_off_pass():
    def run(spec: RunSpec, strategy: str | None = None, choice: dict | None = None, seconds: float | None = None):
        events = list(canned_events(spec.to_dict()))
        started = next(e for e in events if isinstance(e, RunStarted))
        if choice is not None:
            started.reference_strategy = strategy
            started.data.update(reference_choice=choice, reference_seconds=seconds)
        return RunData(
            spec.name,
            spec.method,
            "done",
            after=spec.after,
            started=started,
            finished=next(e for e in events if isinstance(e, RunFinished)),
            epochs=[e for e in events if isinstance(e, EpochEnded)],
            setup="embedded on easyvqa",
        )

    sft = run(RunSpec(name="sft", method="sft"))
    picked = {"asked": "auto", "chosen": "precompute", "why": "3 epochs, table fits"}
    auto = run(RunSpec(name="dpo", method="dpo", after="sft", reference="auto"), "precompute", picked, 4.5)
    named = run(RunSpec(name="ipo", method="ipo", after="sft", reference="copy"))
    summaries = summarize_runs([sft, auto, named])
    table = efficiency_table(summaries)
    rows = {row[0]: dict(zip(table.columns, row, strict=True)) for row in table.rows}
    assert rows["dpo"]["Reference"] == "precompute (auto: 3 epochs, table fits)"
    assert rows["ipo"]["Reference"] == "copy" and rows["sft"]["Reference"] == "none"
    assert any(note.startswith("Reference: the strategy the run kept; auto") for note in table.notes)
    by_name = {s.name: s for s in summaries}
    sft_seconds = sft.finished.train_seconds
    assert by_name["dpo"].aligned_seconds == pytest.approx(sft_seconds + auto.finished.train_seconds + 4.5)
    # Without an auto run the column stays away (the study's tables are unchanged)
    assert "Reference" not in efficiency_table(summarize_runs([sft, named])).columns
    assert reference_text(auto.started) == "precompute (auto: 3 epochs, table fits)"


def test_missing_values_are_na_never_zero(tmp_path):
    store, session_id = paper_like_session(tmp_path, crash={"sft": 1})
    report = build_report(store, session_id)
    quality = {row[0]: row for row in report.tables[0].rows}
    efficiency = {row[0]: row for row in report.tables[1].rows}
    assert quality["dpo-beta0.1"][1:] == ["n/a"] * 5  # never started: not even its model is known
    assert efficiency["dpo-beta0.1"][1:] == ["n/a", "–"] + ["n/a"] * 11
    assert quality["sft"][1] == "blip 1.50M"  # run_started said, before the crash
    assert quality["sft"][2:5] == ["n/a"] * 3  # no test evaluation before the crash
    assert efficiency["orpo"][3] == "n/a"  # no SFT epoch to compare with
    assert report.unfinished == [
        "sft: failed (worker exited with signal 9 (killed) during epoch 1 of 3)",
        "dpo-beta0.1: skipped: sft failed",
        "dpo-beta0.5: skipped: sft failed",
    ]


def test_cuda_memory_is_preferred_and_a_mix_is_marked_per_cell(tmp_path):
    store, session_id = paper_like_session(tmp_path, cuda={"orpo"})
    efficiency = build_report(store, session_id).tables[1]
    assert "Peak memory [MiB] ↓" in efficiency.columns
    rows = {row[0]: row for row in efficiency.rows}
    assert rows["orpo"][6] == "113.0 (CUDA)"  # canned: 100 * 1.1 + epoch 3
    assert rows["sft"][6] == "530.0 (RSS)"


def test_intervals_and_kappa_are_shown_and_explained(tmp_path):
    store, session_id = paper_like_session(tmp_path, extra={"dpo-beta0.1": INTERVALS})
    quality = build_report(store, session_id).tables[0]
    assert "κ judge/EM" in quality.columns
    row = next(r for r in quality.rows if r[0] == "dpo-beta0.1")
    assert row[2:6] == ["0.640 [0.610, 0.670]", "0.690 [0.660, 0.720]", "0.740 [0.700, 0.780]", "0.52"]
    assert any("Wilson score" in note and "bootstrap interval for F1" in note for note in quality.notes)
    assert any("Cohen's kappa" in note for note in quality.notes)


def test_summaries_work_on_live_data_without_a_store():
    spec = RunSpec(name="sft", method="sft", epochs=2)
    events = list(canned_events(spec.to_dict()))
    live = RunData("sft", "sft", "running", started=events[0], epochs=[events[2]])
    [summary] = summarize_runs([live])
    assert summary.epoch_seconds == pytest.approx(2.0)
    assert summary.relative_epoch_time == pytest.approx(1.0)
    assert summary.aligned_seconds is None and summary.em is None
    assert summary.memory_source == "RSS" and summary.uses_reference is False


def test_each_run_is_compared_with_the_sft_run_of_its_own_model_and_data(tmp_path):
    store = ResultsStore(tmp_path)
    session = store.begin_session("paper")
    specs = [
        RunSpec(name=name, method=method, model="Salesforce/blip-vqa-base", dataset=DatasetSpec(source))
        for name, method, source in (
            ("a-sft", "sft", "hf:a/a"),
            ("a-orpo", "orpo", "hf:a/a"),
            ("b-orpo", "orpo", "hf:b/b"),
        )
    ]
    record(store, session, specs)
    rows = {row[0]: row for row in build_report(store, session.id).tables[1].rows}
    assert rows["a-orpo"][3] == "1.10"
    assert rows["b-orpo"][3] == "n/a"  # no SFT run on b's data in this session


def test_versus_sft_is_a_paired_difference_on_the_same_questions(tmp_path):
    import json as _json

    from vqabench.events import Evaluated
    from vqabench.report import RunData, versus_sft_table

    def run(name: str, method: str, ems: list[int]) -> RunData:
        path = tmp_path / f"{name}.jsonl"
        path.write_text(
            "".join(
                _json.dumps({"question": f"q{i}", "reference": "r", "prediction": "p", "em": e, "f1": e}) + "\n"
                for i, e in enumerate(ems)
            )
        )
        final = Evaluated(split="test", n=len(ems), em=sum(ems) / len(ems), f1=0.0, predictions=str(path))
        return RunData(name, method, "done", final_eval=final, setup="embedded on easyvqa")

    sft = run("sft", "sft", [1] * 50 + [0] * 50)
    better = run("orpo", "orpo", [1] * 80 + [0] * 20)  # right on 30 more of the same questions
    table = versus_sft_table([sft, better])
    assert table is not None and [r[0] for r in table.rows] == ["orpo"]
    row = table.rows[0]
    # 30 questions only ORPO got right, none the other way: exact McNemar p = 2 * 0.5**30
    assert row[2].startswith("+0.300 [") and row[3] == "< 0.001" and row[8] == "100"
    assert row[6:8] == ["n/a", "n/a"]  # no judge verdicts in these predictions
    low = float(row[2].split("[")[1].split(",")[0])
    assert 0.0 < low < 0.3
    few = versus_sft_table([run("sft20", "sft", [0] * 20), run("few", "orpo", [1] * 20)])
    assert few is not None and few.rows[0][3] == "too few items" and few.rows[0][5] == "too few items"
    other = run("other", "orpo", [1] * 100)
    other.final_eval.predictions = str(tmp_path / "missing.jsonl")
    assert versus_sft_table([sft, other]) is None  # no predictions: no row, never a made-up one


def test_runs_repeated_per_seed_are_compared_with_their_own_seeds_sft():
    from vqabench.events import EpochEnded
    from vqabench.report import RunData, aggregate_seeds, summarize_runs

    def run(name: str, method: str, seconds: float, after: str | None = None) -> RunData:
        epoch = EpochEnded(
            epoch=1,
            epochs=1,
            train_loss=1.0,
            eval_loss=1.0,
            epoch_seconds=seconds,
            eval_seconds=0.1,
            samples_per_s=10.0,
            lr=1e-4,
            peak_rss_mib=100.0,
            reference_bytes=0,
            chosen_logp=-1.0,
            rejected_logp=-2.0,
            reward_margin=1.0,
            pref_accuracy=1.0,
            is_best=True,
        )
        return RunData(name, method, "done", after=after, epochs=[epoch], setup="embedded on easyvqa")

    # seed 1's machine was twice as slow: DPO costs 1.5x SFT in each seed
    runs = [
        run("sft@s0", "sft", 10.0),
        run("dpo@s0", "dpo", 15.0, "sft@s0"),
        run("sft@s1", "sft", 20.0),
        run("dpo@s1", "dpo", 30.0, "sft@s1"),
    ]
    rows = {s.name: s for s in aggregate_seeds(summarize_runs(runs))}
    assert rows["dpo (2 seeds)"].relative_epoch_time == pytest.approx(1.5)
    assert rows["dpo (2 seeds)"].spread["relative_epoch_time"] == pytest.approx(0.0)
    assert rows["sft (2 seeds)"].relative_epoch_time == pytest.approx(1.0)


def test_data_table_shows_rows_pairs_skips_answer_lengths_and_truncations():
    from vqabench.events import RunStarted
    from vqabench.report import data_summary, data_table, markdown_table

    quality = {
        "rows_read": 1200,
        "pairs_built": 1180,
        "skipped": {"missing_image": 15, "rating_tie": 5},
        "skipped_total": 20,
        "token_stats": {
            "max_answer_tokens": 87,
            "max_answer_tokens_setting": "auto",
            "truncated": 9,
            "p50": 41,
            "p99": 87,
            "max": 140,
        },
        "warnings": [
            "9 of 10 answers (90%) are longer than max_answer_tokens = 87 and are cut; "
            "raise max_answer_tokens (up to 510)."
        ],
    }

    def started(name: str) -> RunStarted:
        return RunStarted(name, "sft", {}, "cpu", "2", 1, 2, None, 0, 1, 1, "n/a", data={"quality": quality})

    runs = [
        RunData("sft@s0", "sft", "done", started=started("sft@s0")),
        RunData("sft@s1", "sft", "done", started=started("sft@s1")),
    ]
    table = data_table(runs)
    assert table is not None and table.title == "Data"
    assert table.rows == [
        ["sft", "1,200", "1,180", "20 (missing_image 15, rating_tie 5)", "41", "87", "140", "87 (auto)", "9"]
    ]
    assert table.columns[-1] == "Truncated"
    assert any(note.startswith("sft: 9 of 10 answers") for note in table.notes)
    assert "| Truncated |" in markdown_table(table)[0]
    assert data_summary(runs[0].started) == (
        "data: 1,200 rows read, 1,180 pairs, 20 (missing_image 15, rating_tie 5) skipped; answer tokens p50 41, "
        "p99 87, max 140; answer limit 87 (auto); 9 answers truncated"
    )
    assert data_table([RunData("x", "sft", "failed")]) is None  # no run_started: no table


def _timed_epoch(epoch: int, seconds: float, step_ms: list[float], load: float | None = 1.0, cores: int = 2):
    from vqabench.events import EpochEnded

    return EpochEnded(
        epoch=epoch, epochs=4, train_loss=1.0, eval_loss=1.0, epoch_seconds=seconds, eval_seconds=0.1,
        samples_per_s=10.0, lr=1e-5, peak_rss_mib=500.0, reference_bytes=0, chosen_logp=-1.0, rejected_logp=-2.0,
        reward_margin=1.0, pref_accuracy=0.6, is_best=epoch == 4, step_ms=step_ms,
        step_ms_median=sorted(step_ms)[len(step_ms) // 2], step_ms_p10=min(step_ms), step_ms_p90=max(step_ms),
        load_avg_max=load, cores=cores,
    )  # fmt: skip


def test_epoch_times_show_their_spread_warmup_and_a_bootstrap_interval_against_sft():
    from vqabench.report import RunData, efficiency_table, epoch_table, summarize_runs

    rng = np.random.default_rng(0)

    def steps(mean: float) -> list[float]:
        return [float(x) for x in rng.normal(mean, mean * 0.05, 50)]

    sft = RunData("sft", "sft", "done", setup="s", epochs=[
        _timed_epoch(1, 12.5, steps(60)), _timed_epoch(2, 9.3, steps(50)), _timed_epoch(3, 8.9, steps(50)),
        _timed_epoch(4, 9.4, steps(50))])  # fmt: skip
    dpo = RunData("dpo", "dpo", "done", setup="s", epochs=[_timed_epoch(e, 14.0, steps(75)) for e in (1, 2, 3, 4)])
    summaries = {s.name: s for s in summarize_runs([sft, dpo])}
    assert summaries["sft"].warmup_seconds == 12.5 and summaries["sft"].epoch_seconds == 9.3
    table = efficiency_table(list(summaries.values()))
    rows = {row[0]: row for row in table.rows}
    assert rows["sft"][1:3] == ["9.30 s ± 0.26 (8.90 … 9.40)", "12.50"]
    ratio, low, high = (float(x) for x in rows["dpo"][3].replace("[", "").replace(",", "").replace("]", "").split())
    assert low < 1.5 < high and high - low < 0.1 and ratio == pytest.approx(1.5, abs=0.03)
    assert not any("timing disturbed" in note for note in table.notes)  # CV 3%, load 1 on 2 cores
    step_column = epoch_table(sft).columns.index("Step [ms] median (p10 … p90)")
    assert epoch_table(sft).rows[0][step_column].count("…") == 1


def test_a_disturbed_timing_is_flagged_in_one_sentence():
    from vqabench.report import RunData, efficiency_table, summarize_runs

    epochs = [_timed_epoch(1, 10.0, [50.0]), _timed_epoch(2, 9.0, [50.0]), _timed_epoch(3, 13.0, [50.0], load=3.4)]
    noisy = RunData("orpo", "orpo", "done", setup="s", epochs=epochs)
    [summary] = summarize_runs([noisy])
    assert summary.timing_warning == (
        "orpo: timing disturbed: its epoch times vary by 26% (coefficient of variation, over 2 epochs) and the "
        "1-minute load average reached 3.4 on the 2 cores it used; compare costs with 'vqabench probe', which "
        "interleaves the methods on the same batches."
    )
    assert summary.timing_warning in efficiency_table([summary]).notes
    calm = RunData("sft", "sft", "done", setup="s", epochs=[_timed_epoch(1, 10.0, [50.0], load=1.9)])
    assert summarize_runs([calm])[0].timing_warning is None


def test_a_lora_run_is_compared_with_the_lora_sft_of_its_setup_not_the_full_decoder_sft(tmp_path):
    store = ResultsStore(tmp_path)
    session = store.begin_session("mixed")
    specs = [
        RunSpec(name="sft", method="sft"),
        RunSpec(name="lora-sft", method="sft", train="lora"),
        RunSpec(name="lora-dpo", method="dpo", train="lora", after="lora-sft"),
        RunSpec(name="orpo-bf16", method="orpo", precision="bf16"),
    ]
    record(store, session, specs)
    report = build_report(store, session.id)
    efficiency = {row[0]: row for row in report.tables[1].rows}
    assert efficiency["lora-sft"][3] == "1.00"  # the LoRA baseline itself, not a ratio to the full `sft`
    assert efficiency["orpo-bf16"][3] == "n/a"  # no bf16 SFT run in this session
    setups = {run.name: run.setup for run in report.runs}  # the Versus SFT table pairs runs by the same setup
    assert setups["lora-dpo"] == setups["lora-sft"] != setups["sft"] != setups["orpo-bf16"]


def test_an_interval_that_reaches_one_for_a_method_doing_more_work_is_flagged_noisy_not_a_finding():
    from vqabench.report import NOISY_NOTE, RunData, efficiency_table, summarize_runs

    rng = np.random.default_rng(5)

    def epochs(mean: float, spread: float) -> list:
        return [_timed_epoch(e, 10.0, [float(x) for x in rng.normal(mean, mean * spread, 40)]) for e in (1, 2, 3, 4)]

    sft = RunData("sft", "sft", "done", setup="s", epochs=epochs(50, 0.02))
    rows = {}
    for name, method, mean in (("orpo", "orpo", 52), ("sft-lr2", "sft", 50), ("dpo", "dpo", 75)):
        run = RunData(name, method, "done", setup="s", epochs=epochs(mean, 0.02))
        run.epochs[2] = _timed_epoch(3, 10.0, [mean * 1.3] * 40)  # one epoch that another process slowed down
        rows[name] = run
    table = efficiency_table(summarize_runs([sft, *rows.values()]))
    cells = {row[0]: row[3] for row in table.rows}
    assert cells["orpo"].endswith(" noisy") and "[" in cells["orpo"]  # ORPO scores the rejected answer too
    assert not cells["sft-lr2"].endswith("noisy")  # the same work as SFT: an interval around 1 is expected
    assert not cells["dpo"].endswith("noisy")  # clearly above 1
    assert NOISY_NOTE in table.notes


def test_the_methods_flagged_for_doing_more_work_than_sft_are_those_that_score_rejected_answers():
    from vqabench.objectives import OBJECTIVE_INPUTS
    from vqabench.report import MORE_WORK_THAN_SFT

    assert {m for m, needs in OBJECTIVE_INPUTS.items() if needs.needs_rejected} == MORE_WORK_THAN_SFT


def test_the_starting_model_is_a_base_row_in_quality_and_versus_sft(tmp_path):
    import json as _json

    from vqabench.events import Evaluated
    from vqabench.report import RunData, quality_table, summarize_runs, versus_sft_table

    def scores(name: str, split: str, ems: list[int]) -> Evaluated:
        path = tmp_path / f"{name}-{split}.jsonl"
        rows = [{"question": f"q{i}", "reference": "r", "prediction": "p", "em": e, "f1": e} for i, e in enumerate(ems)]
        path.write_text("".join(_json.dumps(r) + "\n" for r in rows))
        n = len(ems)
        extra = {"em_ci": [0.2, 0.4], "f1_ci": [0.21, 0.41]}
        return Evaluated(split=split, n=n, em=sum(ems) / n, f1=sum(ems) / n, predictions=str(path), extra=extra)

    setup = "embedded on easyvqa"
    sft = RunData("sft", "sft", "done", final_eval=scores("sft", "test", [1] * 60 + [0] * 40), setup=setup)
    orpo = RunData("orpo", "orpo", "done", final_eval=scores("orpo", "test", [1] * 70 + [0] * 30), setup=setup)
    orpo.base_eval = scores("orpo", "base", [1] * 30 + [0] * 70)  # orpo ran first and scored the start model
    runs = [orpo, sft]
    quality = quality_table(summarize_runs(runs), runs)
    assert [row[0] for row in quality.rows] == ["base", "orpo", "sft"]
    assert quality.rows[0][2] == "0.300 [0.200, 0.400]" and quality.rows[0][-1] == "–"
    assert any(note.startswith("base: the starting model") for note in quality.notes)
    versus = versus_sft_table(runs)
    assert versus is not None and [row[0] for row in versus.rows] == ["base", "orpo"]
    base_row = versus.rows[0]
    # 30 questions SFT got right and the starting model did not, none the other way
    assert base_row[1] == "sft" and base_row[2].startswith("-0.300 [") and base_row[3] == "< 0.001"
    assert any("what SFT gained" in note for note in versus.notes)
    # no base scores: no base row, never a made-up one
    orpo.base_eval = None
    assert [row[0] for row in quality_table(summarize_runs(runs), runs).rows] == ["orpo", "sft"]
    assert [row[0] for row in versus_sft_table(runs).rows] == ["orpo"]


def test_the_model_column_names_each_runs_family_and_size(tmp_path):
    from vqabench.events import RunStarted
    from vqabench.report import model_label

    store, session_id = paper_like_session(tmp_path)
    report = build_report(store, session_id)
    for table in report.tables[:2]:
        column = table.columns.index("Model")
        assert table.align[column] == "left"
        assert {row[0]: row[column] for row in table.rows} == dict.fromkeys(
            ["orpo", "sft", "dpo-beta0.1", "dpo-beta0.5"],
            "blip 1.50M",  # canned total_params 1,500,000
        )
    family = {"model_family": "qwen2-vl"}
    started = RunStarted("r", "sft", {}, "cpu", "2", 1, 212_480, None, 0, 1, 1, "n/a", data=family)
    assert model_label(started) == "qwen2-vl 0.21M"
    started.total_params, started.data = 2_208_985_600, {}  # recorded before runs named their family
    assert model_label(started) == "2.21B" and model_label(None) is None


def test_in_a_tune_session_the_tuned_sft_is_the_baseline_and_no_trial_is_an_aligned_model():
    from vqabench.events import RunFinished
    from vqabench.report import RunData, summarize_runs
    from vqabench.tui.state import cheapest_alignment

    def run(name: str, method: str, seconds: float, trial: bool) -> RunData:
        epochs = [_timed_epoch(1, seconds, [seconds * 100.0] * 10)]
        spec = {"score_test": False} if trial else {}
        finished = RunFinished(
            best_epoch=1, best_eval_loss=1.0, checkpoint="c", total_seconds=seconds, train_seconds=seconds
        )
        return RunData(name, method, "done", setup="s", epochs=epochs, spec=spec, finished=finished)

    # the first SFT in the store is a trial, twice as fast as the tuned SFT the aligned runs are judged against
    runs = [run("sft.trial0", "sft", 5.0, True), run("orpo.trial0", "orpo", 1.0, True)]
    runs += [run("sft.tuned", "sft", 10.0, False), run("orpo.tuned", "orpo", 12.0, False)]
    rows = {s.name: s for s in summarize_runs(runs)}
    assert rows["orpo.tuned"].relative_epoch_time == pytest.approx(1.2)
    assert rows["sft.tuned"].relative_epoch_time == pytest.approx(1.0)
    assert rows["orpo.trial0"].trial and not rows["orpo.tuned"].trial
    assert cheapest_alignment(list(rows.values())).startswith("Cheapest aligned model: orpo.tuned,")
