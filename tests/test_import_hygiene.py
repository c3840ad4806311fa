"""The host side never imports textual (the dashboard's) nor torch (the worker's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST_MODULES = [
    "vqabench.presets",
    "vqabench.runner",
    "vqabench.store",
    "vqabench.report",
    "vqabench.headless",
    "vqabench.cli",
]


def imported_after(statement: str) -> set[str]:
    """Top-level packages in sys.modules after running `statement` in a fresh interpreter."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.splitlines()[-1]))


def test_runner_store_report_headless_and_cli_do_not_import_textual_or_torch():
    loaded = imported_after("; ".join(f"import {m}" for m in HOST_MODULES))
    assert "vqabench" in loaded
    assert "textual" not in loaded
    assert "torch" not in loaded and "transformers" not in loaded


def test_cli_help_stays_light():
    loaded = imported_after(
        "import sys; sys.argv = ['vqabench', '--help']\n"
        "from vqabench.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass"
    )
    assert not {"textual", "torch", "rich"} & loaded


def test_the_event_writer_lives_with_the_protocol_so_the_engine_has_no_import_circle():
    # base_checkpoint -> worker -> run -> base_checkpoint was a circle while EventWriter lived in the worker.
    code = (
        "import sys, vqabench.engine.base_checkpoint\n"
        "print('circle' if 'vqabench.engine.worker' in sys.modules else 'ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "ok"
