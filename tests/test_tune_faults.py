"""`vqabench tune` under faults: a killed tune resumes, dead trials fail with a reason, --gpus runs trials at once."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from fake_worker import worker_cmd
from optuna.trial import TrialState

from vqabench.presets import Overrides, load_presets
from vqabench.store import ResultsStore
from vqabench.tune.study import Tuner, TuneSettings, fail_orphaned_trials, open_storage

REPO = Path(__file__).resolve().parent.parent
TUNE_LR = "tune={lr={low=1e-5,high=1e-3,log=true}}"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_whose_process_is_gone_or_silent_is_failed_with_its_reason_and_a_live_one_is_kept(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'tune.db'}", heartbeat=1, grace=1)
    study = optuna.create_study(storage=storage, study_name="s")
    here_dead, elsewhere_silent, elsewhere_beating = (study.ask() for _ in range(3))
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process
    for trial, host, pid in (
        (here_dead, socket.gethostname(), dead.pid),
        (elsewhere_silent, "another-machine", 4242),
        (elsewhere_beating, "another-machine", 4343),
    ):
        trial.set_user_attr("host", host)
        trial.set_user_attr("pid", pid)
        storage.record_heartbeat(trial._trial_id)
    assert fail_orphaned_trials(storage, "s") == [0]  # this machine's dead process: at once
    time.sleep(2.2)  # past the 1 s grace period (the database clock counts whole seconds)
    storage.record_heartbeat(elsewhere_beating._trial_id)
    assert fail_orphaned_trials(storage, "s") == [1]
    trials = optuna.load_study(storage=storage, study_name="s").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING]
    assert trials[0].user_attrs["reason"] == (
        f"its tune process (pid {dead.pid} on {socket.gethostname()}) ended while it ran (killed?)"
    )
    assert trials[1].user_attrs["reason"].startswith("no heartbeat from its tune process (pid 4242 on another-machine)")


def _storage_trials(url: str) -> list[optuna.trial.FrozenTrial]:
    try:
        summaries = optuna.get_all_study_summaries(url)
    except Exception:  # the tune process is still creating the tables
        return []
    return optuna.load_study(storage=url, study_name=summaries[0].study_name).trials if summaries else []


def _start_tune(tmp_path: Path, url: str, fake: list[str]) -> subprocess.Popen[str]:
    args = ["tune", "--trials", "4", "--preset", "sft", "--set", "epochs=2", "--set", TUNE_LR, "--storage", url]
    return subprocess.Popen(
        [sys.executable, "-m", "vqabench.cli", "--worker-cmd", shlex.join(fake), *args, "--results", f"{tmp_path}/r"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "VQABENCH_CACHE": str(tmp_path / "cache")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _kill_during_trial(proc: subprocess.Popen[str], url: str, number: int, signum: int) -> str:
    deadline = time.monotonic() + 60
    while not any(t.number == number and t.state == TrialState.RUNNING for t in _storage_trials(url)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    time.sleep(1.0)  # its worker is in its first epoch
    proc.send_signal(signum)
    return proc.communicate(timeout=60)[0]


def test_tune_killed_by_sigterm_then_sigkill_resumes_and_each_killed_trial_fails_with_its_reason(tmp_path):
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    slow = {"epoch_sleep": 4.0}
    fake = worker_cmd(tmp_path, {"runs": {"sft.trial1": slow, "sft.trial2": slow}})

    first = _start_tune(tmp_path, url, fake)
    out = _kill_during_trial(first, url, 1, signal.SIGTERM)
    assert first.returncode == 130, out  # stopped its trial's worker and ended by itself
    trials = _storage_trials(url)
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].user_attrs["reason"].startswith("interrupted"), trials[1].user_attrs
    assert [t.state for t in trials[2:]] == [TrialState.WAITING, TrialState.WAITING]

    second = _start_tune(tmp_path, url, fake)
    out = _kill_during_trial(second, url, 2, signal.SIGKILL)  # leaves trial 2 RUNNING
    assert second.returncode == -signal.SIGKILL
    assert _storage_trials(url)[2].state == TrialState.RUNNING

    third = _start_tune(tmp_path, url, fake)
    out = third.communicate(timeout=120)[0]
    assert third.returncode == 0, out
    trials = _storage_trials(url)
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE], out
    assert trials[2].user_attrs["reason"] == (
        f"its tune process (pid {second.pid} on {socket.gethostname()}) ended while it ran (killed?)"
    )
    assert "[sft.trial2] failed: its process is gone" in out and "best of 4 trial(s)" in out
    with ResultsStore(tmp_path / "r", create=False) as store:
        ran = [r.name for s in store.list_sessions() for r in store.runs(s.id)]
    assert sorted(ran) == ["sft.trial0", "sft.trial1", "sft.trial2", "sft.trial3", "sft.tuned"]  # none ran twice


def test_gpus_run_one_trial_per_gpu_at_once_in_one_study(tmp_path, monkeypatch):
    monkeypatch.setenv("VQABENCH_VISIBLE_GPUS", "0,1")  # the fake devices the placement tests use
    specs = load_presets("sft", Overrides(epochs=1, settings=(TUNE_LR, "gpus=[0,1]")))
    slow = {"record_env": True, "epoch_sleep": 1.0}
    fake = worker_cmd(tmp_path, {"default": {"record_env": True}, "runs": {f"sft.trial{n}": slow for n in range(4)}})
    with ResultsStore(tmp_path / "results") as store:
        session = store.begin_session("sft", "test")
        tuner = Tuner(specs, TuneSettings(trials=4), store, session, worker_cmd=fake, say=lambda _: None)
        outcome = tuner.run()["sft"]
        assert outcome.final_state is not None and outcome.final_state.status == "done"
        study = optuna.load_study(storage=open_storage(tuner.url), study_name=tuner.study_name("sft"))
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
        runs = {r.name: r for r in store.runs(session.id)}
    assert sorted(runs) == [*(f"sft.trial{n}" for n in range(4)), "sft.tuned"]
    written = (tmp_path / "results" / "runs").rglob("env.json")  # in <time>-<session>-<run name>/
    envs = {p.parent.name.split("-", 3)[-1]: json.loads(p.read_text()) for p in written}
    trials = [envs[f"sft.trial{n}"] for n in range(4)]
    assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in trials) == ["0", "0", "1", "1"]  # one GPU each
    on = {gpu: sorted((e["start"], e["end"]) for e in trials if e["CUDA_VISIBLE_DEVICES"] == gpu) for gpu in "01"}
    for gpu in "01":  # a GPU holds one trial at a time ...
        assert on[gpu][0][1] <= on[gpu][1][0]
    assert on["0"][0][0] < on["1"][0][1] and on["1"][0][0] < on["0"][0][1]  # ... and the two GPUs train at once
    wall = max(e["end"] for e in trials) - min(e["start"] for e in trials)
    assert wall < 3.0, wall  # four 1 s trials on two GPUs: about 2 s, not 4
