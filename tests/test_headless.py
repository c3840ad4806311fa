"""The command line as a user runs it: real subprocesses, exit codes, output and the store."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_worker import process_alive, worker_cmd

from vqabench.store import ResultsStore

REPO = Path(__file__).resolve().parent.parent


def cli_env(tmp_path: Path, cache: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VQABENCH_CACHE": str(cache or tmp_path / "cache")}
    env.pop("TOGETHER_API_KEY", None)  # the offline judge, whatever the developer's shell holds
    return env


def vqabench(
    tmp_path: Path,
    *args: str,
    timeout: float = 120,
    cache: Path | None = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vqabench.cli", *args],
        cwd=tmp_path,
        env=cli_env(tmp_path, cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fake(tmp_path: Path, plan: dict) -> list[str]:
    return ["--worker-cmd", shlex.join(worker_cmd(tmp_path, plan))]


def assert_one_sentence_error(proc: subprocess.CompletedProcess, *parts: str) -> None:
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vqabench: "), proc.stderr
    for part in parts:
        assert part in lines[0]


def test_headless_runs_every_preset_prints_the_comparison_and_exports(tmp_path):
    proc = vqabench(tmp_path, "--headless", "--preset", "all", "--epochs", "2", "--export", "r.md", *fake(tmp_path, {}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for run in ("sft", "dpo-beta0.1", "dpo-beta0.5", "orpo", "ipo", "kto", "simpo"):
        assert f"[{run}] epoch 2/2: train loss" in out and f"[{run}] done" in out
    # efficiency row: 2 epochs, both in the median (no warm-up apart), SFT = 1.00
    assert re.search(r"^\| sft +\| +2\.00 s ± 0\.00 \(2\.00 … 2\.00\) \| +– \| +1\.00 \|", out, re.M)
    assert "7 of 7 run(s) done." in out
    report = (tmp_path / "r.md").read_text()
    for heading in ("## Quality", "## Efficiency", "## Per epoch", "### dpo-beta0.5 (dpo, done)"):
        assert heading in report
    # the presets leave the reference to the worker: the console line and the report say what it chose and why
    started = {line.split("]")[0][1:]: line for line in out.splitlines() if "] started on " in line}
    assert started["dpo-beta0.1"].endswith("reference: precompute (auto: 2 epochs, table fits)")
    assert started["orpo"].endswith("reference: none")
    efficiency = report.split("## Efficiency")[1].split("\n## ")[0]
    assert "| precompute (auto: 2 epochs, table fits) |" in efficiency
    spec = json.loads(next((tmp_path / "vqabench-results" / "runs").glob("*-dpo-beta0.1/spec.json")).read_text())
    assert spec["epochs"] == 2 and spec["init_checkpoint"].endswith("-sft/best")

    assert "and 3 SVG figure(s) to r_files" in out
    assert sorted(p.name for p in (tmp_path / "r_files").iterdir()) == ["cost.svg", "loss.svg", "quality-vs-cost.svg"]

    again = vqabench(tmp_path, "export", "--last", "-o", "again.md")
    assert again.returncode == 0 and "Wrote the report of session 1" in again.stdout
    assert (tmp_path / "again.md").read_text() == report.replace("](r_files/", "](again_files/")
    to_stdout = vqabench(tmp_path, "export", "--session", "1")  # no file, so no figures: the tables alone
    figures = re.search(r"^## Figures\n.*?(?=^## )", report, re.M | re.S)
    assert figures is not None and to_stdout.stdout == report.replace(figures.group(0), "")


def test_a_crashed_run_makes_the_exit_code_1_and_is_explained(tmp_path):
    plan = {"runs": {"sft": {"crash_in_epoch": 2}}}
    proc = vqabench(tmp_path, "--headless", "--preset", "sft,orpo,kto", *fake(tmp_path, plan))
    assert proc.returncode == 1
    assert "[sft] failed: worker exited with signal 9 (killed) during epoch 2 of 3" in proc.stdout
    assert "[kto] skipped: sft failed\n" in proc.stdout and "skipped: skipped" not in proc.stdout
    assert "Runs that did not finish:" in proc.stdout and "1 of 3 run(s) done." in proc.stdout
    with ResultsStore(tmp_path / "vqabench-results") as store:
        runs = {r.name: r for r in store.runs(store.last_session().id)}
        assert [e.epoch for e in store.epochs(runs["sft"].id)] == [1]


def test_a_dependency_outside_the_selection_is_added_and_said(tmp_path):
    proc = vqabench(tmp_path, "--headless", "--preset", "dpo-beta0.5", "--epochs", "1", *fake(tmp_path, {}))
    assert proc.returncode == 0
    assert "Added preset sft: dpo-beta0.5 starts from its checkpoint." in proc.stdout


@pytest.mark.parametrize(
    "args, parts",
    [
        (["--preset", "dpo-beta9"], ["--preset names 'dpo-beta9'", "available presets are"]),
        (["--preset", "missing.toml"], ["preset file missing.toml does not exist."]),
        (["--preset", "all", "--epochs", "0"], ["--epochs has value 0; it must be at least 1."]),
        (["--preset", "bad.toml"], ["bad.toml: key 'beta' has value 'high', which must be a number"]),
        (["--preset", "all", "--export", "no/such/dir/r.md"], ["--export names no/such/dir/r.md"]),
    ],
)
def test_bad_input_is_one_sentence_and_exit_code_2_before_anything_runs(tmp_path, args, parts):
    (tmp_path / "bad.toml").write_text('method = "dpo"\nbeta = "high"\nafter = "sft"\n')
    proc = vqabench(tmp_path, "--headless", *args, *fake(tmp_path, {}))
    assert_one_sentence_error(proc, *parts)
    assert not (tmp_path / "vqabench-results").exists()


def test_export_without_a_store_or_session_is_one_sentence(tmp_path):
    assert_one_sentence_error(
        vqabench(tmp_path, "export", "--last", "-o", "r.md"), "there is no results store at vqabench-results/results.db"
    )
    ResultsStore(tmp_path / "vqabench-results").close()
    assert_one_sentence_error(vqabench(tmp_path, "export", "-o", "r.md"), "holds no session yet")
    assert_one_sentence_error(vqabench(tmp_path, "export", "--session", "7"), "has no session 7")


def test_ctrl_c_cancels_cleanly_leaves_no_process_and_exits_130(tmp_path):
    plan = {"runs": {"orpo": {"hang_in_epoch": 1}}}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vqabench.cli", "--headless", *fake(tmp_path, plan)],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        pid_files: list[Path] = []
        while not pid_files and time.monotonic() < deadline:
            pid_files = [p for p in (tmp_path / "vqabench-results" / "runs").glob("*-orpo/pids.json") if p.read_text()]
            time.sleep(0.05)
        assert pid_files, "the fake worker never started hanging"
        pids = json.loads(pid_files[0].read_text())
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "SIGINT: cancelling" in out and "Traceback" not in err
    assert not process_alive(pids["worker"]) and not process_alive(pids["grandchild"])
    with ResultsStore(tmp_path / "vqabench-results") as store:
        session = store.last_session()
        assert session.status == "cancelled"
        assert {r.status for r in store.runs(session.id)} == {"cancelled"}


def test_without_the_dashboard_plain_vqabench_says_so(tmp_path):
    # sys.modules[name] = None makes `import name` fail as if the module were not installed
    code = "import sys; sys.modules['vqabench.tui.app'] = None\nfrom vqabench.cli import main; sys.exit(main([]))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert_one_sentence_error(proc, "the dashboard is not part of this build yet")


def test_end_to_end_on_the_real_worker(tmp_path, vqa_cache):
    """The issue's check: every top-level preset on the embedded default, a tiny run each.

    It also checks the frozen-encoder cache across a session: the first run to start builds
    it, and every run from the same base model or from SFT's checkpoint reuses that entry.
    """
    (vqa_cache / "base").mkdir(exist_ok=True)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "base").symlink_to(vqa_cache / "base")  # share the session's base checkpoint, not its arrays
    # --set shrinks the base checkpoint and the splits; the judge stays the default (the
    # offline semantic judge without TOGETHER_API_KEY).
    settings = ["base_samples=512", "dataset.test_size=32", "dataset.eval_size=16"]
    proc = vqabench(
        tmp_path,
        "--headless",
        "--preset",
        "all",
        "--limit",
        "32",
        "--epochs",
        "1",
        *[arg for s in settings for arg in ("--set", s)],
        timeout=900,
        cache=cache,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "7 of 7 run(s) done." in proc.stdout
    export = vqabench(tmp_path, "export", "--last", "-o", "r.md")
    assert export.returncode == 0
    report = (tmp_path / "r.md").read_text()
    efficiency = report.split("## Efficiency")[1].split("##")[0]
    for run in ("sft", "dpo-beta0.1", "dpo-beta0.5", "orpo", "ipo", "kto", "simpo"):
        row = next(line for line in efficiency.splitlines() if line.startswith(f"| {run} "))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1].split(" s")[0]) > 0 and float(cells[5]) > 0  # epoch time, samples/s measured
        assert f"### {run} (" in report
    quality = report.split("## Quality")[1].split("##")[0]
    sft_row = next(line for line in quality.splitlines() if line.startswith("| sft "))
    assert "n/a" not in sft_row.split("|")[2]  # EM measured
    # The starting model is scored once, by the first run from it (orpo), and is the first row of both tables.
    assert proc.stdout.count("base: EM") == 1 and "[orpo] base: EM" in proc.stdout
    base_row = [line for line in quality.splitlines() if line.startswith("| ")][1]  # the first after the header
    assert base_row.startswith("| base ") and re.search(r"\| *[01]\.\d{3} \[[01]\.\d{3}, [01]\.\d{3}\] *\|", base_row)
    versus = report.split("## Versus SFT")[1].split("##")[0]
    assert [line for line in versus.splitlines() if line.startswith("| ")][1].startswith("| base ")

    # The encoder cache: built once, by the first run to start (orpo), reused by the six others.
    assert proc.stdout.count("encoder cache: encoded once in") == 1
    assert proc.stdout.count("encoder cache: reused") == 6
    with ResultsStore(tmp_path / "vqabench-results") as store:
        session = store.last_session()
        assert session is not None
        infos = {run.name: run.started.data["encoder_cache"] for run in store.runs(session.id) if run.started}
    assert len(infos) == 7 and all(info["on"] for info in infos.values())
    assert [name for name, info in infos.items() if info["built"]] == ["orpo"]
    assert len({info["path"] for info in infos.values()}) == 1
    assert len(list((cache / "arrays" / "encoder").iterdir())) == 1
    assert len(re.findall(r"\| *built in [0-9.]+ s *\|", report)) == 1
    assert len(re.findall(r"\| *reused *\|", report)) == 6


def test_two_seeds_on_the_real_worker_report_mean_and_interval(tmp_path, vqa_cache):
    proc = vqabench(
        tmp_path,
        "--headless",
        "--preset",
        "sft",
        "--seeds",
        "0,1",
        "--limit",
        "32",
        "--epochs",
        "1",
        "--set",
        "base_samples=512",
        "--set",
        "dataset.test_size=32",
        "--set",
        "dataset.eval_size=16",
        "--set",
        "judge.name=exact",
        timeout=600,
        cache=vqa_cache,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    export = vqabench(tmp_path, "export", "--last", "--per-seed", "-o", "r.md")
    assert export.returncode == 0, export.stderr
    report = (tmp_path / "r.md").read_text()
    quality = report.split("## Quality\n")[1].split("##")[0]
    row = next(line for line in quality.splitlines() if line.startswith("| sft (2 seeds)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert all(" ± " in c for c in cells[2:5]), row  # EM, F1, judge (after Model): mean ± half-width
    efficiency = report.split("## Efficiency\n")[1].split("##")[0]
    assert "| sft (2 seeds)" in efficiency and " ± " in efficiency
    per_seed = report.split("## Quality per seed")[1].split("##")[0]
    assert "| sft@s0 " in per_seed and "| sft@s1 " in per_seed


def test_a_session_whose_host_was_sigkilled_is_marked_interrupted_keeping_its_epochs(tmp_path):
    results = tmp_path / "results"
    plan = {"default": {"epochs": 3}, "runs": {"sft": {"hang_in_epoch": 2}}}
    host = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vqabench.cli",
            "--headless",
            "--preset",
            "sft,dpo-beta0.1",
            "--results",
            str(results),
            *fake(tmp_path, plan),
        ],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not list(results.glob("runs/*-sft/pids.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = json.loads(next(results.glob("runs/*-sft/pids.json")).read_text())
    with ResultsStore(results, create=False) as store:
        session = store.last_session()
        run = store.runs(session.id)[0]
        while not store.epochs(run.id) and time.monotonic() < deadline:
            time.sleep(0.05)
    os.kill(host.pid, signal.SIGKILL)
    host.wait()
    with ResultsStore(results, create=False) as store:  # the worker still runs on its own: not yet
        assert store.session(session.id).status == "running"
    os.killpg(pids["worker"], signal.SIGKILL)  # the worker leads its own process group
    while process_alive(pids["worker"]) and time.monotonic() < deadline:
        time.sleep(0.05)

    proc = vqabench(tmp_path, "export", "--results", str(results))
    assert proc.returncode == 0, proc.stderr
    assert "sft: interrupted: the vqabench process" in proc.stdout
    assert "its 1 finished epoch(s) are kept" in proc.stdout
    assert "dpo-beta0.1: interrupted before it started" in proc.stdout
    with ResultsStore(results, create=False) as store:
        assert store.session(session.id).status == "interrupted"
        sft, dpo = store.runs(session.id)
        assert (sft.status, dpo.status) == ("interrupted", "interrupted")
        assert [e.epoch for e in store.epochs(sft.id)] == [1]
