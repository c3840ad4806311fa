"""`vqabench judge`: a JSONL file of answers, and a stored run re-judged without retraining."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fake_together_server import FakeTogetherServer

REPO = Path(__file__).resolve().parents[1]


def vqabench(
    tmp_path: Path, *args: str, cache: Path, key: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VQABENCH_CACHE": str(cache)}
    env.pop("TOGETHER_API_KEY", None)
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


def test_a_stored_run_is_rejudged_by_the_api_judge_without_retraining(tmp_path, vqa_cache):
    run = vqabench(
        tmp_path,
        "--headless",
        "--preset",
        "sft",
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
    with FakeTogetherServer() as server:
        args = ("judge", "--run", "1", "--judge", "together", "--base-url", server.base_url)
        first = vqabench(tmp_path, *args, cache=vqa_cache, key="test-key")
        assert first.returncode == 0, first.stderr
        assert "Run 1: together judge" in first.stdout and "on 24 answers" in first.stdout
        paid = len(server.chat_requests)
        assert 0 < paid <= 24  # empty answers are graded without a request
        again = vqabench(tmp_path, *args, cache=vqa_cache, key="test-key")
        assert again.returncode == 0 and len(server.chat_requests) == paid  # the cache pays nothing twice
    report = vqabench(tmp_path, "export", "--last", cache=vqa_cache).stdout
    assert "by the together judge" in report
    run_dirs = list((tmp_path / "vqabench-results" / "runs").glob("*-sft"))
    assert (run_dirs[0] / "predictions.together.jsonl").is_file()


def test_compare_two_stored_runs_asks_both_orders(tmp_path, vqa_cache):
    run = vqabench(
        tmp_path,
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
        "dataset.test_size=16",
        "--set",
        "judge.name=exact",
        cache=vqa_cache,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    proc = vqabench(tmp_path, "compare", "1", "2", "--judge", "exact", cache=vqa_cache)
    assert proc.returncode == 0, proc.stderr
    assert "16 questions asked in both orders" in proc.stdout and "(0.5 = even)" in proc.stdout
    mismatch = vqabench(tmp_path, "compare", "1", "99", "--judge", "exact", cache=vqa_cache)
    assert mismatch.returncode == 2 and "no run 99" in mismatch.stderr and "Traceback" not in mismatch.stderr
