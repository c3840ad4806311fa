"""The JSON renderer: every figure of every table (value, interval, unit, details), the notes that
define them, the session's machine and versions, and each run's config, under a `schema_version`.

The export follows ``vqabench/assets/report.schema.json``; :func:`load_report_json` reads one back and
refuses another schema version in one sentence (a CI gate compares a session with such a file).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from vqabench.report.model import Cell, ReportTable
from vqabench.report.regressions import run_measurements
from vqabench.report.session import SessionReport

#: The version of the JSON layout; a change that breaks a reader of the old layout raises it.
SCHEMA_VERSION = 2  # 2: each run's measurements (per-question scores, epoch and step times, memory)
SCHEMA_FILE = Path(__file__).resolve().parent.parent / "assets" / "report.schema.json"


class ReportFileError(ValueError):
    """A JSON report that cannot be read: its message is one sentence for the user."""


def report_json(report: SessionReport) -> dict[str, Any]:
    """A SessionReport as a JSON-ready dict (``json.dumps`` writes it as is)."""
    session = report.session
    started = [r.started for r in report.runs if r.started is not None]
    return {
        "schema_version": SCHEMA_VERSION,
        "session": {
            "id": session.id if session else None,
            "label": session.label if session else None,
            "started_at": session.started_at if session else None,
            "finished_at": session.finished_at if session else None,
            "status": session.status if session else None,
            "selection": session.selection if session else None,
            "command": session.command if session else None,
            "machine": session.machine if session else None,
            "processor": session.processor if session else None,
            "platform": session.platform if session else None,
            "python_version": session.python_version if session else None,
            "vqabench_version": session.vqabench_version if session else None,
            "devices": sorted({s.device for s in started}),
            "torch_versions": sorted({s.torch_version for s in started}),
            "header": report.header,
        },
        "unfinished": list(report.unfinished),
        "runs": [
            {
                "name": run.name,
                "method": run.method,
                "status": run.status,
                "reason": run.reason,
                "after": run.after,
                "setup": run.setup,
                "device": run.started.device if run.started else None,
                "config": run.spec,
                "measurements": run_measurements(run),
            }
            for run in report.runs
        ],
        "tables": [table_json(table) for table in report.tables],
        "epoch_tables": [table_json(table) for table in report.epoch_tables],
    }


def table_json(table: ReportTable) -> dict[str, Any]:
    """One table: its name, title, columns (with their unit), rows of cells, and the notes that define them."""
    units = [next((row[i].unit for row in table.cells if row[i].unit), None) for i in range(len(table.columns))]
    return {
        "name": table.name,
        "title": table.title,
        "columns": [
            {"title": title, "align": align, "unit": unit}
            for title, align, unit in zip(table.columns, table.align, units, strict=True)
        ],
        "rows": [[cell_json(cell) for cell in row] for row in table.cells],
        "notes": list(table.notes),
    }


def cell_json(cell: Cell) -> dict[str, Any]:
    """A figure: value (number, word or null), unit, and where it has them its interval and details."""
    out: dict[str, Any] = {"value": _finite(cell.value), "unit": cell.unit}
    if cell.low is not None and cell.high is not None:
        out["interval"] = [_finite(cell.low), _finite(cell.high)]
    if cell.details:
        out["details"] = {key: _finite(value) for key, value in cell.details.items()}
    return out


def render_json(report: SessionReport) -> str:
    """The JSON report as text, indented, ending with a newline."""
    return json.dumps(report_json(report), indent=2, ensure_ascii=False) + "\n"


def load_report_json(path: Path | str) -> dict[str, Any]:
    """Read a JSON report written by :func:`render_json`; raises ReportFileError (one sentence) for a file
    that is missing, not JSON, or of another schema version."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReportFileError(f"cannot read the JSON report {path} ({exc.strerror}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportFileError(f"{path} is not a JSON report ({exc}).") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise ReportFileError(
            f"{path} has schema_version {version!r}, but this vqabench reads schema_version {SCHEMA_VERSION} only; "
            f"export the session again with 'vqabench export --format json'."
        )
    return data


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a float is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
