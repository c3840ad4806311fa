"""The CI gate: ``--baseline BASELINE --fail-on LIMITS`` on headless and ``vqabench compare --baseline``.

BASELINE is a JSON report (``vqabench export --format json``, headless ``--json``) or ``store:ID``, session
ID of the results store (``--results``). Everything the user can get wrong (a missing file, another
schema_version, a --fail-on that does not parse, an unknown session) is found by :func:`prepare_gate`
before a run starts, as one sentence (:class:`GateError`). After the runs, :func:`apply_gate` compares the
session with the baseline (:func:`vqabench.report.compare_reports`), adds the Regressions table to its
report, and says whether a regression is real; :func:`append_step_summary` appends the Markdown report to
``$GITHUB_STEP_SUMMARY``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vqabench.report import (
    DEFAULT_FAIL_ON,
    FailOnError,
    GateResult,
    ReportFileError,
    SessionReport,
    build_report,
    compare_reports,
    load_report_json,
    parse_fail_on,
    report_json,
)
from vqabench.store import ResultsStore

STORE_PREFIX = "store:"


class GateError(ValueError):
    """A baseline or --fail-on that cannot be used: its message is one sentence."""


@dataclass
class Gate:
    """A loaded baseline (a JSON report as a dict), what it is, and the limits to fail on."""

    baseline: dict[str, Any]
    source: str  # "baseline.json" or "session 3 of results/"
    limits: dict[str, float]


def prepare_gate(baseline: str, fail_on: str | None, results_dir: Path | str) -> Gate:
    """Parse `fail_on` (None: DEFAULT_FAIL_ON) and load `baseline`: a JSON report's path or store:ID."""
    try:
        limits = parse_fail_on(fail_on if fail_on is not None else DEFAULT_FAIL_ON)
    except FailOnError as exc:
        raise GateError(str(exc)) from None
    if baseline.startswith(STORE_PREFIX):
        text = baseline[len(STORE_PREFIX) :].strip()
        if not text.isdigit():
            raise GateError(
                f"--baseline {baseline!r} names no session; write store:ID with the id of a session "
                f"in the results store ({results_dir}), or the path of a JSON report."
            )
        with ResultsStore(results_dir, create=False) as store:
            document = report_json(build_report(store, int(text)))
        return Gate(document, f"session {text} of {results_dir}", limits)
    try:
        document = load_report_json(baseline)
    except ReportFileError as exc:
        raise GateError(f"--baseline: {exc}") from None
    return Gate(document, baseline, limits)


def apply_gate(gate: Gate, report: SessionReport) -> GateResult:
    """Compare the session's report with the baseline; the Regressions table is added to `report`."""
    result = compare_reports(gate.baseline, report_json(report), gate.limits)
    result.table.notes.insert(0, f"Baseline: {gate.source}.")
    report.tables.insert(0, result.table)  # first: in the job summary it is what a reader looks for
    return result


def verdict_lines(result: GateResult) -> list[str]:
    """For the console: the baseline, the runs compared (and those only one side has), and the verdict."""
    return [*result.table.notes[:2], verdict_line(result)]


def verdict_line(result: GateResult) -> str:
    """One line for the console: whether the gate passed, and which figures regressed."""
    if not result.failed:
        worse = sum(1 for c in result.comparisons if c.verdict != "ok")
        noise = f"; {worse} figure(s) worse within noise" if worse else ""
        return f"No regression against the baseline ({len(result.comparisons)} figure(s) compared{noise})."
    names = ", ".join(f"{c.run} {c.figure}" for c in result.regressions)
    return f"Regression against the baseline: {names}."


def append_step_summary(markdown: str, environ: Mapping[str, str] | None = None) -> Path | None:
    """Append `markdown` to the file $GITHUB_STEP_SUMMARY names (GitHub Actions' job summary), if set.
    Raises OSError when it cannot be written."""
    target = (os.environ if environ is None else environ).get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    path = Path(target)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(markdown if markdown.endswith("\n") else markdown + "\n")
    return path
