"""The worker end to end in real subprocesses: every method, the event stream, clear failures."""

from __future__ import annotations

import pytest
from conftest import of_type, run_worker, tiny_spec

from vqabench import events as ev


@pytest.fixture(scope="module")
def sft_run(vqa_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    events, rc, err = run_worker(tiny_spec("sft", "sft", epochs=2), tmp, vqa_cache)
    assert rc == 0, err[-2000:]
    return events


def _check_stream(events: list, epochs: int) -> None:
    assert isinstance(events[0], (ev.RunStarted, ev.Progress, ev.EncoderCached))
    started = of_type(events, ev.RunStarted)
    assert len(started) == 1
    ends = of_type(events, ev.EpochEnded)
    assert [e.epoch for e in ends] == list(range(1, epochs + 1))
    assert isinstance(events[-1], ev.RunFinished) and isinstance(events[-2], ev.Evaluated)
    for e in ends:
        assert e.epoch_seconds > 0 and e.samples_per_s > 0 and e.peak_rss_mib > 0
        assert 0.0 <= e.pref_accuracy <= 1.0
        assert e.cuda_max_allocated_mib is None and e.gpu_process_peak_mib is None  # no GPU: None, not 0
        steps = started[0].steps_per_epoch
        assert e.step_ms is not None and len(e.step_ms) == steps and min(e.step_ms) > 0  # every step timed
        assert e.step_ms_p10 <= e.step_ms_median <= e.step_ms_p90
        assert sum(e.step_ms) / 1000 == pytest.approx(e.epoch_seconds, rel=0.05)  # the steps are the epoch
        assert e.cores >= 1 and (e.load_avg_max is None or e.load_avg_max >= 0)
    final = of_type(events, ev.Evaluated)[0]
    assert final.n == 32 and 0.0 <= final.em <= 1.0 and final.judge == "exact"


def test_sft_runs_end_to_end_and_every_stdout_line_is_an_event(sft_run):
    _check_stream(sft_run, epochs=2)
    started = of_type(sft_run, ev.RunStarted)[0]
    assert started.telemetry.startswith("n/a")
    assert 0 < started.trainable_params < started.total_params
    assert started.reference_strategy is None and started.reference_bytes == 0
    assert started.data["sizes"]["train"] == 64


@pytest.mark.parametrize(
    "method,reference",
    [
        ("dpo", "copy"),
        ("dpo", "precompute"),
        ("ipo", "copy"),
        ("kto", "precompute"),
    ],
)
def test_reference_methods_start_from_the_sft_checkpoint(method, reference, sft_run, vqa_cache, tmp_path):
    checkpoint = sft_run[-1].checkpoint
    events, rc, err = run_worker(
        tiny_spec(method, method, init_checkpoint=checkpoint, reference=reference), tmp_path, vqa_cache
    )
    assert rc == 0, err[-2000:]
    _check_stream(events, epochs=1)
    started = of_type(events, ev.RunStarted)[0]
    assert started.reference_strategy == reference
    if reference == "copy":
        assert started.reference_bytes == started.data["trainable_bytes"] > 0
    else:
        assert started.reference_bytes == 0
    assert all(e.reference_bytes == started.reference_bytes for e in of_type(events, ev.EpochEnded))


def test_auto_reference_precomputes_a_two_epoch_dpo_with_the_losses_of_the_copy(sft_run, vqa_cache, tmp_path):
    checkpoint = sft_run[-1].checkpoint
    runs = {}
    for reference in ("copy", "auto"):
        spec = tiny_spec(f"dpo-{reference}", "dpo", init_checkpoint=checkpoint, reference=reference, epochs=2)
        events, rc, err = run_worker(spec, tmp_path, vqa_cache)
        assert rc == 0, err[-2000:]
        runs[reference] = events
    started = of_type(runs["auto"], ev.RunStarted)[0]
    assert started.reference_strategy == "precompute" and started.reference_bytes == 0
    assert started.config["reference"] == "auto"
    assert started.data["reference_choice"] == {"asked": "auto", "chosen": "precompute", "why": "2 epochs, table fits"}
    assert started.data["reference_seconds"] is not None  # the one-off pass, charged to time to an aligned model
    assert of_type(runs["copy"], ev.RunStarted)[0].data["reference_choice"]["chosen"] == "copy"
    copy_epochs, auto_epochs = (of_type(runs[r], ev.EpochEnded) for r in ("copy", "auto"))
    assert len(copy_epochs) == len(auto_epochs) == 2
    for c, a in zip(copy_epochs, auto_epochs, strict=True):
        assert a.train_loss == pytest.approx(c.train_loss, abs=1e-6)
        assert a.eval_loss == pytest.approx(c.eval_loss, abs=1e-6)
        assert a.reward_margin == pytest.approx(c.reward_margin, abs=1e-5)  # the policies trained alike
    assert copy_epochs[0].train_loss != copy_epochs[1].train_loss  # the policy moved: not a trivial match


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_reference_free_methods_start_from_the_base(method, vqa_cache, tmp_path):
    events, rc, err = run_worker(tiny_spec(method, method), tmp_path, vqa_cache)
    assert rc == 0, err[-2000:]
    _check_stream(events, epochs=1)


def test_same_seed_on_cpu_gives_the_same_numbers(sft_run, vqa_cache, tmp_path):
    again, rc, _ = run_worker(tiny_spec("sft", "sft", epochs=2), tmp_path, vqa_cache)
    assert rc == 0
    first = [(e.train_loss, e.eval_loss, e.pref_accuracy) for e in of_type(sft_run, ev.EpochEnded)]
    second = [(e.train_loss, e.eval_loss, e.pref_accuracy) for e in of_type(again, ev.EpochEnded)]
    assert first == second
    other, _, _ = run_worker(tiny_spec("sft-s1", "sft", epochs=2, seed=1), tmp_path, vqa_cache)
    assert [e.train_loss for e in of_type(other, ev.EpochEnded)] != [t for t, _, _ in first]


def _failure(events: list, rc: int, stderr: str) -> ev.RunFailed:
    assert rc != 0
    failed = of_type(events, ev.RunFailed)
    assert len(failed) == 1 and events[-1] is failed[0]
    assert "\n" not in failed[0].message and failed[0].message.endswith((".", ")"))
    # An explained failure is its sentence: the worker's log (shown under a failed run) holds it
    # without a stack trace, which stays in the event for the store.
    assert failed[0].message in stderr and "Traceback" not in stderr and 'File "' not in stderr, stderr
    assert "Traceback" in failed[0].traceback
    return failed[0]


def test_unknown_method_fails_with_one_sentence(vqa_cache, tmp_path):
    f = _failure(*run_worker(tiny_spec("x", "rlhf"), tmp_path, vqa_cache))
    assert f.error_kind == "config" and "'rlhf'" in f.message and "sft" in f.message


def test_dpo_without_an_sft_checkpoint_fails_with_one_sentence(vqa_cache, tmp_path):
    f = _failure(*run_worker(tiny_spec("dpo", "dpo"), tmp_path, vqa_cache))
    assert f.error_kind == "config" and "after" in f.message


def test_dpo_with_a_missing_checkpoint_folder_fails_with_one_sentence(vqa_cache, tmp_path):
    spec = tiny_spec("dpo", "dpo", init_checkpoint=str(tmp_path / "nowhere"))
    f = _failure(*run_worker(spec, tmp_path, vqa_cache))
    assert f.error_kind == "model" and "nowhere" in f.message


def test_non_finite_loss_stops_and_names_epoch_and_step(vqa_cache, tmp_path):
    f = _failure(*run_worker(tiny_spec("nan", "orpo", lr=1e30), tmp_path, vqa_cache))
    assert f.error_kind == "numerics"
    assert "epoch 1, step" in f.message


def test_eval_every_epoch_streams_answer_scores_per_epoch(vqa_cache, tmp_path):
    events, rc, err = run_worker(tiny_spec("live", "sft", epochs=2, eval_every_epoch=8), tmp_path, vqa_cache)
    assert rc == 0, err[-2000:]
    for e in of_type(events, ev.EpochEnded):
        assert e.scored_n == 8 and 0.0 <= e.em <= 1.0 and 0.0 <= e.f1 <= 1.0
        assert e.judge_score is not None


def test_a_judge_outage_keeps_the_answers_and_the_run(sft_run, vqa_cache, tmp_path):
    # A Together judge pointed at a port where nothing listens: every attempt fails.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = tiny_spec(
        "outage",
        "sft",
        judge={"name": "together", "base_url": f"http://127.0.0.1:{port}", "max_attempts": 2, "timeout_s": 2.0},
    )
    import os

    os.environ["TOGETHER_API_KEY"] = "test-key"
    try:
        events, rc, err = run_worker(spec, tmp_path, vqa_cache)
    finally:
        del os.environ["TOGETHER_API_KEY"]
    assert rc == 0, err[-2000:]
    final = of_type(events, ev.Evaluated)[0]
    assert final.judge_score is None and final.em >= 0.0 and "judge_error" in final.extra
    assert isinstance(events[-1], ev.RunFinished)
    assert (tmp_path / "out" / "outage" / "predictions.jsonl").is_file()
