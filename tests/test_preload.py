"""The preload server: runs forked from it behave as started workers do, and no worker outlives its launcher."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import of_type, tiny_spec
from fake_worker import process_alive

from vqabench import events as ev
from vqabench.preload_launcher import PreloadServer
from vqabench.runner import Runner, WorkerEvent
from vqabench.spec import RunSpec, spec_from_dict

TESTS = str(Path(__file__).resolve().parent)
SPECS = [
    RunSpec(name="sft", method="sft", epochs=2),
    RunSpec(name="dpo", method="dpo", after="sft", epochs=2),
    RunSpec(name="orpo", method="orpo", epochs=2),
]


def module_cmd(tmp_path: Path, plan: dict) -> list[str]:
    """tests/fake_worker.py as ``python -m fake_worker SCRIPT``: the form the preload server serves."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "script.json"
    script.write_text(json.dumps(plan))
    return [sys.executable, "-m", "fake_worker", str(script)]


def run_session(tmp_path: Path, plan: dict, preload: str) -> tuple[Runner, list]:
    runner = Runner(
        SPECS,
        runs_dir=tmp_path / "runs",
        session="s1",
        worker_cmd=module_cmd(tmp_path, plan),
        cache_dir=tmp_path / "cache",
        env={"PYTHONPATH": TESTS, "VQABENCH_PRELOAD": preload},
    )
    notes: list = []
    runner.subscribe(notes.append)
    asyncio.run(runner.run())
    return runner, notes


def test_runs_through_the_preload_server_give_the_same_events_and_exit_codes(tmp_path):
    plan = {"runs": {"orpo": {"crash_in_epoch": 2, "crash_signal": 9}}}
    sessions = {p: run_session(tmp_path / p, plan, p) for p in ("0", "1")}
    for runner, _ in sessions.values():
        assert {n: (s.status, s.exit_code) for n, s in runner.states.items()} == {
            "sft": ("done", 0),
            "dpo": ("done", 0),
            "orpo": ("failed", -9),
        }
    kinds = {
        p: [(n.run, type(n.event).__name__) for n in notes if isinstance(n, WorkerEvent)]
        for p, (_, notes) in sessions.items()
    }
    assert kinds["0"] == kinds["1"] and len(kinds["1"]) > 10
    for preload, (runner, notes) in sessions.items():
        started = {
            n.run: n.event.pid for n in notes if isinstance(n, WorkerEvent) and isinstance(n.event, ev.RunStarted)
        }
        forked = {name: started[name] != state.pid for name, state in runner.states.items()}
        assert forked == {"sft": preload == "1", "dpo": preload == "1", "orpo": preload == "1"}


def test_sigterm_to_the_launcher_reaches_the_worker_and_its_grandchild(tmp_path):
    runner = Runner(
        SPECS[2:],
        runs_dir=tmp_path / "runs",
        session="s1",
        worker_cmd=module_cmd(tmp_path, {"default": {"hang_in_epoch": 1}}),
        cache_dir=tmp_path / "cache",
        env={"PYTHONPATH": TESTS},
    )

    async def scenario() -> dict:
        task = asyncio.ensure_future(runner.run())
        pids_file = tmp_path / "runs" / "s1-orpo" / "pids.json"
        while not (pids_file.exists() and pids_file.read_text()):
            await asyncio.sleep(0.05)
        runner.cancel()
        await task
        return json.loads(pids_file.read_text())

    pids = asyncio.run(scenario())
    state = runner.states["orpo"]
    assert pids["worker"] != state.pid  # forked by the server, not the launcher itself
    assert state.status == "cancelled" and state.exit_code == -signal.SIGTERM
    assert not process_alive(pids["worker"]) and not process_alive(pids["grandchild"])


