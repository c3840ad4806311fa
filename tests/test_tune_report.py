"""What tuning came to, reported: the store keeps it, the report's Tuned table, the export's figures and
`tune`'s console summary draw the same rows."""

from __future__ import annotations

import io
import json
import re
import sqlite3

import optuna
import pytest
from fake_worker import worker_cmd
from jsonschema import Draft202012Validator
from optuna.trial import TrialState
from rich.console import Console

from vqabench.export import export_json, export_report
from vqabench.presets import Overrides
from vqabench.report import SCHEMA_FILE, build_report, report_json
from vqabench.store import ResultsStore, TunedRecord
from vqabench.tune.console import run_tune
from vqabench.tune.study import TuneSettings, open_storage

#: Two searched settings (so Optuna can rank them); trial 0 runs the preset's own lr.
SPACE = "tune={lr={low=1e-5,high=1e-3,log=true},weight_decay={low=0.0,high=0.1}}"
#: The fake worker's eval loss does not depend on the setting: offsets make trial 1 the best.
OFFSETS = {"sft.trial0": 0.3, "sft.trial2": 0.1, "sft.trial3": 0.2}
EM_CI = [0.41, 0.69]


def test_tune_records_its_outcome_and_the_report_console_and_figures_show_it(tmp_path):
    plan = {"runs": {name: {"eval_loss_offset": o} for name, o in OFFSETS.items()}}
    plan["runs"]["sft.tuned"] = {"eval_extra": {"em_ci": EM_CI}}
    out = io.StringIO()
    console = Console(file=out, width=400, highlight=False)
    overrides = Overrides(epochs=1, settings=(SPACE,))
    code = run_tune(
        "sft",
        overrides,
        tmp_path / "r",
        TuneSettings(trials=4, prune=False),
        worker_cmd=worker_cmd(tmp_path, plan),
        console=console,
    )
    assert code == 0, out.getvalue()

    storage = f"sqlite:///{(tmp_path / 'r' / 'tune.db').resolve()}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(storage=open_storage(storage), study_name=summary.study_name)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    with ResultsStore(tmp_path / "r", create=False) as store:
        (session,) = store.list_sessions()
        (record,) = store.tuned(session.id)
        # the store's record agrees with the study (an independent reader: Optuna)
        assert (record.preset, record.storage, record.study, record.budget) == ("sft", storage, study.study_name, 4)
        assert (record.complete, record.pruned, record.failed) == (4, 0, 0)
        assert record.best_trial == study.best_trial.number == 1
        assert record.best_params == pytest.approx(study.best_trial.params)
        # the fake's SFT eval loss after one epoch is 1.1 + 0.1; trial 0 (the preset's lr) carries +0.3
        assert record.best_value == pytest.approx(1.2) and record.preset_value == pytest.approx(1.5)
        assert [t[:2] for t in record.trials] == [[n, "COMPLETE"] for n in range(4)]
        assert [t[2] for t in record.trials] == pytest.approx([1.5, 1.2, 1.3, 1.4])
        assert record.tuned_run == "sft.tuned" and record.to_tuned_seconds >= record.tuning_seconds > 0

        report = build_report(store, session.id)
        table = report.tables[0]
        assert table.name == "tuned" and len(table.cells) == 1
        row = dict(zip(table.columns, table.cells[0], strict=True))
        assert row["Preset"].text == "sft"
        assert (row["Trials"].value, row["Pruned"].value, row["Failed"].value) == (4, 0, 0)
        assert row["Best eval objective"].text == "1.2000 (trial 1)" and row["Preset's setting"].text == "1.5000"
        tuned_run = next(r for r in store.runs(session.id) if r.name == "sft.tuned")
        (test,) = [e for e in store.evals(tuned_run.id) if e.split == "test"]
        assert row["Test EM ↑"].value == test.em and (row["Test EM ↑"].low, row["Test EM ↑"].high) == tuple(EM_CI)
        assert row["Judge ↑"].value == test.judge_score

        # the console printed the same cells, read back from the store
        printed = out.getvalue()
        for cell in table.cells[0]:
            assert cell.text in printed

        # JSON and Markdown exports hold the table; the JSON follows the shipped schema
        document = report_json(report)
        schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
        assert list(Draft202012Validator(schema).iter_errors(document)) == []
        assert document["tables"][0]["name"] == "tuned"
        assert (
            json.loads(export_json(report, tmp_path / "r.json").read_text())["tables"][0]["rows"][0][0]["value"]
            == "sft"
        )
        written = export_report(report, tmp_path / "report.md")
        text = written.path.read_text()
        assert "## Tuned" in text and "| sft " in text
        names = sorted(p.name for p in written.figures)
        assert "tune-convergence.svg" in names and "tune-importance.svg" in names
        svg = (tmp_path / "report_files" / "tune-convergence.svg").read_text()
        assert 'id="tune-sft"' in svg
        importance = (tmp_path / "report_files" / "tune-importance.svg").read_text()
        assert 'id="importance-sft"' in importance
        assert "cannot be opened" not in text


