"""Shared fixtures: one cache for the whole session (the embedded base checkpoint is built
once, small), and a helper that runs the real worker in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vqabench import events as ev

#: Small enough that the embedded base checkpoint builds in a few seconds.
TINY = {
    "epochs": 1,
    "limit": 64,
    "base_samples": 512,
    "batch_size": 16,
    "dataset": {"eval_size": 32, "test_size": 32},
    "judge": {"name": "exact"},
}


@pytest.fixture(scope="session")
def vqa_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vqabench-cache")


def tiny_spec(name: str, method: str, **changes) -> dict:
    spec = json.loads(json.dumps(TINY))
    spec.update({"name": name, "method": method})
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key].update(value)
        else:
            spec[key] = value
    return spec


def run_worker(spec: dict, tmp_path: Path, cache: Path, timeout: float = 240) -> tuple[list, int, str]:
    """Run `python -m vqabench.engine.worker` on a spec; (parsed events, exit code, stderr)."""
    spec = dict(spec)
    spec.setdefault("cache_dir", str(cache))
    spec.setdefault("output_dir", str(tmp_path / "out" / spec["name"]))
    path = tmp_path / f"{spec['name']}.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "vqabench.engine.worker", str(path)], capture_output=True, text=True, timeout=timeout
    )
    events = [ev.parse_event(line) for line in proc.stdout.splitlines()]  # every line must parse
    return events, proc.returncode, proc.stderr


def of_type(events: list, cls: type) -> list:
    return [e for e in events if isinstance(e, cls)]
