"""The SQLite results store: round trips, schema versions, raw event files."""

from __future__ import annotations

import dataclasses
import json
import sqlite3

import pytest
from fake_worker import canned_events

import vqabench.store as store_module
from vqabench.events import (
    EpochEnded,
    Evaluated,
    ProbeMeasured,
    ProbeStarted,
    RunFailed,
    RunFinished,
    RunStarted,
    encode_event,
)
from vqabench.runner import (
    InvalidWorkerLine,
    RunnerFinished,
    RunQueued,
    RunStatusChanged,
    WorkerEvent,
    WorkerStderr,
)
from vqabench.spec import RunSpec
from vqabench.store import SCHEMA_VERSION, ResultsStore, StoreError


def record_run(recorder, spec: RunSpec, events, position: int = 0, status: str = "done") -> None:
    recorder(RunQueued(spec.name, spec, position))
    recorder(RunStatusChanged(spec.name, "running", spec=spec.replace(output_dir="/out"), pid=4242))
    for event in events:
        recorder(WorkerEvent(spec.name, event, encode_event(event)))
    recorder(RunStatusChanged(spec.name, status, "" if status == "done" else "it broke", exit_code=0))


def test_a_session_round_trips_through_the_store(tmp_path):
    store = ResultsStore(tmp_path)
    session = store.begin_session("all", "vqabench --headless", machine="box", processor="cpu9")
    recorder = store.recorder(session)
    spec = RunSpec(name="sft", method="sft", epochs=2)
    events = list(
        canned_events(spec.to_dict(), eval_extra={"em_ci": [0.5, 0.7], "judge_kappa": 0.4}, checkpoint="/out/best")
    )
    record_run(recorder, spec, events)
    recorder(RunnerFinished({"sft": "done"}, cancelled=False))

    [run] = store.runs(session.id)
    assert (run.name, run.method, run.status, run.pid, run.output_dir) == ("sft", "sft", "done", 4242, "/out")
    assert run.spec["output_dir"] == "/out" and run.spec["epochs"] == 2
    assert run.started == events[0]
    assert run.finished == events[-1] and run.failed is None
    assert store.epochs(run.id) == [e for e in events if isinstance(e, EpochEnded)]
    assert store.evals(run.id) == [e for e in events if isinstance(e, Evaluated)]
    stored = store.last_session()
    assert (stored.id, stored.status, stored.machine, stored.processor) == (session.id, "done", "box", "cpu9")
    assert stored.label.endswith(f"-{session.id}") and stored.finished_at is not None
    raw = (tmp_path / run.events_path).read_text().splitlines()
    assert raw == [encode_event(e) for e in events]


def test_failures_stderr_and_bad_lines_are_kept(tmp_path):
    store = ResultsStore(tmp_path)
    session = store.begin_session()
    recorder = store.recorder(session)
    spec = RunSpec(name="orpo", method="orpo")
    failure = RunFailed(error_kind="numerics", message="the loss became NaN.", traceback="Traceback ...")
    recorder(RunQueued("orpo", spec, 0))
    recorder(WorkerStderr("orpo", "step 3 loss nan"))
    recorder(InvalidWorkerLine("orpo", "garbage", "not JSON"))
    recorder(WorkerEvent("orpo", failure, encode_event(failure)))
    recorder(RunStatusChanged("orpo", "failed", "the loss became NaN.", exit_code=1))
    [run] = store.runs(session.id)
    assert run.failed == failure and run.invalid_lines == 1 and run.exit_code == 1
    assert store.stderr_tail(run) == ["step 3 loss nan", "[vqabench: ignored stdout line: not JSON] garbage"]


def test_infinite_losses_survive_the_round_trip(tmp_path):
    store = ResultsStore(tmp_path)
    session = store.begin_session()
    recorder = store.recorder(session)
    spec = RunSpec(name="sft", method="sft", epochs=1)
    events = list(canned_events(spec.to_dict()))
    events[2] = dataclasses.replace(events[2], eval_loss=float("inf"))
    record_run(recorder, spec, events)
    [run] = store.runs(session.id)
    assert store.epochs(run.id)[0].eval_loss == float("inf")


def test_every_event_field_has_a_column():
    tables = {}
    with sqlite3.connect(":memory:") as conn:
        for script in store_module.MIGRATIONS:  # every schema step, as a new store gets them
            for statement in store_module._statements(script):
                conn.execute(statement)
        for table in ("runs", "epochs", "evals", "probes", "probe_rounds"):
            tables[table] = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    assert {f.name for f in dataclasses.fields(EpochEnded)} <= tables["epochs"]
    assert {f.name for f in dataclasses.fields(Evaluated)} <= tables["evals"]
    assert {f.name for f in dataclasses.fields(RunStarted)} - {"run", "method"} <= tables["runs"]
    assert {f.name for f in dataclasses.fields(RunFinished)} <= tables["runs"]
    assert {"error_kind", "error_message", "traceback"} <= tables["runs"]
    assert {f.name for f in dataclasses.fields(ProbeStarted)} <= tables["probes"]
    assert {f.name for f in dataclasses.fields(ProbeMeasured)} <= tables["probe_rounds"]


