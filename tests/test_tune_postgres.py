"""`vqabench tune` against a real, throwaway PostgreSQL server: processes share one study's budget."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from fake_worker import worker_cmd
from optuna.trial import TrialState

from vqabench.spec import SpecError
from vqabench.store import ResultsStore
from vqabench.tune.study import open_storage

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "pg-s3cret"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """The URL (with its password) of a fresh PostgreSQL cluster on a free port, stopped afterwards."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL's initdb and pg_ctl are not on PATH")
    # initdb refuses to run as root: then the cluster belongs to the postgres user
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="vqabench-pg-"))
    folder.chmod(0o777)
    (folder / "pw").write_text(PASSWORD)
    (folder / "pw").chmod(0o644)
    data, port = folder / "data", _free_port()
    setup = ["-U", "postgres", "--pwfile", str(folder / "pw"), "--auth-local=trust", "--auth-host=scram-sha-256"]
    subprocess.run([*as_user, initdb, "-D", str(data), "--no-sync", *setup], check=True, capture_output=True)
    options = f"-k {folder} -p {port} -h 127.0.0.1 -F"
    start = [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"]
    subprocess.run(start, check=True, capture_output=True)
    try:
        yield f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_tune_processes_share_one_postgresql_study(postgres, tmp_path):
    # trial 2's setting does best (the fake worker's eval loss ignores lr; the offset stands in for it)
    fake = worker_cmd(tmp_path, {"default": {"epoch_sleep": 0.3}, "runs": {"sft.trial2": {"eval_loss_offset": -0.5}}})
    args = ["tune", "--trials", "4", "--preset", "sft", "--set", "epochs=1", "--set", "tune={lr={low=1e-5,high=1e-3}}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "VQABENCH_CACHE": str(tmp_path / "cache")}
    cli = [sys.executable, "-m", "vqabench.cli", "--worker-cmd", shlex.join(fake)]
    procs = [
        subprocess.Popen(
            [*cli, *args, "--storage", postgres, "--study", "shared", "--results", str(tmp_path / f"r{i}")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs

    study = optuna.load_study(storage=postgres, study_name="shared.sft")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]  # the budget, none added
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.best_trial.number == 2
    ran: list[str] = []
    for i, out in enumerate(outs):
        assert "best of 4 trial(s): trial 2 " in out  # both report the same best
        assert PASSWORD not in out and "postgres:***@127.0.0.1" in out
        with ResultsStore(tmp_path / f"r{i}", create=False) as store:
            (session,) = store.list_sessions()
            assert PASSWORD not in session.command and "--study shared" in session.command
            runs = [r.name for r in store.runs(session.id)]
            assert "sft.tuned" in runs  # each machine retrains the best and scores it on test
            ran += [r for r in runs if ".trial" in r]
    assert sorted(ran) == [f"sft.trial{n}" for n in range(4)]  # each trial ran in exactly one process
    assert {t.user_attrs["pid"] for t in study.trials} <= {p.pid for p in procs}


def test_a_postgresql_server_that_cannot_be_reached_is_one_sentence_without_the_password(postgres, tmp_path):
    port = int(re.search(r":(\d+)/", postgres).group(1))  # type: ignore[union-attr]
    closed = postgres.replace(f":{port}/", f":{_free_port()}/")
    with pytest.raises(SpecError) as refused:
        open_storage(closed)
    shown = closed.replace(PASSWORD, "***")
    assert str(refused.value) == f"the study storage {shown} cannot be opened (OperationalError)."

    wrong = postgres.replace(PASSWORD, "not-the-password")
    proc = subprocess.run(
        [sys.executable, "-m", "vqabench.cli", "tune", "--trials", "2", "--storage", wrong, "--results", "r"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        f"vqabench: the study storage {wrong.replace('not-the-password', '***')} cannot be opened (OperationalError)."
    )
    with ResultsStore(tmp_path / "r", create=False) as store:
        assert store.list_sessions() == []
