"""The runner, driving real subprocesses (tests/fake_worker.py) through crashes and cancels."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_worker import process_alive, worker_cmd

from vqabench.events import EpochEnded, RunStarted
from vqabench.presets import order_runs
from vqabench.runner import (
    InvalidWorkerLine,
    Runner,
    RunnerFinished,
    RunQueued,
    RunStatusChanged,
    WorkerEvent,
    WorkerStderr,
    default_worker_cmd,
)
from vqabench.spec import DatasetSpec, RunSpec
from vqabench.store import ResultsStore

SPECS = [
    RunSpec(name="sft", method="sft", epochs=2),
    RunSpec(name="dpo", method="dpo", after="sft", epochs=2),
    RunSpec(name="orpo", method="orpo", epochs=2),
]


def make_runner(tmp_path: Path, plan: dict, specs=SPECS, **kwargs) -> tuple[Runner, list]:
    runner = Runner(
        specs,
        runs_dir=tmp_path / "runs",
        session="s1",
        worker_cmd=worker_cmd(tmp_path, plan),
        cache_dir=tmp_path / "cache",
        **kwargs,
    )
    notes: list = []
    runner.subscribe(notes.append)
    return runner, notes


def statuses(runner: Runner) -> dict[str, str]:
    return {name: state.status for name, state in runner.states.items()}


async def wait_for_file(path: Path, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return json.loads(path.read_text())
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_runs_go_in_dependency_order_and_dpo_starts_from_the_sft_checkpoint(tmp_path):
    runner, notes = make_runner(tmp_path, {})
    asyncio.run(runner.run())
    assert statuses(runner) == {"sft": "done", "dpo": "done", "orpo": "done"}
    assert runner.all_done
    assert [n.run for n in notes if isinstance(n, RunQueued)] == ["orpo", "sft", "dpo"]
    started = [n.run for n in notes if isinstance(n, RunStatusChanged) and n.status == "running"]
    assert started == ["orpo", "sft", "dpo"]
    sft_checkpoint = runner.states["sft"].checkpoint
    assert sft_checkpoint == str(tmp_path / "runs" / "s1-sft" / "best")
    written = json.loads((tmp_path / "runs" / "s1-dpo" / "spec.json").read_text())
    assert written["init_checkpoint"] == sft_checkpoint
    assert written["output_dir"] == str(tmp_path / "runs" / "s1-dpo")
    assert written["cache_dir"] == str(tmp_path / "cache")
    epochs = [
        n.event.epoch
        for n in notes
        if isinstance(n, WorkerEvent) and n.run == "sft" and isinstance(n.event, EpochEnded)
    ]
    assert epochs == [1, 2]
    assert isinstance(notes[-1], RunnerFinished) and not notes[-1].cancelled


def test_a_killed_worker_fails_its_run_skips_dependants_and_keeps_its_epochs(tmp_path):
    plan = {"runs": {"sft": {"crash_in_epoch": 2, "stderr": ["loading data"]}}}
    runner, _ = make_runner(tmp_path, plan)
    store = ResultsStore(tmp_path / "results")
    session = store.begin_session("test")
    runner.subscribe(store.recorder(session))
    asyncio.run(runner.run())
    assert statuses(runner) == {"orpo": "done", "sft": "failed", "dpo": "skipped"}
    reason = runner.states["sft"].reason
    assert reason.startswith("worker exited with signal 9 (killed) during epoch 2 of 2")
    assert "fake worker: crashing in epoch 2" in reason
    assert runner.states["dpo"].reason == "skipped: sft failed"
    assert list(runner.states["sft"].stderr_tail) == ["loading data", "fake worker: crashing in epoch 2"]
    runs = {r.name: r for r in store.runs(session.id)}
    assert [e.epoch for e in store.epochs(runs["sft"].id)] == [1]  # the completed epoch survived
    assert runs["sft"].status == "failed" and runs["sft"].reason == reason
    assert runs["sft"].exit_code == -9
    assert [e.epoch for e in store.epochs(runs["orpo"].id)] == [1, 2]
    assert store.last_session().status == "failed"


def test_a_nonzero_exit_and_a_run_failed_event_give_one_sentence(tmp_path):
    plan = {"runs": {"sft": {"crash_in_epoch": 1, "crash_code": 3}, "orpo": {"fail_in_epoch": 2}}}
    runner, _ = make_runner(tmp_path, plan)
    asyncio.run(runner.run())
    assert runner.states["sft"].reason.startswith("worker exited with code 3 during epoch 1 of 2")
    assert runner.states["orpo"].status == "failed"
    assert runner.states["orpo"].reason == "the loss became NaN in epoch 2."


def test_lines_that_are_not_events_are_counted_and_skipped(tmp_path):
    runner, notes = make_runner(tmp_path, {"runs": {"orpo": {"garbage_lines": 3}}}, specs=SPECS[2:])
    asyncio.run(runner.run())
    assert runner.states["orpo"].status == "done"
    assert runner.states["orpo"].invalid_lines == 3
    assert [n.line for n in notes if isinstance(n, InvalidWorkerLine)] == [
        "not an event 0",
        "not an event 1",
        "not an event 2",
    ]


def test_stderr_lines_reach_subscribers(tmp_path):
    runner, notes = make_runner(tmp_path, {"default": {"stderr": ["one", "two"]}}, specs=SPECS[:1])
    asyncio.run(runner.run())
    assert [n.line for n in notes if isinstance(n, WorkerStderr)] == ["one", "two"]


def test_cancel_terminates_the_worker_and_its_grandchild_and_cancels_the_queue(tmp_path):
    runner, notes = make_runner(tmp_path, {"runs": {"orpo": {"hang_in_epoch": 1}}})

    async def scenario() -> dict:
        task = asyncio.ensure_future(runner.run())
        pids = await wait_for_file(tmp_path / "runs" / "s1-orpo" / "pids.json")
        runner.cancel()
        await task
        return pids

    pids = asyncio.run(scenario())
    assert not process_alive(pids["worker"]) and not process_alive(pids["grandchild"])
    assert statuses(runner) == {"orpo": "cancelled", "sft": "cancelled", "dpo": "cancelled"}
    assert runner.states["orpo"].reason == "cancelled during epoch 1 of 2"
    assert runner.states["orpo"].exit_code == -15  # SIGTERM was enough
    assert notes[-1].cancelled


def test_a_worker_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path):
    plan = {"runs": {"orpo": {"hang_in_epoch": 1, "ignore_sigterm": True}}}
    runner, _ = make_runner(tmp_path, plan, specs=SPECS[2:], grace_seconds=0.5)

    async def scenario() -> tuple[dict, float]:
        task = asyncio.ensure_future(runner.run())
        pids = await wait_for_file(tmp_path / "runs" / "s1-orpo" / "pids.json")
        start = time.monotonic()
        runner.cancel("orpo")
        await task
        return pids, time.monotonic() - start

    pids, waited = asyncio.run(scenario())
    assert 0.4 < waited < 5
    assert runner.states["orpo"].exit_code == -9
    assert not process_alive(pids["worker"]) and not process_alive(pids["grandchild"])


def test_cancelling_one_run_skips_its_dependants_and_the_rest_go_on(tmp_path):
    runner, _ = make_runner(tmp_path, {"runs": {"sft": {"hang_in_epoch": 2}}})

    async def scenario() -> None:
        task = asyncio.ensure_future(runner.run())
        await wait_for_file(tmp_path / "runs" / "s1-sft" / "pids.json")
        runner.cancel("sft")
        await task

    asyncio.run(scenario())
    assert statuses(runner) == {"orpo": "done", "sft": "cancelled", "dpo": "skipped"}
    assert runner.states["dpo"].reason == "skipped: sft cancelled"
    assert runner.states["sft"].reason == "cancelled during epoch 2 of 2"


def test_cancel_from_another_thread_and_of_a_queued_run(tmp_path):
    runner, _ = make_runner(tmp_path, {"runs": {"orpo": {"hang_in_epoch": 1}}})

    async def scenario() -> None:
        task = asyncio.ensure_future(runner.run())
        await wait_for_file(tmp_path / "runs" / "s1-orpo" / "pids.json")
        runner.cancel("sft")  # queued: cancelled at once, its dependant skipped later
        assert runner.states["sft"].status == "cancelled"
        thread = threading.Thread(target=runner.cancel, args=("orpo",))
        thread.start()
        thread.join()
        await task

    asyncio.run(scenario())
    assert statuses(runner) == {"orpo": "cancelled", "sft": "cancelled", "dpo": "skipped"}
    assert runner.states["sft"].reason == "cancelled before it started"


def test_cancelling_the_task_that_runs_the_runner_leaves_no_process(tmp_path):
    runner, _ = make_runner(tmp_path, {"runs": {"orpo": {"hang_in_epoch": 1}}})

    async def scenario() -> dict:
        task = asyncio.ensure_future(runner.run())
        pids = await wait_for_file(tmp_path / "runs" / "s1-orpo" / "pids.json")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pids

    pids = asyncio.run(scenario())
    assert not process_alive(pids["worker"]) and not process_alive(pids["grandchild"])
    assert set(statuses(runner).values()) == {"cancelled"}


def test_a_worker_that_cannot_start_fails_its_run(tmp_path):
    runner = Runner(SPECS[:1], runs_dir=tmp_path / "runs", worker_cmd=[str(tmp_path / "no-such-worker")])
    asyncio.run(runner.run())
    assert runner.states["sft"].status == "failed"
    assert runner.states["sft"].reason.startswith("the worker could not start:")


def test_a_failing_subscriber_does_not_stop_the_runs(tmp_path):
    runner, notes = make_runner(tmp_path, {}, specs=SPECS[:1])

    def broken(note: object) -> None:
        raise RuntimeError("subscriber bug")

    runner.subscribe(broken)
    asyncio.run(runner.run())
    assert runner.states["sft"].status == "done"
    assert any(isinstance(n, WorkerEvent) and isinstance(n.event, RunStarted) for n in notes)


def test_the_worker_gets_this_vqabench_on_its_import_path(tmp_path):
    runner, _ = make_runner(tmp_path, {}, specs=SPECS[:1], env={"PYTHONPATH": "/elsewhere"})
    repo = str(Path(__file__).resolve().parent.parent)
    assert runner._env["PYTHONPATH"].split(":")[:2] == [repo, "/elsewhere"]
    assert default_worker_cmd() == [sys.executable, "-m", "vqabench.engine.worker"]
    asyncio.run(runner.run())
    assert runner.states["sft"].status == "done"


def test_a_run_whose_after_is_elsewhere_keeps_the_checkpoint_it_was_given(tmp_path):
    spec = RunSpec(name="dpo", method="dpo", after="sft-of-last-week", init_checkpoint="/ckpt/sft", epochs=1)
    runner, _ = make_runner(tmp_path, {}, specs=[spec])
    asyncio.run(runner.run())
    assert runner.states["dpo"].status == "done"
    written = json.loads((tmp_path / "runs" / "s1-dpo" / "spec.json").read_text())
    assert written["init_checkpoint"] == "/ckpt/sft"


def test_a_store_that_stays_locked_fails_the_run_loudly_naming_the_database(tmp_path):
    import sqlite3

    from vqabench.store import ResultsStore

    store = ResultsStore(tmp_path / "results", busy_timeout=0.05, write_attempts=3, write_backoff=0.01)
    session = store.begin_session("sft,orpo")
    runner, _ = make_runner(tmp_path, {"default": {"epochs": 3}}, specs=[SPECS[0], SPECS[2]])
    blocker = sqlite3.connect(store.path, isolation_level=None)

    def lock_after_first_epoch(note: object) -> None:  # another process takes the write lock mid-run
        if isinstance(note, WorkerEvent) and isinstance(note.event, EpochEnded) and not blocker.in_transaction:
            blocker.execute("BEGIN IMMEDIATE")

    runner.subscribe(lock_after_first_epoch)
    runner.subscribe(store.recorder(session))
    asyncio.run(runner.run())
    blocker.execute("ROLLBACK")
    first, second = (runner.states[s.name] for s in runner.specs)
    assert first.status == "failed" and str(store.path) in first.reason
    assert "locked after 3 attempts" in first.reason and first.reason == runner.fatal
    assert second.status == "cancelled" and second.reason.startswith("not started: cannot write to the results store")
    run = next(r for r in store.runs(session.id) if r.name == first.name)
    assert store.epochs(run.id) == []  # epoch 1 itself could not be written, and nothing pretends it was


def test_runs_on_two_gpus_overlap_while_dpo_waits_for_its_sft(tmp_path):
    # Two fake devices: nothing here touches a GPU, the runner only hands out CUDA_VISIBLE_DEVICES.
    specs = [s.replace(gpus=[0, 1]) for s in SPECS]
    plan = {"default": {"epoch_sleep": 0.6, "record_env": True}}
    runner, notes = make_runner(tmp_path, plan, specs=specs, gpus=[0, 1])
    asyncio.run(runner.run())
    assert statuses(runner) == {"sft": "done", "dpo": "done", "orpo": "done"}
    record = {n: json.loads((Path(s.spec.output_dir) / "env.json").read_text()) for n, s in runner.states.items()}
    assert {record["sft"]["CUDA_VISIBLE_DEVICES"], record["orpo"]["CUDA_VISIBLE_DEVICES"]} == {"0", "1"}
    sft, orpo, dpo = record["sft"], record["orpo"], record["dpo"]
    assert max(sft["start"], orpo["start"]) < min(sft["end"], orpo["end"])  # the two independent runs overlap
    assert dpo["start"] >= sft["end"]  # ... and DPO still waits for its SFT
    devices = {n.run: n.device for n in notes if isinstance(n, RunStatusChanged) and n.status == "running"}
    assert sorted(devices.values()) == ["GPU 0", "GPU 0", "GPU 1"] or sorted(devices.values()) == [
        "GPU 0",
        "GPU 1",
        "GPU 1",
    ]
    assert devices[runner.states["sft"].name] == f"GPU {record['sft']['CUDA_VISIBLE_DEVICES']}"


def test_on_the_cpu_runs_stay_sequential_unless_parallel_says_otherwise(tmp_path):
    plan = {"default": {"epoch_sleep": 0.4, "record_env": True}}
    specs = [RunSpec(name="a", method="sft", epochs=2), RunSpec(name="b", method="orpo", epochs=2)]

    def spans(runner: Runner) -> list[tuple[float, float]]:
        out = []
        for state in runner.states.values():
            record = json.loads((Path(state.spec.output_dir) / "env.json").read_text())
            out.append((record["start"], record["end"]))
            assert record["CUDA_VISIBLE_DEVICES"] == os.environ.get("CUDA_VISIBLE_DEVICES")  # no GPU handed out
        return sorted(out)

    for folder in ("seq", "par"):
        (tmp_path / folder).mkdir()
    sequential, _ = make_runner(tmp_path / "seq", plan, specs=specs, gpus=[])
    asyncio.run(sequential.run())
    (a_start, a_end), (b_start, _) = spans(sequential)
    assert b_start >= a_end
    assert all(s.spec.concurrent_runs == 1 for s in sequential.states.values())
    concurrent, _ = make_runner(tmp_path / "par", plan, specs=specs, gpus=[], parallel=2)
    asyncio.run(concurrent.run())
    (a_start, a_end), (b_start, b_end) = spans(concurrent)
    assert max(a_start, b_start) < min(a_end, b_end)
    assert all(s.spec.concurrent_runs == 2 for s in concurrent.states.values())  # the report says so


def test_cancelling_concurrent_runs_leaves_no_process(tmp_path):
    specs = [s.replace(gpus=[0, 1]) for s in SPECS]
    runner, _ = make_runner(tmp_path, {"default": {"hang_in_epoch": 1}}, specs=specs, gpus=[0, 1])

    async def scenario() -> list[dict]:
        task = asyncio.ensure_future(runner.run())
        pids = [await wait_for_file(tmp_path / "runs" / f"s1-{name}" / "pids.json") for name in ("sft", "orpo")]
        runner.cancel()
        await task
        return pids

    pids = asyncio.run(scenario())
    assert statuses(runner) == {"sft": "cancelled", "dpo": "cancelled", "orpo": "cancelled"}
    assert not [pid for p in pids for pid in p.values() if process_alive(pid)]


def test_the_starting_model_is_scored_once_per_session_by_the_first_run_that_starts_from_it(tmp_path):
    specs = [*SPECS, RunSpec(name="simpo", method="simpo", epochs=2), RunSpec(name="big", method="sft", limit=9)]
    specs.append(RunSpec(name="other-data", method="sft", epochs=2, dataset=DatasetSpec(test_size=10)))
    runner, notes = make_runner(tmp_path, {"default": {"base_event": True}}, specs=specs)
    asyncio.run(runner.run())
    written = {s.name: json.loads((tmp_path / "runs" / f"s1-{s.name}" / "spec.json").read_text()) for s in specs}
    started = [n.run for n in notes if isinstance(n, RunStatusChanged) and n.status == "running"]
    same_start = [name for name in started if name in ("sft", "orpo", "simpo", "big")]
    # the first of the four runs from the embedded start model on this test split scores it, and the one run
    # on another test split; dpo starts from sft's checkpoint
    assert {name for name, spec in written.items() if spec["score_base"]} == {same_start[0], "other-data"}


def test_when_the_run_asked_to_score_the_starting_model_dies_the_next_run_from_it_scores_it(tmp_path):
    specs = [RunSpec(name=m, method=m, epochs=2) for m in ("sft", "orpo", "simpo")]
    first, second, third = [s.name for s in order_runs(specs)]
    plan = {"default": {"base_event": True}, "runs": {first: {"crash_in_epoch": 1}}}
    runner, _ = make_runner(tmp_path, plan, specs=specs)
    asyncio.run(runner.run())
    written = {s.name: json.loads((tmp_path / "runs" / f"s1-{s.name}" / "spec.json").read_text()) for s in specs}
    assert statuses(runner) == {first: "failed", second: "done", third: "done"}
    # the first run is killed before it reports the base scores: the second is asked instead, and once it
    # has reported them the third is not
    assert [written[name]["score_base"] for name in (first, second, third)] == [True, True, False]