def launcher(server: PreloadServer, cmd: list[str], spec_path: Path, env: dict) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*server.command(cmd), str(spec_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def write_spec(tmp_path: Path, name: str = "sft") -> Path:
    path = tmp_path / "spec.json"
    out = tmp_path / "out"
    out.mkdir()
    path.write_text(json.dumps({"name": name, "method": "sft", "epochs": 2, "output_dir": str(out)}))
    return path


def wait_for_pids(path: Path) -> dict:
    deadline = time.monotonic() + 30
    while not (path.exists() and path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return json.loads(path.read_text())


def test_a_sigkilled_launcher_leaves_no_worker_alive(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{Path(TESTS).parent}{os.pathsep}{TESTS}"}
    server = PreloadServer("fake_worker", env)
    try:
        spec = write_spec(tmp_path)
        proc = launcher(server, module_cmd(tmp_path, {"default": {"hang_in_epoch": 1}}), spec, env)
        pids = wait_for_pids(tmp_path / "out" / "pids.json")
        assert process_alive(pids["worker"]) and pids["worker"] != proc.pid
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while (process_alive(pids["worker"]) or process_alive(pids["grandchild"])) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_alive(pids["worker"]) and not process_alive(pids["grandchild"])
    finally:
        server.close()


def test_a_server_whose_host_died_lets_running_workers_finish_and_still_guards_them(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{Path(TESTS).parent}{os.pathsep}{TESTS}"}
    server = PreloadServer("fake_worker", env)
    try:
        spec = write_spec(tmp_path)
        proc = launcher(server, module_cmd(tmp_path, {"default": {"hang_in_epoch": 1}}), spec, env)
        pids = wait_for_pids(tmp_path / "out" / "pids.json")
        assert server.process is not None and server.process.stdin is not None
        server.process.stdin.close()  # what the host's death does to the server
        time.sleep(0.5)
        assert process_alive(pids["worker"]) and server.process.poll() is None  # as without the server
        proc.kill()
        server.process.wait(timeout=5)  # its last worker gone, the server exits
        assert not process_alive(pids["worker"]) and not process_alive(pids["grandchild"])
    finally:
        server.close()


def test_an_unreachable_server_falls_back_to_starting_the_worker(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{Path(TESTS).parent}{os.pathsep}{TESTS}"}
    server = PreloadServer("fake_worker", env)
    try:
        spec = write_spec(tmp_path)
        cmd = module_cmd(tmp_path, {})
        server.command(cmd)
        assert server.process is not None
        server.process.kill()  # the server died: its socket refuses connections
        server.process.wait()
        proc = launcher(server, cmd, spec, env)
        out, err = proc.communicate(timeout=30)
    finally:
        server.close()
    assert proc.returncode == 0
    events = [ev.parse_event(line) for line in out.splitlines()]
    assert isinstance(events[-1], ev.RunFinished) and of_type(events, ev.RunStarted)[0].pid == proc.pid  # exec'd
    assert "the preload server at" in err and "starting the worker without it." in err


def test_the_real_worker_through_the_server_trains_as_a_started_one(vqa_cache, tmp_path):
    spec = {**tiny_spec("sft", "sft", epochs=1), "cache_dir": str(vqa_cache)}
    runs = {}
    for preload in ("0", "1"):
        env = {"VQABENCH_PRELOAD": preload}
        runner = Runner([spec_from_dict(spec)], runs_dir=tmp_path / preload, env=env)
        notes: list = []
        runner.subscribe(notes.append)
        asyncio.run(runner.run())
        state = runner.states["sft"]
        assert state.status == "done", state.reason
        # runpy's "found in sys.modules" warning about the warm worker module is not shown in any log
        assert not any("RuntimeWarning" in line for line in state.stderr_tail), list(state.stderr_tail)
        runs[preload] = (state.pid, [n.event for n in notes if isinstance(n, WorkerEvent)])
    for preload, (pid, events) in runs.items():
        assert (of_type(events, ev.RunStarted)[0].pid != pid) == (preload == "1")
    losses = {p: [e.train_loss for e in of_type(events, ev.EpochEnded)] for p, (_, events) in runs.items()}
    assert losses["1"] == losses["0"]  # same seed, same numbers: the fork changes no figure
