"""benchmarks/record.py writes a command's output into the docs verbatim, with commit, machine and command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RECORD = Path(__file__).resolve().parent.parent / "benchmarks" / "record.py"


def record(doc: Path, name: str, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RECORD), name, "--doc", str(doc), "--", *command], capture_output=True, text=True
    )


def test_output_is_recorded_verbatim_between_markers_and_replaced_on_the_next_run(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nHand-written prose stays.\n")
    table = "| Method | ms/step |\n|:--|--:|\n| sft | 43.9 |"
    assert record(doc, "probe", sys.executable, "-c", f"print({table!r})").returncode == 0
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written prose stays.\n\n## probe\n\n<!-- record: probe -->\n")
    assert f"\n{table}\n<!-- /record: probe -->" in text
    assert "Recorded by `benchmarks/record.py` on " in text and ": commit " in text and " cores, torch " in text
    assert "1-minute load average" in text and f"    {sys.executable} -c " in text
    assert record(doc, "probe", sys.executable, "-c", "print('| sft | 44.0 |')").returncode == 0
    again = doc.read_text()
    assert again.count("<!-- record: probe -->") == 1 and "| sft | 44.0 |" in again and "43.9" not in again


def test_a_failing_command_leaves_the_doc_unchanged(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    proc = record(doc, "x", sys.executable, "-c", "import sys; print('half'); sys.exit(3)")
    assert proc.returncode == 3 and "is unchanged" in proc.stderr
    assert doc.read_text() == "# Benchmarks\n"
