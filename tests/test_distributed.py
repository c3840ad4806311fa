"""One run on several processes (torchrun + DDP, gloo on 2 CPU processes) and runs placed on devices."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import TINY
from fake_worker import canned_events, process_alive, worker_cmd

from vqabench import events as ev
from vqabench.engine.data.records import DataError
from vqabench.engine.distributed import (
    COLLECTIVE_TIMEOUT_ENV,
    NodePreparation,
    PreparationFailed,
    Ranks,
    arrive,
    collective_timeout,
)
from vqabench.launch import (
    VISIBLE_GPUS_ENV,
    DevicePool,
    check_launch,
    launch_command,
    torchrun_available,
    visible_gpus,
)
from vqabench.report import render_markdown
from vqabench.runner import DONE, FAILED, Runner, RunQueued, RunStatusChanged, WorkerEvent
from vqabench.spec import RunSpec, SpecError, spec_from_dict
from vqabench.store import ResultsStore

# -- rank bookkeeping and launch planning (no processes) ---------------------------------------


def test_shards_cover_every_row_once_in_order():
    for n in (0, 1, 7, 8, 33):
        rows = [i for rank in range(3) for i in Ranks(rank=rank, world_size=3).shard(n)]
        assert rows == list(range(n))


def test_batch_size_is_the_global_batch_and_must_divide():
    assert Ranks(world_size=4).per_device_batch(16) == 4
    with pytest.raises(SpecError, match=r"key 'batch_size' has value 10, which 4 processes cannot split evenly"):
        Ranks(world_size=4).per_device_batch(10)
    with pytest.raises(SpecError) as info:
        spec_from_dict({"name": "sft", "method": "sft", "batch_size": 10, "nproc_per_node": 2, "nnodes": 2})
    message = str(info.value)
    assert "key 'batch_size' has value 10" in message and "multiple of 4" in message and message.count(".") <= 3


def test_a_multi_node_run_needs_a_rendezvous_endpoint_and_a_node_rank_below_nnodes():
    with pytest.raises(SpecError, match="needs 'rdzv_endpoint'"):
        spec_from_dict({"name": "sft", "method": "sft", "nnodes": 2})
    with pytest.raises(SpecError, match="key 'node_rank' has value 2"):
        spec_from_dict({"name": "sft", "method": "sft", "nnodes": 2, "node_rank": 2, "rdzv_endpoint": "n0:29500"})


def test_the_runner_builds_the_torchrun_command_line(tmp_path):
    worker = [sys.executable, "-m", "vqabench.engine.worker"]
    path = tmp_path / "spec.json"
    assert launch_command(RunSpec(name="a", method="sft"), worker, path) == [*worker, str(path)]
    one_node = launch_command(RunSpec(name="a", method="sft", nproc_per_node=2), worker, path)
    assert one_node[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    assert "--standalone" in one_node and one_node[-4:] == [*worker, str(path)]
    two_nodes = RunSpec(name="a", method="sft", nproc_per_node=4, nnodes=2, node_rank=1, rdzv_endpoint="n0:29500")
    command = launch_command(two_nodes, worker, path)
    assert {"--nnodes=2", "--node-rank=1", "--rdzv-endpoint=n0:29500", "--rdzv-backend=static"} <= set(command)
    assert "--standalone" not in command
    assert torchrun_available()  # torch in this environment ships torch.distributed.run


def test_bad_placements_are_refused_in_one_sentence():
    with pytest.raises(SpecError, match=r"names GPU 5, which does not exist; the visible GPUs are 0, 1\.$"):
        check_launch([RunSpec(name="sft", method="sft", gpus=[0, 5])], [0, 1])
    with pytest.raises(SpecError, match=r"names GPU 0, which does not exist; no GPU is visible"):
        check_launch([RunSpec(name="sft", method="sft", gpus=[0])], [])
    with pytest.raises(SpecError, match=r"'nproc_per_node' has value 4, but this machine has 2 visible GPU\(s\)"):
        check_launch([RunSpec(name="sft", method="sft", nproc_per_node=4, batch_size=16)], [0, 1])
    with pytest.raises(SpecError, match=r"'nproc_per_node' has value 2, but the run may use 1 GPU\(s\)"):
        check_launch([RunSpec(name="sft", method="sft", nproc_per_node=2, gpus=[1])], [0, 1])
    with pytest.raises(SpecError, match=r"torch.distributed.run is not installed for .*; install torch there"):
        check_launch([RunSpec(name="sft", method="sft", nproc_per_node=2)], [], has_torchrun=False)
    check_launch([RunSpec(name="sft", method="sft", nproc_per_node=2)], [], has_torchrun=True)  # gloo on CPU


def test_the_visible_gpus_are_injectable_for_machines_without_one():
    assert visible_gpus({VISIBLE_GPUS_ENV: "0,1"}) == [0, 1]
    assert visible_gpus({VISIBLE_GPUS_ENV: ""}) == []
    with pytest.raises(SpecError, match="comma list"):
        visible_gpus({VISIBLE_GPUS_ENV: "gpu0"})


def test_the_pool_gives_each_run_its_own_gpus_and_keeps_the_host_sequential():
    pool = DevicePool(parallel=1)
    a = pool.acquire(RunSpec(name="a", method="sft", gpus=[0, 1]))
    b = pool.acquire(RunSpec(name="b", method="sft", gpus=[0, 1]))
    assert a is not None and b is not None and a.gpus == (0,) and b.gpus == (1,)
    assert b.env()["CUDA_VISIBLE_DEVICES"] == "1"
    assert pool.acquire(RunSpec(name="c", method="sft", gpus=[0, 1])) is None
    pool.release(a)
    both = RunSpec(name="d", method="sft", gpus=[0, 1], nproc_per_node=2)
    assert pool.acquire(both) is None  # GPU 1 is still busy
    assert pool.acquire(RunSpec(name="cpu1", method="sft")) is not None
    assert pool.acquire(RunSpec(name="cpu2", method="sft")) is None  # CPU runs stay sequential


def test_the_report_states_processes_batches_and_concurrent_epoch_times(tmp_path):
    store = ResultsStore(tmp_path)
    session = store.begin_session("all", "vqabench --headless --parallel 2")
    recorder = store.recorder(session)
    specs = [
        RunSpec(name="sft", method="sft", nproc_per_node=2, batch_size=16),
        RunSpec(name="orpo", method="orpo", concurrent_runs=2),
    ]
    for position, spec in enumerate(specs):
        recorder(RunQueued(spec.name, spec, position))
    for spec in specs:
        recorder(RunStatusChanged(spec.name, "running", spec=spec, pid=1))
        for event in canned_events(spec.to_dict(), epochs=1):
            if isinstance(event, ev.RunStarted) and spec.nproc_per_node > 1:
                event = dataclasses.replace(event, world_size=2, backend="gloo", global_batch=16, per_device_batch=8)
            recorder(WorkerEvent(spec.name, event, ev.encode_event(event)))
        recorder(RunStatusChanged(spec.name, "done", exit_code=0))
    [started] = [r.started for r in store.runs(session.id) if r.name == "sft"]
    assert started is not None and (started.world_size, started.backend, started.per_device_batch) == (2, "gloo", 8)
    text = render_markdown(store, session.id)
    assert "sft on 2 processes (gloo), global batch 16 = 8 per process" in text
    assert "Epoch times were measured concurrently: up to 2 runs shared the host at once (--parallel 2; orpo)" in text
    # A run recorded before schema version 2 has NULL there: it reads back as one process.
    with store._transaction() as conn:
        conn.execute("UPDATE runs SET world_size = NULL, global_batch = NULL, per_device_batch = NULL")
    old = [r.started for r in store.runs(session.id)]
    assert all(s is not None and (s.world_size, s.per_device_batch) == (1, 0) for s in old)


# -- 2 processes against 1, through the real runner and torchrun ------------------------------


@pytest.fixture(scope="module")
def dropout_free_checkpoint(tmp_path_factory) -> Path:
    """The embedded model with dropout off, so 1 and 2 processes draw no random masks."""
    from vqabench.models import blip, checkpoints

    folder = tmp_path_factory.mktemp("no-dropout") / "checkpoint"
    loaded = blip.build_embedded(0)
    text = loaded.model.config.text_config
    text.hidden_dropout_prob = text.attention_probs_dropout_prob = 0.0
    checkpoints.save_checkpoint(loaded, folder)
    return folder


def tiny_run(name: str, checkpoint: Path, **changes) -> RunSpec:
    # 32 train pairs: divisible by 2 processes, so both see exactly the same samples (docs/distributed.md).
    data = {**TINY, "name": name, "method": "sft", "limit": 32, "batch_size": 8, "epochs": 2}
    data["dataset"] = {"eval_size": 16, "test_size": 16}
    data.update(init_checkpoint=str(checkpoint), **changes)
    return spec_from_dict(data)


def run_session(
    specs: list[RunSpec], tmp_path: Path, vqa_cache: Path, on_note=None, worker_cmd=None, env=None
) -> tuple[Runner, list]:
    runner = Runner(
        specs,
        runs_dir=tmp_path / "runs",
        session="d",
        cache_dir=vqa_cache,
        gpus=[],
        env={"OMP_NUM_THREADS": "1", **(env or {})},
        worker_cmd=worker_cmd,
    )
    notes: list = []
    runner.subscribe(notes.append)
    if on_note is not None:
        runner.subscribe(lambda note: on_note(runner, note))
    asyncio.run(asyncio.wait_for(runner.run(), 600))
    return runner, notes


def events_of(notes: list, run: str | None, cls: type) -> list:
    return [n.event for n in notes if isinstance(n, WorkerEvent) and run in (None, n.run) and isinstance(n.event, cls)]


def test_two_processes_give_the_losses_of_one_with_the_same_global_batch(dropout_free_checkpoint, tmp_path):
    # DPO with a precomputed reference: the sharded precompute pass, the pair step under DDP,
    # sharded eval and generation. Two caches, so each run computes its own reference.
    # KTO with a copy reference: its KL point is a mean over the global batch, so each rank's
    # share is summed over ranks, in training and in eval; 17 eval pairs leave rank 1 without a
    # row in the last eval batch.
    def runs(suffix: str, **more) -> list[RunSpec]:
        kto_data = {"eval_size": 17, "test_size": 16}
        return [
            tiny_run(f"dpo{suffix}", dropout_free_checkpoint, method="dpo", reference="precompute", **more),
            tiny_run(
                f"kto{suffix}", dropout_free_checkpoint, method="kto", dataset=kto_data, lr=1e-3, beta=1.0, **more
            ),
        ]

    first, notes = run_session(runs("1"), tmp_path / "1", tmp_path / "c1")
    second, more = run_session(runs("2", nproc_per_node=2), tmp_path / "2", tmp_path / "c2")
    notes += more
    for runner in (first, second):
        assert all(s.status == DONE for s in runner.states.values()), [
            (s.reason, "\n".join(s.stderr_tail)) for s in runner.states.values()
        ]
    assert len(list((tmp_path / "c2" / "reference").glob("*.pt"))) == 1  # written once, by rank 0
    for name in ("dpo1", "dpo2", "kto1", "kto2"):
        assert len(events_of(notes, name, ev.RunStarted)) == 1
        assert len(events_of(notes, name, ev.RunFinished)) == 1
    [started] = events_of(notes, "dpo2", ev.RunStarted)
    assert (started.world_size, started.backend, started.global_batch, started.per_device_batch) == (2, "gloo", 8, 4)
    dpo_started = events_of(notes, "dpo1", ev.RunStarted) + events_of(notes, "dpo2", ev.RunStarted)
    assert all(s.data["reference_seconds"] > 0 for s in dpo_started)  # none from a cache
    assert second.states["dpo2"].device == second.states["kto2"].device == "2 processes"
    for method in ("dpo", "kto"):
        one, two = events_of(notes, f"{method}1", ev.EpochEnded), events_of(notes, f"{method}2", ev.EpochEnded)
        assert len(one) == len(two) == 2
        for a, b in zip(one, two, strict=True):
            assert b.train_loss == pytest.approx(a.train_loss, abs=1e-4), method
            assert b.eval_loss == pytest.approx(a.eval_loss, abs=1e-4), method
            assert b.pref_accuracy == pytest.approx(a.pref_accuracy, abs=1e-6), method
            assert b.rank_peak_mib is not None and len(b.rank_peak_mib) == 2 and all(p > 0 for p in b.rank_peak_mib)
            assert b.rank_peak_max_mib == max(b.rank_peak_mib) and b.rank_peak_sum_mib == pytest.approx(
                sum(b.rank_peak_mib)
            )
        assert one[0].rank_peak_mib is None  # one process: no per-rank figures
    # Test generation is sharded and gathered: every test question answered once, in order.
    [test_one], [test_two] = events_of(notes, "dpo1", ev.Evaluated), events_of(notes, "dpo2", ev.Evaluated)
    assert test_two.n == test_one.n == 16 and test_two.em == test_one.em
    assert Path(test_two.predictions).read_text() == Path(test_one.predictions).read_text()


def test_a_causal_family_on_two_processes_gives_the_losses_of_one(tmp_path):
    # Qwen2-VL (M-RoPE positions, features cached before the projector, the shared prompt pass)
    # trains its language model under DDP: DPO with a copy reference, 1 process against 2, the
    # same global batch. Both DPO runs start from the one-process SFT's checkpoint.
    data = {**TINY, "model": "qwen2-vl-tiny-random", "train": "lm", "limit": 32, "batch_size": 8, "lr": 1e-3}
    data.update(dataset={"eval_size": 16, "test_size": 16})
    dpo = {**data, "method": "dpo", "reference": "copy"}
    sft = spec_from_dict({**data, "name": "sft1", "method": "sft"})
    first, notes = run_session(
        [sft, spec_from_dict({**dpo, "name": "dpo1", "after": "sft1"})], tmp_path / "1", tmp_path / "c1"
    )
    [sft_done] = events_of(notes, "sft1", ev.RunFinished)
    dpo2 = spec_from_dict({**dpo, "name": "dpo2", "init_checkpoint": sft_done.checkpoint, "nproc_per_node": 2})
    second, more = run_session([dpo2], tmp_path / "2", tmp_path / "c2")
    notes += more
    for runner in (first, second):
        assert all(s.status == DONE for s in runner.states.values()), [
            (s.reason, "\n".join(s.stderr_tail)) for s in runner.states.values()
        ]
    [started] = events_of(notes, "dpo2", ev.RunStarted)
    assert (started.world_size, started.global_batch, started.per_device_batch) == (2, 8, 4)
    assert started.data["model_family"] == "qwen2-vl"
    [one], [two] = events_of(notes, "dpo1", ev.EpochEnded), events_of(notes, "dpo2", ev.EpochEnded)
    assert two.train_loss == pytest.approx(one.train_loss, abs=1e-4)
    assert two.eval_loss == pytest.approx(one.eval_loss, abs=1e-4)
    assert one.eval_loss != pytest.approx(math.log(2), abs=1e-3)  # DPO moved off its start
    [test_one], [test_two] = events_of(notes, "dpo1", ev.Evaluated), events_of(notes, "dpo2", ev.Evaluated)
    assert Path(test_two.predictions).read_text() == Path(test_one.predictions).read_text()


def test_killing_one_rank_fails_the_run_in_one_sentence_and_keeps_its_epochs(
    dropout_free_checkpoint, vqa_cache, tmp_path
):
    seen: dict[str, list[int]] = {"ranks": []}

    def kill_rank_one(runner: Runner, note) -> None:
        if isinstance(note, WorkerEvent) and isinstance(note.event, ev.EpochEnded) and note.event.epoch == 1:
            ranks = worker_processes(runner.states["two"].pid)
            seen["ranks"] = ranks
            rank_one = next(pid for pid in ranks if _environ(pid).get("RANK") == "1")
            os.kill(rank_one, signal.SIGKILL)

    spec = tiny_run("two", dropout_free_checkpoint, nproc_per_node=2, epochs=20)
    runner, notes = run_session([spec], tmp_path, vqa_cache, on_note=kill_rank_one)
    state = runner.states["two"]
    assert state.status == FAILED, state.reason
    assert state.reason.startswith("rank 1 of 2 was killed by signal 9"), "\n".join(state.stderr_tail)
    assert state.reason.endswith(", so torchrun stopped the run.") and state.reason.count(". ") == 0  # one sentence
    assert state.epochs_done >= 1 and events_of(notes, "two", ev.EpochEnded)  # epochs already recorded stay
    assert len(seen["ranks"]) == 2
    assert not [pid for pid in [state.pid, *seen["ranks"]] if pid is not None and process_alive(pid)]
    assert [n.status for n in notes if isinstance(n, RunStatusChanged)] == ["running", "failed"]


def slow_preparation(seconds: float) -> list[str]:
    return [sys.executable, str(Path(__file__).with_name("slow_preparation_worker.py")), str(seconds)]


def test_ranks_wait_for_a_preparation_longer_than_the_collective_timeout(dropout_free_checkpoint, vqa_cache, tmp_path):
    # A 4-second collective timeout stands in for the 10 minutes; rank 0 prepares for 6 seconds
    # (the old barrier failed here with "Timed out waiting 4000ms for recv operation to complete").
    spec = tiny_run("two", dropout_free_checkpoint, nproc_per_node=2, epochs=1)
    runner, notes = run_session(
        [spec], tmp_path, vqa_cache, worker_cmd=slow_preparation(6), env={COLLECTIVE_TIMEOUT_ENV: "4"}
    )
    state = runner.states["two"]
    assert state.status == DONE, "\n".join(state.stderr_tail)
    assert len(events_of(notes, "two", ev.EpochEnded)) == 1 and len(events_of(notes, "two", ev.RunFinished)) == 1


def test_a_process_waiting_for_preparation_stops_with_the_reason_of_the_one_that_failed():
    import torch.distributed as dist

    store = dist.HashStore()  # stands in for the rendezvous store the ranks share
    first = NodePreparation(Ranks(rank=0, world_size=2, local_world_size=2, store=store), poll_seconds=0.01)
    other = NodePreparation(
        Ranks(rank=1, world_size=2, local_rank=1, local_world_size=2, store=store), poll_seconds=0.01
    )
    with pytest.raises(DataError), first:
        first.begin()
        raise DataError("the file 'train.jsonl' has no rows.")
    with pytest.raises(PreparationFailed) as info:
        other.begin()
    assert str(info.value) == "rank 0 failed while preparing the run: the file 'train.jsonl' has no rows."
    assert info.value.error_kind == "data"


def test_at_the_end_of_a_run_no_process_leaves_before_every_process_has_arrived():
    import threading

    import torch.distributed as dist

    store = dist.HashStore()  # stands in for the rendezvous store the ranks share
    left: list[int] = []

    def finish(rank: int) -> None:
        arrive(Ranks(rank=rank, world_size=2, local_rank=rank, local_world_size=2, store=store), poll_seconds=0.01)
        left.append(rank)

    other = threading.Thread(target=finish, args=(1,))
    other.start()  # rank 1 is done at the test answers' gather; rank 0 is still judging
    time.sleep(0.3)
    assert left == [] and other.is_alive()
    finish(0)
    other.join(timeout=5)
    assert sorted(left) == [0, 1]


def test_the_collective_timeout_is_ten_minutes_unless_the_environment_shortens_it():
    assert collective_timeout({}) == timedelta(minutes=10)
    assert collective_timeout({COLLECTIVE_TIMEOUT_ENV: "2.5"}) == timedelta(seconds=2.5)
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(SpecError, match=rf"\$VQABENCH_COLLECTIVE_TIMEOUT_S has value '{bad}'"):
            collective_timeout({COLLECTIVE_TIMEOUT_ENV: bad})


def worker_processes(root: int | None) -> list[int]:
    """Pids of the worker processes below torchrun (any depth), found through /proc."""
    assert root is not None
    found, todo = [], [root]
    while todo:
        parent = todo.pop()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == parent:
                todo.append(int(entry.name))
                if b"vqabench.engine.worker" in cmdline and b"torch.distributed.run" not in cmdline:
                    found.append(int(entry.name))
    return found


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)


# -- the command line ----------------------------------------------------------------------------


def cli(tmp_path: Path, *args: str, gpus: str = "") -> subprocess.CompletedProcess:
    from test_headless import cli_env

    return subprocess.run(
        [sys.executable, "-m", "vqabench.cli", "--headless", *args],
        cwd=tmp_path,
        env={**cli_env(tmp_path), VISIBLE_GPUS_ENV: gpus},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_headless_gpus_place_runs_on_fake_devices_and_log_them(tmp_path):
    from test_headless import fake

    proc = cli(tmp_path, "--preset", "sft,orpo", "--epochs", "1", "--gpus", "0,1", *fake(tmp_path, {}), gpus="0,1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[sft] running (pid" in proc.stdout and "on GPU " in proc.stdout
    placed = sorted(line.rsplit("on ", 1)[1] for line in proc.stdout.splitlines() if ", on GPU " in line)
    assert placed in (["GPU 0)", "GPU 0)"], ["GPU 0)", "GPU 1)"], ["GPU 1)", "GPU 1)"])


@pytest.mark.parametrize(
    "args, gpus, parts",
    [
        (["--gpus", "0,5"], "0,1", ["run 'sft': --gpus / key 'gpus' names GPU 5, which does not exist"]),
        (["--gpus", "0"], "", ["names GPU 0, which does not exist; no GPU is visible"]),
        (["--set", "nproc_per_node=3"], "", ["key 'batch_size' has value 16, which 3 processes"]),
        (["--set", "nproc_per_node=4"], "0,1", ["'nproc_per_node' has value 4, but this machine has 2 visible GPU(s)"]),
    ],
)
def test_bad_placement_is_one_sentence_and_exit_code_2_before_anything_runs(tmp_path, args, gpus, parts):
    from test_headless import assert_one_sentence_error, fake

    proc = cli(tmp_path, "--preset", "sft", *args, *fake(tmp_path, {}), gpus=gpus)
    assert_one_sentence_error(proc, *parts)
    assert not (tmp_path / "vqabench-results").exists()


def test_another_node_marks_a_run_that_ended_well_done_and_points_at_node_0(tmp_path):
    spec = RunSpec(name="sft", method="sft", nnodes=2, node_rank=1, rdzv_endpoint="n0:29500")
    runner = Runner([spec], runs_dir=tmp_path, gpus=[])
    notes: list = []
    runner.subscribe(notes.append)
    runner._finish(runner.states["sft"], 0)  # its ranks reported nothing: none of them is rank 0
    assert runner.states["sft"].status == DONE
    assert notes[-1].reason == "done on node 1 of 2; node 0 records the results"
    runner._finish(runner.states["sft"], 1)
    assert runner.states["sft"].status == FAILED


def test_cancelling_a_torchrun_run_leaves_no_rank_and_no_grandchild(tmp_path):
    # The canned-event worker under the real torchrun: each rank starts a grandchild and hangs.
    spec = RunSpec(name="two", method="sft", epochs=2, nproc_per_node=2)
    runner = Runner(
        [spec],
        runs_dir=tmp_path / "runs",
        session="c",
        worker_cmd=worker_cmd(tmp_path, {"default": {"hang_in_epoch": 1}}),
        cache_dir=tmp_path / "cache",
        gpus=[],
        grace_seconds=3.0,
    )

    async def scenario() -> list[dict]:
        task = asyncio.ensure_future(runner.run())
        folder = tmp_path / "runs" / "c-two"
        deadline = time.monotonic() + 120
        while not all((folder / f"pids-rank{r}.json").exists() for r in (0, 1)):
            assert time.monotonic() < deadline, "the ranks never started"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        pids = [json.loads((folder / f"pids-rank{r}.json").read_text()) for r in (0, 1)]
        runner.cancel()
        await asyncio.wait_for(task, 60)
        return pids

    pids = asyncio.run(scenario())
    state = runner.states["two"]
    assert state.status == "cancelled"
    everyone = [state.pid, *(pid for p in pids for pid in p.values())]
    assert len(everyone) == 5 and not [pid for pid in everyone if pid is not None and process_alive(pid)]
