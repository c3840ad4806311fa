"""Shared fixtures: one cache for the whole session (the embedded base checkpoint is built
once, small), and a helper that runs the real worker in a subprocess.

That helper starts each worker as headless sessions do, through a preload server (one for the
whole test session): a worker forks with torch and transformers already imported instead of
spending ~5 s importing them. ``VQABENCH_PRELOAD=0`` starts every worker fresh instead; the
preload server's own tests (test_preload.py) check that both ways train alike.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vqabench import events as ev
from vqabench.preload_launcher import PreloadServer, preload_module

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
    proc = subprocess.run(worker_command(str(path)), capture_output=True, text=True, timeout=timeout)
    events = [ev.parse_event(line) for line in proc.stdout.splitlines()]  # every line must parse
    return events, proc.returncode, proc.stderr


_preload: list[PreloadServer] = []


def worker_command(*args: str) -> list[str]:
    """``python -m vqabench.engine.worker ARGS``, launched through the session's preload server when it may be."""
    command = [sys.executable, "-m", "vqabench.engine.worker", *args]
    module = preload_module(command, os.environ)
    if module is None:
        return command
    if not _preload:
        _preload.append(PreloadServer(module, dict(os.environ)))
        atexit.register(_preload[0].close)
    return _preload[0].command(command)


def of_type(events: list, cls: type) -> list:
    return [e for e in events if isinstance(e, cls)]
