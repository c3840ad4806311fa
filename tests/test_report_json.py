"""The JSON report: valid against the shipped schema, holding every figure the Markdown shows, versioned."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from test_headless import fake, vqabench
from test_report import INTERVALS, paper_like_session

from vqabench.report import (
    SCHEMA_FILE,
    SCHEMA_VERSION,
    ReportFileError,
    build_report,
    load_report_json,
    render_json,
    report_markdown,
)

NUMBER = re.compile(r"(<\s*)?([-+]?\d[\d,]*(?:\.\d+)?)")


def markdown_tables(text: str) -> dict[str, list[list[str]]]:
    """Each pipe table of a Markdown report under its heading, as rows of cell texts (header and rule left out)."""
    tables: dict[str, list[list[str]]] = {}
    title = None
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
        elif line.startswith("|") and title is not None:
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            tables.setdefault(title, []).append(cells)
    return {title: rows[2:] for title, rows in tables.items()}


def numbers_of(cell: dict) -> list[float]:
    """Every number a JSON cell holds: its value, interval and numeric details."""
    values = [cell["value"], *cell.get("interval", []), *cell.get("details", {}).values()]
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


def assert_markdown_figures_are_in_the_json(markdown: str, document: dict) -> int:
    """Every number in every Markdown table cell equals (within its printed rounding) a number of the JSON
    cell at the same place; a word cell is the JSON value itself. Returns how many numbers were checked."""
    by_title = {t["title"]: t for t in [*document["tables"], *document["epoch_tables"]]}
    checked = 0
    for title, rows in markdown_tables(markdown).items():
        table = by_title[title]
        assert len(rows) == len(table["rows"]), title
        for md_row, json_row in zip(rows, table["rows"], strict=True):
            assert len(md_row) == len(json_row), (title, md_row)
            for text, cell in zip(md_row, json_row, strict=True):
                if isinstance(cell["value"], str):
                    assert text == cell["value"], (title, text, cell)
                    continue
                if not NUMBER.search(text):
                    assert cell["value"] is None and text in ("n/a", "–", "none"), (title, text, cell)
                    continue
                held = numbers_of(cell)
                for below, token in NUMBER.findall(text):
                    shown = float(token.replace(",", ""))
                    decimals = len(token.split(".")[1]) if "." in token else 0
                    if below:  # "< 0.001": a p-value under the smallest one printed
                        assert cell["value"] is not None and cell["value"] < shown, (title, text, cell)
                    else:
                        tolerance = 0.5 * 10**-decimals + 1e-9
                        assert any(abs(shown - x) <= tolerance for x in held), (title, text, cell)
                    checked += 1
    return checked


def schema_errors(document: dict) -> list[str]:
    """What the shipped JSON Schema finds wrong with a document (the schema itself checked first)."""
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return [f"{list(e.path)}: {e.message}" for e in Draft202012Validator(schema).iter_errors(document)]


def test_the_json_export_follows_the_shipped_schema_and_holds_every_markdown_figure(tmp_path):
    store, session_id = paper_like_session(tmp_path, crash={"dpo-beta0.5": 2}, extra={"dpo-beta0.1": INTERVALS})
    report = build_report(store, session_id)
    document = json.loads(render_json(report))
    import vqabench

    assert Path(vqabench.__file__).parent / "assets" == SCHEMA_FILE.parent  # shipped in the wheel with the package
    assert schema_errors(document) == []
    assert document["schema_version"] == SCHEMA_VERSION == 2
    assert document["session"]["machine"] == "testbox" and document["session"]["devices"] == ["cpu"]
    assert [r["config"]["name"] for r in document["runs"]] == ["orpo", "sft", "dpo-beta0.1", "dpo-beta0.5"]
    assert document["runs"][2]["config"]["beta"] == 0.1
    assert document["unfinished"] == report.unfinished and len(report.unfinished) == 1
    checked = assert_markdown_figures_are_in_the_json(report_markdown(report), document)
    assert checked > 100  # quality, efficiency and the per-epoch tables, not a vacuous pass

    quality = next(t for t in document["tables"] if t["name"] == "quality")
    dpo = next(row for row in quality["rows"] if row[0]["value"] == "dpo-beta0.1")
    em = dpo[2]  # Method, Model, EM: the interval the worker sent, the unit and the note defining them
    assert em["unit"] == "fraction" and em["interval"] == INTERVALS["em_ci"]
    assert any(note.startswith("Brackets: 95% confidence interval") for note in quality["notes"])
    efficiency = report.table("efficiency")
    assert efficiency is not None and efficiency.cells[0][1].unit == "s"


def test_a_report_of_another_schema_version_is_refused_in_one_sentence(tmp_path):
    store, session_id = paper_like_session(tmp_path)
    document = json.loads(render_json(build_report(store, session_id)))
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(document))
    assert load_report_json(path)["session"]["id"] == session_id
    path.write_text(json.dumps({**document, "schema_version": 1}))
    with pytest.raises(ReportFileError) as caught:
        load_report_json(path)
    message = str(caught.value)
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    assert str(path) in message and "schema_version 1" in message and "schema_version 2" in message
    path.write_text("{not json")
    with pytest.raises(ReportFileError, match="is not a JSON report"):
        load_report_json(path)


def test_headless_json_writes_the_report_and_export_format_json_writes_the_same(tmp_path):
    proc = vqabench(tmp_path, "--headless", "--preset", "sft", "--epochs", "1", "--json", "r.json", *fake(tmp_path, {}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Wrote the JSON report to r.json." in proc.stdout
    written = json.loads((tmp_path / "r.json").read_text())
    assert schema_errors(written) == []
    assert written["schema_version"] == SCHEMA_VERSION and [r["name"] for r in written["runs"]] == ["sft"]
    assert written["runs"][0]["config"]["epochs"] == 1
    again = vqabench(tmp_path, "export", "--last", "--format", "json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == written


def test_the_versus_sft_data_and_probe_tables_hold_every_markdown_figure_too(tmp_path):
    from fake_worker import canned_probe
    from test_probe import _plan

    from vqabench.events import Evaluated, RunStarted
    from vqabench.report import RunData, SessionReport, data_table, probe_table, versus_sft_table

    def run(name: str, method: str, ems: list[int]) -> RunData:
        rows = [{"question": f"q{i}", "reference": "r", "prediction": "p", "em": e, "f1": e} for i, e in enumerate(ems)]
        for i, row in enumerate(rows):
            row["verdict"] = "correct" if (row["em"] or i % 3 == 0) else "incorrect"
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        final = Evaluated(split="test", n=len(ems), em=sum(ems) / len(ems), f1=0.0, predictions=str(path))
        quality = {
            "rows_read": 1200,
            "pairs_built": 1180,
            "skipped": {"missing_image": 15, "rating_tie": 5},
            "token_stats": {"max_answer_tokens": 87, "max_answer_tokens_setting": "auto", "p50": 41, "p99": 87},
        }
        started = RunStarted(name, method, {}, "cpu", "2", 1, 2, None, 0, 1, 1, "n/a", data={"quality": quality})
        return RunData(name, method, "done", started=started, final_eval=final, setup="embedded on easyvqa")

    runs = [run("sft", "sft", [1] * 50 + [0] * 50), run("orpo", "orpo", [1] * 80 + [0] * 20)]
    versus, data = versus_sft_table(runs), data_table(runs)
    assert versus is not None and data is not None
    started, *measured = canned_probe(_plan())
    report = SessionReport("header", [], [versus, data, probe_table(started, measured)], runs=runs)
    document = json.loads(render_json(report))
    assert schema_errors(document) == []
    assert [t["name"] for t in document["tables"]] == ["versus_sft", "data", "probe"]
    assert assert_markdown_figures_are_in_the_json(report_markdown(report), document) > 40
    orpo = document["tables"][0]["rows"][0]
    assert orpo[3] == {"value": pytest.approx(2 * 0.5**30), "unit": "probability"}  # printed "< 0.001"
    assert orpo[2]["interval"][0] > 0 and orpo[2]["value"] == pytest.approx(0.3)
