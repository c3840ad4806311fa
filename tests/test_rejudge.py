"""`vqabench judge`: a JSONL file of answers, and a stored run re-judged without retraining."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fake_together_server import FakeTogetherServer

REPO = Path(__file__).resolve().parents[1]


def vqabench(
    tmp_path: Path, *args: str, cache: Path, key: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VQABENCH_CACHE": str(cache)}
    for name in ("TOGETHER_API_KEY", "OPENAI_API_KEY", "VQABENCH_JUDGE_URL", "VQABENCH_JUDGE_MODEL"):
        env.pop(name, None)
    if key:
        env["TOGETHER_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "vqabench.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_judge_a_file_of_answers_writes_verdicts_and_prints_the_score(tmp_path):
    answers = tmp_path / "answers.jsonl"
    rows = [
        {"question": "what color?", "reference": "red", "prediction": "Red."},
        {"question": "what shape?", "reference": "circle", "prediction": "square"},
    ]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = vqabench(tmp_path, "judge", str(answers), "--judge", "exact", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "0.500" in proc.stdout and "answers.verdicts.jsonl" in proc.stdout
    verdicts = [json.loads(line) for line in (tmp_path / "answers.verdicts.jsonl").read_text().splitlines()]
    assert [v["verdict"] for v in verdicts] == ["correct", "incorrect"]


def test_a_missing_answers_file_is_one_sentence(tmp_path):
    proc = vqabench(tmp_path, "judge", "nope.jsonl", "--judge", "exact", cache=tmp_path / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("vqabench: ") and "nope.jsonl" in proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vqa_cache) -> Path:
    """A results folder holding one stored session of two real runs (sft, orpo), trained once for this module."""
    folder = tmp_path_factory.mktemp("rejudge")
    run = vqabench(
        folder,
        "--headless",
        "--preset",
        "sft,orpo",
        "--limit",
        "32",
        "--epochs",
        "1",
        "--set",
        "base_samples=512",
        "--set",
        "dataset.test_size=24",
        "--set",
        "judge.name=exact",
        cache=vqa_cache,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return folder


def copy_of(trained: Path, tmp_path: Path) -> Path:
    """A test's own copy of the stored session, so what one test writes no other sees."""
    shutil.copytree(trained / "vqabench-results", tmp_path / "vqabench-results", symlinks=True)
    return tmp_path


def test_a_stored_run_is_rejudged_by_the_api_judge_without_retraining(trained, tmp_path, vqa_cache):
    folder = copy_of(trained, tmp_path)
    with FakeTogetherServer() as server:
        url = ("--base-url", server.base_url)
        args = ("judge", "--run", "1", "--judge", "together", *url, "--requests-per-minute", "6000")
        first = vqabench(folder, *args, cache=vqa_cache, key="test-key")
        assert first.returncode == 0, first.stderr
        assert "Run 1: together judge" in first.stdout and "on 24 answers" in first.stdout
        paid = len(server.chat_requests)
        assert 0 < paid <= 24  # empty answers are graded without a request
        again = vqabench(folder, *args, cache=vqa_cache, key="test-key")
        assert again.returncode == 0 and len(server.chat_requests) == paid  # the cache pays nothing twice
    report = vqabench(folder, "export", "--last", cache=vqa_cache).stdout
    assert "by the exact, together judge" in report  # run 1 is rejudged; run 2 keeps its exact verdicts
    # the verdicts go next to the predictions in this (copied) results folder, not the original
    assert len(list((folder / "vqabench-results" / "runs").glob("*/predictions.together.jsonl"))) == 1
    assert not list((trained / "vqabench-results" / "runs").glob("*/predictions.together.jsonl"))


def test_a_stored_run_is_rejudged_by_a_model_on_an_openai_compatible_server(trained, tmp_path, vqa_cache):
    folder = copy_of(trained, tmp_path)
    served = "Qwen/Qwen2.5-0.5B-Instruct"
    with FakeTogetherServer(models=[served]) as server:
        url = server.base_url + "/v1"
        args = ("judge", "--run", "1", "--judge", "openai", "--base-url", url, "--requests-per-minute", "6000")
        wrong = vqabench(folder, *args, "--model", "llama3:8b", cache=vqa_cache)
        assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
        assert len(wrong.stderr.strip().splitlines()) == 1 and "'llama3:8b'" in wrong.stderr and url in wrong.stderr
        asked_wrong = len(server.chat_requests)
        right = vqabench(folder, *args, "--model", served, cache=vqa_cache)
        assert right.returncode == 0, right.stderr
        assert "Run 1: openai judge" in right.stdout and "on 24 answers" in right.stdout
        bodies = [r.body for r in server.chat_requests[asked_wrong:]]
    assert asked_wrong == 1 and 0 < len(bodies) <= 24 and {b["model"] for b in bodies} == {served}
    assert len(list((folder / "vqabench-results" / "runs").glob("*/predictions.openai.jsonl"))) == 1


def test_compare_two_stored_runs_asks_both_orders(trained, tmp_path, vqa_cache):
    folder = copy_of(trained, tmp_path)
    proc = vqabench(folder, "compare", "1", "2", "--judge", "exact", cache=vqa_cache)
    assert proc.returncode == 0, proc.stderr
    assert "24 questions asked in both orders" in proc.stdout and "(0.5 = even)" in proc.stdout
    mismatch = vqabench(folder, "compare", "1", "99", "--judge", "exact", cache=vqa_cache)
    assert mismatch.returncode == 2 and "no run 99" in mismatch.stderr and "Traceback" not in mismatch.stderr
