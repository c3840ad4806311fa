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
    "vqabench.charts",
    "vqabench.export",
    "vqabench.figures",
    "vqabench.preload_launcher",
    "vqabench.tune.study",
    "vqabench.tune.summary",
    "vqabench.tune.console",
]


def last_line_of(code: str, timeout: float = 120) -> str:
    """The last line `code` prints in a fresh interpreter run from the repository."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()[-1]


def imported_after(statement: str) -> set[str]:
    """Top-level packages in sys.modules after running `statement` in a fresh interpreter."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    return set(json.loads(last_line_of(code, timeout=60)))


def test_runner_store_report_headless_and_cli_do_not_import_textual_or_torch():
    loaded = imported_after("; ".join(f"import {m}" for m in HOST_MODULES))
    assert "vqabench" in loaded
    assert "textual" not in loaded
    assert "torch" not in loaded and "transformers" not in loaded
    assert "matplotlib" not in loaded  # imported only when figures are drawn, so start-up stays fast


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
    assert last_line_of(code) == "ok"


def test_no_module_outside_models_names_a_model_family():
    """The engine and the host talk to models only through the seam (vqabench/models/)."""
    package = REPO / "vqabench"
    naming = [
        str(path.relative_to(REPO))
        for path in package.rglob("*.py")
        if "models" not in path.relative_to(package).parts[:1] and "blip" in path.read_text().lower()
    ]
    assert naming == []