def test_the_store_uses_wal_and_records_its_schema_version(tmp_path):
    ResultsStore(tmp_path).close()
    with sqlite3.connect(tmp_path / "results.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_an_older_store_is_migrated_and_keeps_its_data(tmp_path, monkeypatch):
    with ResultsStore(tmp_path) as old:
        session_id = old.begin_session("all").id
    newer = (*store_module.MIGRATIONS, "ALTER TABLE sessions ADD COLUMN note TEXT DEFAULT 'n'")
    monkeypatch.setattr(store_module, "MIGRATIONS", newer)
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", len(newer))
    with ResultsStore(tmp_path) as migrated:
        assert migrated.schema_version == SCHEMA_VERSION + 1
        assert migrated.session(session_id).selection == "all"
        assert migrated._query("SELECT note FROM sessions")[0][0] == "n"


def test_a_version_1_store_gets_train_and_precision_from_its_runs_config(tmp_path):
    spec = RunSpec(name="all-parts", method="sft", train="all", epochs=1)
    with sqlite3.connect(tmp_path / "results.db") as conn:  # a store as version 1 wrote it
        for statement in store_module._statements(store_module.MIGRATIONS[0]):
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute("INSERT INTO sessions (label, started_at, status) VALUES ('s', '2026-01-01T00:00:00', 'done')")
        conn.execute(
            "INSERT INTO runs (session_id, name, position, method, status, spec, config, device, torch_version) "
            "VALUES (1, 'all-parts', 0, 'sft', 'done', ?, ?, 'cpu', '2')",
            (json.dumps(spec.to_dict()), json.dumps(spec.to_dict())),
        )
    with ResultsStore(tmp_path) as migrated:
        run = migrated.runs(1)[0]
        assert (run.started.train, run.started.precision) == ("all", "fp32")


def test_a_store_from_a_newer_vqabench_is_refused_with_one_sentence(tmp_path):
    ResultsStore(tmp_path).close()
    with sqlite3.connect(tmp_path / "results.db") as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=r"written by a newer vqabench .*upgrade vqabench or pass another --results"):
        ResultsStore(tmp_path)


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    (tmp_path / "results.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="is not a vqabench results store"):
        ResultsStore(tmp_path)


def test_sessions_are_listed_newest_first_and_unknown_ones_are_named(tmp_path):
    store = ResultsStore(tmp_path)
    assert store.last_session() is None
    ids = [store.begin_session(str(n)).id for n in range(3)]
    assert [s.id for s in store.list_sessions()] == ids[::-1]
    assert store.last_session().id == ids[-1]
    with pytest.raises(StoreError, match=r"has no session 99; sessions are 1, 2, 3\."):
        store.session(99)


def test_opening_a_missing_store_for_reading_says_what_to_do(tmp_path):
    with pytest.raises(StoreError, match=r"there is no results store at .*run 'vqabench --headless' first"):
        ResultsStore(tmp_path / "none", create=False)


def test_a_second_connection_reads_while_the_first_writes(tmp_path):
    writer = ResultsStore(tmp_path)
    session = writer.begin_session()
    recorder = writer.recorder(session)
    spec = RunSpec(name="sft", method="sft", epochs=3)
    events = list(canned_events(spec.to_dict()))
    recorder(RunQueued("sft", spec, 0))
    reader = ResultsStore(tmp_path, create=False)
    [run] = reader.runs(session.id)
    for event in events[:4]:  # run_started, then epoch 1
        recorder(WorkerEvent("sft", event, encode_event(event)))
    assert [e.epoch for e in reader.epochs(run.id)] == [1]
    assert reader.runs(session.id)[0].started == events[0]


def test_a_write_waits_for_a_lock_that_is_released_with_backoff(tmp_path):
    import threading

    store = ResultsStore(tmp_path, busy_timeout=0.02, write_attempts=6, write_backoff=0.05)
    blocker = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    threading.Timer(0.15, lambda: blocker.execute("COMMIT")).start()
    session = store.begin_session("all")  # busy at first, then written
    assert store.session(session.id).selection == "all"


def test_a_write_that_stays_locked_raises_one_sentence_naming_the_database(tmp_path):
    from vqabench.runner import FatalSubscriberError
    from vqabench.store import StoreWriteError

    store = ResultsStore(tmp_path, busy_timeout=0.02, write_attempts=2, write_backoff=0.01)
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreWriteError, match=r"results\.db: database is locked after 2 attempts") as caught:
        store.begin_session("all")
    assert isinstance(caught.value, FatalSubscriberError)
    blocker.execute("ROLLBACK")
    assert store.list_sessions() == []


def test_a_moved_results_folder_finds_its_runs_files_in_itself(tmp_path):
    elsewhere = tmp_path / "old" / "runs" / "3-1-sft" / "predictions.jsonl"  # where the run wrote it
    moved = tmp_path / "moved"
    local = moved / "runs" / "3-1-sft" / "predictions.jsonl"
    local.parent.mkdir(parents=True)
    local.write_text("{}\n")
    with ResultsStore(moved) as store:
        assert store.run_file(str(elsewhere)) == local  # the original is gone: this folder's copy
        elsewhere.parent.mkdir(parents=True)
        elsewhere.write_text("{}\n")
        assert store.run_file(str(elsewhere)) == local  # both exist: this folder's copy first
        other = tmp_path / "out" / "x" / "answers.jsonl"
        assert store.run_file(str(other)) == other  # not in this folder: the recorded path
