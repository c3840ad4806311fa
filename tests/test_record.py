"""benchmarks/record.py writes a command's output into the docs verbatim, with commit, machine and command."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

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


def _load_record(monkeypatch, repo: Path):
    """record.py as a module whose repository is `repo` (a real git repository made for the test)."""
    spec = importlib.util.spec_from_file_location("record_under_test", RECORD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "REPO", repo)
    return module


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=repo, check=True)


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "benchmarks.md").write_text("# Benchmarks\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "start")
    return tmp_path


def _commit_line(text: str, name: str) -> str:
    return text.split(f"<!-- record: {name} -->\n", 1)[1].split("\n", 1)[0]


def test_the_doc_record_py_writes_does_not_mark_the_next_record_dirty(repo, monkeypatch):
    record_module = _load_record(monkeypatch, repo)
    doc = repo / "docs" / "benchmarks.md"
    for name in ("first", "second"):
        assert record_module.main([name, "--doc", str(doc), "--", sys.executable, "-c", "print(1)"]) == 0
    text = doc.read_text()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    for name in ("first", "second"):
        assert f": commit {head.strip()}, machine " in _commit_line(text, name)


@pytest.mark.parametrize("change", ["edited", "staged", "renamed", "untracked"])
def test_any_other_change_to_tracked_files_marks_the_record_dirty(repo, monkeypatch, change):
    record_module = _load_record(monkeypatch, repo)
    doc = repo / "docs" / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nchanged by an earlier record\n")
    if change == "edited":
        (repo / "code.py").write_text("x = 2\n")
    elif change == "staged":
        (repo / "code.py").write_text("x = 2\n")
        _git(repo, "add", "code.py")
    elif change == "renamed":
        _git(repo, "mv", "code.py", "moved.py")
    else:
        (repo / "new.py").write_text("y = 1\n")  # untracked files do not count
    revision = record_module.commit(doc)
    assert revision.endswith("-dirty") == (change != "untracked"), revision