def _record(storage: str, trials: list[list[object]]) -> TunedRecord:
    return TunedRecord(
        preset="orpo",
        method="orpo",
        after=None,
        storage=storage,
        study="s.orpo",
        objective="chosen_nll",
        budget=len(trials),
        complete=sum(1 for t in trials if t[1] == "COMPLETE"),
        pruned=sum(1 for t in trials if t[1] == "PRUNED"),
        failed=0,
        best_params={"lr": 1e-4},
        best_value=0.9,
        best_trial=0,
        preset_value=None,
        tuned_run=None,
        tuning_seconds=3.0,
        retrain_seconds=0.0,
        to_tuned_seconds=3.0,
        trials=trials,
    )


def test_a_storage_that_cannot_be_opened_leaves_out_the_importance_figure_with_one_sentence(tmp_path):
    with ResultsStore(tmp_path / "r") as store:
        session = store.begin_session("orpo", "test")
        gone = f"sqlite:///{tmp_path / 'elsewhere' / 'tune.db'}"
        store.add_tuned(session.id, [_record(gone, [[0, "COMPLETE", 0.9], [1, "PRUNED", None], [2, "COMPLETE", 1.1]])])
        report = build_report(store, session.id)
        written = export_report(report, tmp_path / "report.md")
    assert [p.name for p in written.figures] == ["tune-convergence.svg"]
    assert not (tmp_path / "elsewhere").exists()  # not created by trying
    text = written.path.read_text()
    assert f"The study storage {gone} cannot be opened here" in text
    assert "| orpo " in text and "no tuned run" in text


def test_a_method_with_too_few_trials_says_so_in_the_importance_caption(tmp_path):
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    study = optuna.create_study(storage=storage, study_name="s.orpo")
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 1e-4}, distributions={"lr": optuna.distributions.FloatDistribution(1e-5, 1e-3)}, value=0.9
        )
    )
    with ResultsStore(tmp_path / "r") as store:
        session = store.begin_session("orpo", "test")
        store.add_tuned(session.id, [_record(storage, [[0, "COMPLETE", 0.9]])])
        report = build_report(store, session.id)
        written = export_report(report, tmp_path / "report.md")
    assert sorted(p.name for p in written.figures) == ["tune-convergence.svg", "tune-importance.svg"]
    text = written.path.read_text()
    assert re.search(r"no ranking for orpo: 1 complete trial\(s\), too few to rank parameters", text)


def test_the_tuned_table_is_a_versioned_migration(tmp_path):
    with ResultsStore(tmp_path / "r") as store:
        version = store.schema_version
    with sqlite3.connect(tmp_path / "r" / "results.db") as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(tuned)")}
    assert version >= 6 and {"storage", "best_params", "trials", "to_tuned_seconds"} <= columns
