"""The results store: every session, run, epoch and evaluation in one SQLite file.

Layout of a results folder (default ``./vqabench-results``, ``--results DIR``)::

    results.db                      sessions, runs, epochs, evals (schema in docs/results-store.md)
    events/<session>-<run>.jsonl    every stdout line of the run's worker, as received
    events/<session>-<run>.stderr.log   the worker's log lines
    runs/<session>-<run>/           the worker's output_dir (spec.json, checkpoints)

Writes go through :class:`SessionRecorder`, a runner subscriber; each notification is one
transaction, so a run killed in epoch 3 keeps epochs 1 and 2. The database runs in WAL mode,
so the dashboard can read while a headless session writes. The schema version is
``PRAGMA user_version``; :data:`MIGRATIONS` holds one script per version step, applied in
order when an older store is opened. A store from a newer vqabench is refused with one
sentence. Queries return the same event dataclasses the worker sends (:class:`EpochEnded`,
:class:`Evaluated`, ...), so live and stored data look alike to the report and dashboard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import vqabench
from vqabench.events import EpochEnded, Evaluated, ProbeMeasured, ProbeStarted, RunFailed, RunFinished, RunStarted
from vqabench.runner import (
    CANCELLED,
    DONE,
    FAILED,
    FINAL_STATUSES,
    INTERRUPTED,
    QUEUED,
    RUNNING,
    FatalSubscriberError,
    InvalidWorkerLine,
    Notification,
    RunnerFinished,
    RunQueued,
    RunStatusChanged,
    WorkerEvent,
    WorkerStderr,
)

log = logging.getLogger(__name__)

DEFAULT_RESULTS_DIR = Path("vqabench-results")
DB_NAME = "results.db"

#: One script per schema step: MIGRATIONS[i] turns version i into version i + 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sessions (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        label            TEXT NOT NULL,          -- names the run folders: <label>-<run>
        started_at       TEXT NOT NULL,          -- ISO 8601, UTC
        finished_at      TEXT,
        status           TEXT NOT NULL,          -- running, done, failed, cancelled
        selection        TEXT NOT NULL DEFAULT '',
        command          TEXT NOT NULL DEFAULT '',
        machine          TEXT,
        processor        TEXT,
        platform         TEXT,
        python_version   TEXT,
        vqabench_version TEXT
    );
    CREATE TABLE runs (
        id                 INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id         INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        name               TEXT NOT NULL,
        position           INTEGER NOT NULL,
        method             TEXT NOT NULL,
        after              TEXT,
        status             TEXT NOT NULL,        -- queued, running, done, failed, skipped, cancelled
        reason             TEXT NOT NULL DEFAULT '',
        spec               JSON NOT NULL,
        output_dir         TEXT,
        events_path        TEXT,                 -- relative to the store's folder
        stderr_path        TEXT,
        pid                INTEGER,              -- the process the runner started (its group leader)
        exit_code          INTEGER,
        invalid_lines      INTEGER NOT NULL DEFAULT 0,
        queued_at          TEXT,
        started_at         TEXT,
        finished_at        TEXT,
        -- run_started
        config             JSON,
        device             TEXT,
        torch_version      TEXT,
        trainable_params   INTEGER,
        total_params       INTEGER,
        reference_strategy TEXT,
        reference_bytes    INTEGER,
        epochs             INTEGER,
        steps_per_epoch    INTEGER,
        telemetry          TEXT,
        data               JSON,
        worker_pid         INTEGER,              -- as the worker reports it (pid: the process started)
        -- run_finished
        best_epoch         INTEGER,
        best_eval_loss     REAL,
        checkpoint         TEXT,
        total_seconds      REAL,
        train_seconds      REAL,
        -- run_failed
        error_kind         TEXT,
        error_message      TEXT,
        traceback          TEXT,
        UNIQUE (session_id, name)
    );
    CREATE TABLE epochs (
        run_id                 INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        epoch                  INTEGER NOT NULL,
        epochs                 INTEGER NOT NULL,
        train_loss             REAL,
        eval_loss              REAL,
        epoch_seconds          REAL,
        eval_seconds           REAL,
        samples_per_s          REAL,
        lr                     REAL,
        peak_rss_mib           REAL,
        reference_bytes        INTEGER,
        chosen_logp            REAL,
        rejected_logp          REAL,
        reward_margin          REAL,
        pref_accuracy          REAL,
        is_best                INTEGER NOT NULL,
        cuda_max_allocated_mib REAL,
        cuda_max_reserved_mib  REAL,
        gpu_process_peak_mib   REAL,
        gpu_device_peak_mib    REAL,
        gpu_util_mean          REAL,
        gpu_power_mean_w       REAL,
        em                     REAL,
        f1                     REAL,
        judge_score            REAL,
        scored_n               INTEGER,
        recorded_at            TEXT NOT NULL,
        PRIMARY KEY (run_id, epoch)
    );
    CREATE TABLE evals (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id      INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        split       TEXT NOT NULL,
        n           INTEGER NOT NULL,
        em          REAL,
        f1          REAL,
        judge       TEXT,
        judge_score REAL,
        judge_n     INTEGER NOT NULL DEFAULT 0,
        unparseable INTEGER NOT NULL DEFAULT 0,
        predictions TEXT,
        extra       JSON NOT NULL DEFAULT '{}',
        recorded_at TEXT NOT NULL
    );
    CREATE INDEX runs_by_session ON runs(session_id, position);
    CREATE INDEX evals_by_run ON evals(run_id);
    """,
    """
    -- runs on several processes (torchrun + DDP): run_started's world and batches, epoch_end's per-rank peaks
    ALTER TABLE runs ADD COLUMN world_size INTEGER;
    ALTER TABLE runs ADD COLUMN backend TEXT;
    ALTER TABLE runs ADD COLUMN global_batch INTEGER;
    ALTER TABLE runs ADD COLUMN per_device_batch INTEGER;
    ALTER TABLE epochs ADD COLUMN rank_peak_mib JSON;
    ALTER TABLE epochs ADD COLUMN rank_peak_max_mib REAL;
    ALTER TABLE epochs ADD COLUMN rank_peak_sum_mib REAL;
    """,
    """
    ALTER TABLE sessions ADD COLUMN host_pid INTEGER;      -- the vqabench process that ran it
    ALTER TABLE sessions ADD COLUMN host_started TEXT;     -- its start time (/proc), against pid reuse
    ALTER TABLE epochs ADD COLUMN step_ms_median REAL;
    ALTER TABLE epochs ADD COLUMN step_ms_p10 REAL;
    ALTER TABLE epochs ADD COLUMN step_ms_p90 REAL;
    ALTER TABLE epochs ADD COLUMN step_ms JSON;            -- every step's ms (thinned to 2,048)
    ALTER TABLE epochs ADD COLUMN load_avg_max REAL;
    ALTER TABLE epochs ADD COLUMN cores INTEGER;
    CREATE TABLE probes (
        session_id    INTEGER PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
        presets       JSON NOT NULL,
        device        TEXT NOT NULL,
        torch_version TEXT NOT NULL,
        model_source  TEXT NOT NULL,
        batch_size    INTEGER NOT NULL,
        steps         INTEGER NOT NULL,
        warmup        INTEGER NOT NULL,
        rounds        INTEGER NOT NULL,
        cores         INTEGER NOT NULL,
        pid           INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE probe_rounds (
        session_id         INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        preset             TEXT NOT NULL,
        method             TEXT NOT NULL,
        round              INTEGER NOT NULL,
        step_ms            JSON NOT NULL,
        peak_memory_mib    REAL,
        memory_source      TEXT NOT NULL,
        reference_strategy TEXT,
        reference_bytes    INTEGER NOT NULL,
        setup_seconds      REAL NOT NULL,
        load_avg_max       REAL,
        recorded_at        TEXT NOT NULL,
        PRIMARY KEY (session_id, preset, round)
    );
    """,
    # 4: what trains and in which precision (run_started), AdamW's state size (epoch_end).
    """
    ALTER TABLE runs ADD COLUMN train TEXT;
    ALTER TABLE runs ADD COLUMN precision TEXT;
    UPDATE runs SET train = COALESCE(json_extract(config, '$.train'), 'decoder'), precision = 'fp32'
        WHERE config IS NOT NULL;
    ALTER TABLE epochs ADD COLUMN optimizer_state_bytes INTEGER;
    """,
    # 5: the cores the probe's process may use, against which its load average is judged.
    """
    ALTER TABLE probes ADD COLUMN machine_cores INTEGER;
    """,
    # 6: what `vqabench tune` came to per preset (the report's Tuned table; its figures' study).
    """
    CREATE TABLE tuned (
        session_id       INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        position         INTEGER NOT NULL,
        preset           TEXT NOT NULL,
        method           TEXT NOT NULL,
        after            TEXT,
        storage          TEXT NOT NULL,   -- the study storage's URL, its password replaced by ***
        study            TEXT NOT NULL,
        objective        TEXT NOT NULL,
        budget           INTEGER NOT NULL,
        complete         INTEGER NOT NULL,
        pruned           INTEGER NOT NULL,
        failed           INTEGER NOT NULL,
        best_params      JSON NOT NULL,
        best_value       REAL,
        best_trial       INTEGER,
        preset_value     REAL,
        tuned_run        TEXT,
        tuning_seconds   REAL NOT NULL,
        retrain_seconds  REAL NOT NULL,
        to_tuned_seconds REAL NOT NULL,
        trials           JSON NOT NULL,   -- [[number, state, value or null], ...] in trial order
        recorded_at      TEXT NOT NULL,
        PRIMARY KEY (session_id, preset)
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_EPOCH_FIELDS = [f.name for f in dataclasses.fields(EpochEnded)]
_EVAL_FIELDS = [f.name for f in dataclasses.fields(Evaluated)]
# run_started fields and the runs column each is kept in
_STARTED_COLUMNS = {
    "config": "config",
    "device": "device",
    "torch_version": "torch_version",
    "trainable_params": "trainable_params",
    "total_params": "total_params",
    "reference_strategy": "reference_strategy",
    "reference_bytes": "reference_bytes",
    "epochs": "epochs",
    "steps_per_epoch": "steps_per_epoch",
    "telemetry": "telemetry",
    "data": "data",
    "pid": "worker_pid",
    "world_size": "world_size",
    "backend": "backend",
    "global_batch": "global_batch",
    "per_device_batch": "per_device_batch",
    "train": "train",
    "precision": "precision",
}
_FINISHED_FIELDS = [f.name for f in dataclasses.fields(RunFinished)]
_FAILED_COLUMNS = {"error_kind": "error_kind", "message": "error_message", "traceback": "traceback"}
_JSON_FIELDS = {"config", "data", "extra", "spec", "step_ms", "presets", "rank_peak_mib"}
_PROBE_FIELDS = [f.name for f in dataclasses.fields(ProbeStarted)]
_PROBE_ROUND_FIELDS = [f.name for f in dataclasses.fields(ProbeMeasured)]

#: A write that finds the database locked waits `busy_timeout` seconds inside SQLite, then is
#: tried again after a backoff (doubling from WRITE_BACKOFF), WRITE_ATTEMPTS times in all.
WRITE_ATTEMPTS = 5
WRITE_BACKOFF = 0.5
#: run_started fields added by a later migration, with the value a run recorded before it had
_STARTED_DEFAULTS = {"world_size": 1, "global_batch": 0, "per_device_batch": 0}


class StoreError(Exception):
    """A results store that cannot be used; the message is one sentence for the user."""


class StoreWriteError(StoreError, FatalSubscriberError):
    """A write that still failed after every retry; the runner stops the runs with this message."""


@dataclass
class SessionRecord:
    """One invocation: a set of runs started together."""

    id: int
    label: str
    started_at: str
    finished_at: str | None
    status: str
    selection: str
    command: str
    machine: str | None
    processor: str | None
    platform: str | None
    python_version: str | None
    vqabench_version: str | None


@dataclass
class RunRecord:
    """One run as stored: its status, its spec, and the run_started/finished/failed events."""

    id: int
    session_id: int
    name: str
    position: int
    method: str
    after: str | None
    status: str
    reason: str
    spec: dict[str, Any]
    output_dir: str | None
    events_path: str | None
    stderr_path: str | None
    pid: int | None
    exit_code: int | None
    invalid_lines: int
    queued_at: str | None
    started_at: str | None
    finished_at: str | None
    started: RunStarted | None
    finished: RunFinished | None
    failed: RunFailed | None


@dataclass
class TunedRecord:
    """What tuning one preset came to in a `vqabench tune` session (one row of the Tuned table).

    `trials`: each trial as [number, state, value] (state COMPLETE, PRUNED, FAIL, ...; value the
    eval objective of a complete trial, else None); `storage` never holds a password."""

    preset: str
    method: str
    after: str | None
    storage: str
    study: str
    objective: str
    budget: int
    complete: int
    pruned: int
    failed: int
    best_params: dict[str, Any]
    best_value: float | None
    best_trial: int | None
    preset_value: float | None
    tuned_run: str | None
    tuning_seconds: float
    retrain_seconds: float
    to_tuned_seconds: float
    trials: list[list[Any]]


_TUNED_FIELDS = [f.name for f in dataclasses.fields(TunedRecord)]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ResultsStore:
    """The SQLite results store of one results folder; safe to share between threads."""

    def __init__(
        self,
        results_dir: Path | str = DEFAULT_RESULTS_DIR,
        *,
        create: bool = True,
        busy_timeout: float = 10.0,
        write_attempts: int = WRITE_ATTEMPTS,
        write_backoff: float = WRITE_BACKOFF,
    ) -> None:
        self.results_dir = Path(results_dir)
        self.path = self.results_dir / DB_NAME
        self.write_attempts, self.write_backoff = max(1, write_attempts), write_backoff
        if not self.path.exists() and not create:
            raise StoreError(
                f"there is no results store at {self.path}; run 'vqabench --headless' first or pass --results DIR."
            )
        try:
            self.results_dir.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"the results store {self.path} cannot be opened ({exc}).") from None
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        try:
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
            self.mark_interrupted()
        except StoreError:
            self._conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreError(
                f"{self.path} is not a vqabench results store ({exc}); pass another --results folder."
            ) from None

    def run_file(self, recorded: str | Path) -> Path:
        """A file a run wrote (recorded as an absolute path), found in this results folder first.

        A results folder that was moved or copied still holds its runs under ``runs/``; the
        recorded path is used only when this folder has no such file.
        """
        path = Path(recorded)
        here = self.results_dir / "runs" / path.parent.name / path.name
        return here if here.exists() else path

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema -----------------------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer vqabench (schema version {version}; this one "
                f"reads up to {SCHEMA_VERSION}); upgrade vqabench or pass another --results folder."
            )
        for step in range(version, SCHEMA_VERSION):
            with self._transaction() as conn:
                for statement in _statements(MIGRATIONS[step]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {step + 1}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; a locked database is retried with backoff, then StoreWriteError."""
        with self._lock:
            self._retrying("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            try:
                self._retrying("COMMIT")
            except StoreWriteError:
                self._conn.execute("ROLLBACK")
                raise

    def _retrying(self, statement: str) -> None:
        """Run BEGIN or COMMIT, where SQLite takes the write lock, retrying while the database is busy."""
        delay = self.write_backoff
        for attempt in range(1, self.write_attempts + 1):
            try:
                self._conn.execute(statement)
                return
            except sqlite3.OperationalError as exc:
                message = str(exc)
                if "locked" not in message and "busy" not in message:
                    raise StoreWriteError(f"cannot write to the results store {self.path} ({message}).") from exc
                if attempt == self.write_attempts:
                    raise StoreWriteError(
                        f"cannot write to the results store {self.path}: {message} after {attempt} attempts; "
                        f"another process holds its write lock (close it, or pass another --results folder)."
                    ) from exc
                log.warning("the results store %s is busy (%s); retrying in %.1f s", self.path, message, delay)
                time.sleep(delay)
                delay *= 2

    # -- writing ----------------------------------------------------------------------------

    def begin_session(
        self,
        selection: str = "",
        command: str = "",
        *,
        machine: str | None = None,
        processor: str | None = None,
        started_at: str | None = None,
    ) -> SessionRecord:
        """Record a new session (machine details from this host unless given) and return it.

        The session remembers this process (pid and start time), so a later vqabench can tell
        that it died and mark its unfinished runs interrupted.
        """
        started_at = started_at or now_iso()
        self.mark_interrupted()
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO sessions (label, started_at, status, selection, command, machine, "
                "processor, platform, python_version, vqabench_version, host_pid, host_started) "
                "VALUES ('', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    started_at,
                    RUNNING,
                    selection,
                    command,
                    machine if machine is not None else platform.node(),
                    processor if processor is not None else (platform.processor() or platform.machine()),
                    platform.platform(),
                    sys.version.split()[0],
                    vqabench.__version__,
                    os.getpid(),
                    process_start_time(os.getpid()),
                ),
            )
            session_id = _inserted_id(cursor)
            stamp = re.sub(r"[^0-9T]", "", started_at[:19]).replace("T", "-")
            conn.execute("UPDATE sessions SET label = ? WHERE id = ?", (f"{stamp}-{session_id}", session_id))
        return self.session(session_id)

    def finish_session(self, session_id: int, status: str, finished_at: str | None = None) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE sessions SET status = ?, finished_at = ? WHERE id = ?",
                (status, finished_at or now_iso(), session_id),
            )

    def mark_interrupted(self) -> list[int]:
        """Mark sessions whose host process died (and whose worker is gone) interrupted; their ids.

        A session is still "running" after its vqabench process was killed (SIGKILL, a lost
        terminal, a reboot). When that process no longer exists on this machine and the run it
        was running has no live worker either, the running and queued runs become
        "interrupted" (their epochs stay) and so does the session. Sessions of other machines
        and of older stores (no recorded process) are left alone.
        """
        rows = self._query(
            "SELECT id, machine, host_pid, host_started FROM sessions WHERE status = ? AND host_pid IS NOT NULL",
            (RUNNING,),
        )
        reaped = []
        for row in rows:
            if row["machine"] != platform.node() or process_alive(row["host_pid"], row["host_started"]):
                continue
            runs = self._query(
                "SELECT id, status, pid FROM runs WHERE session_id = ? AND status IN (?, ?)",
                (row["id"], RUNNING, QUEUED),
            )
            if any(r["status"] == RUNNING and r["pid"] and process_alive(r["pid"]) for r in runs):
                continue  # its worker still runs on its own; look again later
            how = f"the vqabench process (pid {row['host_pid']}) that ran it ended without finishing it"
            try:
                with self._transaction() as conn:
                    for r in runs:
                        epochs = conn.execute("SELECT COUNT(*) FROM epochs WHERE run_id = ?", (r["id"],)).fetchone()[0]
                        reason = (
                            f"interrupted: {how}; its {epochs} finished epoch(s) are kept"
                            if r["status"] == RUNNING
                            else f"interrupted before it started: {how}"
                        )
                        conn.execute(
                            "UPDATE runs SET status = ?, reason = ?, finished_at = ? WHERE id = ?",
                            (INTERRUPTED, reason, now_iso(), r["id"]),
                        )
                    conn.execute(
                        "UPDATE sessions SET status = ?, finished_at = ? WHERE id = ? AND status = ?",
                        (INTERRUPTED, now_iso(), row["id"], RUNNING),
                    )
            except StoreWriteError as exc:  # a reader must still open a busy store
                log.warning("could not mark session %s interrupted: %s", row["id"], exc)
                continue
            reaped.append(row["id"])
        return reaped

    def add_probe(self, session_id: int, event: ProbeStarted) -> None:
        """Record what a `vqabench probe` session ran on."""
        values = [_json(getattr(event, f)) if f in _JSON_FIELDS else getattr(event, f) for f in _PROBE_FIELDS]
        with self._transaction() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO probes (session_id, {', '.join(_PROBE_FIELDS)}) "
                f"VALUES (?, {', '.join('?' * len(_PROBE_FIELDS))})",
                (session_id, *values),
            )

    def add_probe_round(self, session_id: int, event: ProbeMeasured) -> None:
        """Record one preset's timed steps in one round of a probe."""
        names = ["session_id", *_PROBE_ROUND_FIELDS, "recorded_at"]
        values = [
            session_id,
            *(_json(getattr(event, f)) if f in _JSON_FIELDS else getattr(event, f) for f in _PROBE_ROUND_FIELDS),
            now_iso(),
        ]
        with self._transaction() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO probe_rounds ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                values,
            )

    def probe(self, session_id: int) -> tuple[ProbeStarted, list[ProbeMeasured]] | None:
        """A probe session's setup and its measurements in the order they were taken; None if not a probe."""
        rows = self._query("SELECT * FROM probes WHERE session_id = ?", (session_id,))
        if not rows:
            return None
        started = ProbeStarted(**{f: _from_column(f, rows[0][f]) for f in _PROBE_FIELDS})
        measured = [
            ProbeMeasured(**{f: _from_column(f, row[f]) for f in _PROBE_ROUND_FIELDS})
            for row in self._query(
                "SELECT * FROM probe_rounds WHERE session_id = ? ORDER BY round, rowid", (session_id,)
            )
        ]
        return started, measured

    def add_tuned(self, session_id: int, records: list[TunedRecord]) -> None:
        """Record what tuning each preset came to (replacing this session's earlier records)."""
        names = ["session_id", "position", *_TUNED_FIELDS, "recorded_at"]
        with self._transaction() as conn:
            conn.execute("DELETE FROM tuned WHERE session_id = ?", (session_id,))
            for position, record in enumerate(records):
                values = [
                    _json(getattr(record, f)) if f in ("best_params", "trials") else getattr(record, f)
                    for f in _TUNED_FIELDS
                ]
                conn.execute(
                    f"INSERT INTO tuned ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                    (session_id, position, *values, now_iso()),
                )

    def tuned(self, session_id: int) -> list[TunedRecord]:
        """A tune session's records in tuning order; [] for any other session."""
        rows = self._query("SELECT * FROM tuned WHERE session_id = ? ORDER BY position", (session_id,))
        return [
            TunedRecord(**{f: json.loads(r[f]) if f in ("best_params", "trials") else r[f] for f in _TUNED_FIELDS})
            for r in rows
        ]

    def recorder(self, session: SessionRecord) -> SessionRecorder:
        """A runner subscriber that writes the session's notifications here."""
        return SessionRecorder(self, session)

    # -- queries ----------------------------------------------------------------------------

    def list_sessions(self) -> list[SessionRecord]:
        """Every session, newest first (sessions whose process died are marked interrupted first)."""
        self.mark_interrupted()
        return [_record(SessionRecord, r) for r in self._query("SELECT * FROM sessions ORDER BY id DESC")]

    def last_session(self) -> SessionRecord | None:
        rows = self._query("SELECT * FROM sessions ORDER BY id DESC LIMIT 1")
        return _record(SessionRecord, rows[0]) if rows else None

    def session(self, session_id: int) -> SessionRecord:
        rows = self._query("SELECT * FROM sessions WHERE id = ?", (session_id,))
        if not rows:
            known = [str(s.id) for s in self.list_sessions()]
            listing = f"sessions are {', '.join(reversed(known))}" if known else "it holds no session yet"
            raise StoreError(f"the results store {self.path} has no session {session_id}; {listing}.")
        return _record(SessionRecord, rows[0])

    def runs(self, session_id: int) -> list[RunRecord]:
        """The session's runs in the order they were queued."""
        return [
            _run_record(row)
            for row in self._query("SELECT * FROM runs WHERE session_id = ? ORDER BY position", (session_id,))
        ]

    def epochs(self, run_id: int) -> list[EpochEnded]:
        """The run's completed epochs, in order."""
        rows = self._query("SELECT * FROM epochs WHERE run_id = ? ORDER BY epoch", (run_id,))
        return [EpochEnded(**{k: _epoch_value(k, row[k]) for k in _EPOCH_FIELDS}) for row in rows]

    def evals(self, run_id: int) -> list[Evaluated]:
        """The run's evaluations, in the order they arrived."""
        rows = self._query("SELECT * FROM evals WHERE run_id = ? ORDER BY id", (run_id,))
        evals = [
            Evaluated(**{k: (json.loads(row[k]) if k == "extra" else row[k]) for k in _EVAL_FIELDS}) for row in rows
        ]
        for e in evals:  # a moved or copied results folder reads its own copies
            if e.predictions:
                e.predictions = str(self.run_file(e.predictions))
        return evals

    def stderr_tail(self, run: RunRecord, lines: int = 20) -> list[str]:
        """The last log lines of a run's worker, from its stderr file."""
        if not run.stderr_path:
            return []
        path = self.results_dir / run.stderr_path
        if not path.exists():
            return []
        return path.read_text(errors="replace").splitlines()[-lines:]

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # -- used by SessionRecorder ----------------------------------------------------------------

    def _add_run(self, session: SessionRecord, note: RunQueued) -> tuple[int, str, str]:
        stem = re.sub(r"[^\w.@-]", "_", f"{session.label}-{note.run}")
        events_path, stderr_path = f"events/{stem}.jsonl", f"events/{stem}.stderr.log"
        (self.results_dir / "events").mkdir(exist_ok=True)
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO runs (session_id, name, position, method, after, status, spec, "
                "events_path, stderr_path, queued_at) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                (
                    session.id,
                    note.run,
                    note.position,
                    note.spec.method,
                    note.spec.after,
                    _json(note.spec.to_dict()),
                    events_path,
                    stderr_path,
                    now_iso(),
                ),
            )
        return _inserted_id(cursor), events_path, stderr_path

    def _update_run(self, run_id: int, columns: dict[str, Any]) -> None:
        if not columns:
            return
        names = ", ".join(f"{c} = ?" for c in columns)
        values = [_json(v) if c in _JSON_FIELDS else v for c, v in columns.items()]
        with self._transaction() as conn:
            conn.execute(f"UPDATE runs SET {names} WHERE id = ?", (*values, run_id))

    def _add_epoch(self, run_id: int, event: EpochEnded) -> None:
        names = ["run_id", *_EPOCH_FIELDS, "recorded_at"]
        values = [
            run_id,
            *(_json(v) if f in _JSON_FIELDS and v is not None else v for f, v in dataclasses.asdict(event).items()),
            now_iso(),
        ]
        with self._transaction() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO epochs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})", values
            )

    def add_eval(self, run_id: int, event: Evaluated) -> None:
        """Record a test or eval score of a run (from its worker, or a later re-judging)."""
        names = ["run_id", *_EVAL_FIELDS, "recorded_at"]
        values = [
            run_id,
            *(_json(getattr(event, f)) if f == "extra" else getattr(event, f) for f in _EVAL_FIELDS),
            now_iso(),
        ]
        with self._transaction() as conn:
            conn.execute(f"INSERT INTO evals ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})", values)


class SessionRecorder:
    """Runner subscriber: writes one session's runs, events and logs into a store."""

    def __init__(self, store: ResultsStore, session: SessionRecord) -> None:
        self.store = store
        self.session = session
        self.run_ids: dict[str, int] = {}
        self._files: dict[str, tuple[Path, Path]] = {}

    def __call__(self, note: Notification) -> None:
        if isinstance(note, RunQueued):
            run_id, events_path, stderr_path = self.store._add_run(self.session, note)
            self.run_ids[note.run] = run_id
            root = self.store.results_dir
            self._files[note.run] = (root / events_path, root / stderr_path)
        elif isinstance(note, RunStatusChanged):
            columns: dict[str, Any] = {"status": note.status, "reason": note.reason}
            if note.spec is not None:
                columns.update(spec=note.spec.to_dict(), output_dir=note.spec.output_dir)
            if note.pid is not None:
                columns["pid"] = note.pid
            if note.status == RUNNING:
                columns["started_at"] = now_iso()
            if note.status in FINAL_STATUSES:
                columns.update(finished_at=now_iso(), exit_code=note.exit_code)
            self.store._update_run(self.run_ids[note.run], columns)
        elif isinstance(note, WorkerEvent):
            self._append(self._files[note.run][0], note.line)
            self._record_event(self.run_ids[note.run], note.event)
        elif isinstance(note, WorkerStderr):
            self._append(self._files[note.run][1], note.line)
        elif isinstance(note, InvalidWorkerLine):
            self._append(self._files[note.run][1], f"[vqabench: ignored stdout line: {note.error}] {note.line}")
            with self.store._transaction() as conn:
                conn.execute(
                    "UPDATE runs SET invalid_lines = invalid_lines + 1 WHERE id = ?", (self.run_ids[note.run],)
                )
        elif isinstance(note, RunnerFinished):
            statuses = set(note.statuses.values())
            status = CANCELLED if note.cancelled else (DONE if statuses <= {DONE} else FAILED)
            self.store.finish_session(self.session.id, status)

    def _record_event(self, run_id: int, event: Any) -> None:
        if isinstance(event, EpochEnded):
            self.store._add_epoch(run_id, event)
        elif isinstance(event, Evaluated):
            self.store.add_eval(run_id, event)
        elif isinstance(event, RunStarted):
            self.store._update_run(run_id, {col: getattr(event, f) for f, col in _STARTED_COLUMNS.items()})
        elif isinstance(event, RunFinished):
            self.store._update_run(run_id, {f: getattr(event, f) for f in _FINISHED_FIELDS})
        elif isinstance(event, RunFailed):
            self.store._update_run(run_id, {col: getattr(event, f) for f, col in _FAILED_COLUMNS.items()})

    @staticmethod
    def _append(path: Path, line: str) -> None:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def _run_record(row: sqlite3.Row) -> RunRecord:
    data = dict(row)
    started = None
    if data["device"] is not None:
        started = RunStarted(
            run=data["name"],
            method=data["method"],
            **{
                f: (json.loads(data[c]) if c in _JSON_FIELDS and data[c] is not None else data[c])
                for f, c in _STARTED_COLUMNS.items()
                if data[c] is not None or f not in _STARTED_DEFAULTS
            },
        )
    finished = None
    if data["checkpoint"] is not None:
        finished = RunFinished(**{f: data[f] for f in _FINISHED_FIELDS})
    failed = None
    if data["error_kind"] is not None:
        failed = RunFailed(**{f: data[c] for f, c in _FAILED_COLUMNS.items()})
    return _record(
        RunRecord, {**data, "spec": json.loads(data["spec"])}, started=started, finished=finished, failed=failed
    )


def _epoch_value(name: str, value: Any) -> Any:
    if name == "is_best":
        return bool(value)
    if name in _JSON_FIELDS and value is not None:
        return json.loads(value)
    return value


def _record(cls: type, row: Any, **more: Any) -> Any:
    """A record dataclass from a row, ignoring columns it does not know (a later migration's)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(row).items() if k in names}, **more)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str, separators=(",", ":"))


def _from_column(name: str, value: Any) -> Any:
    return json.loads(value) if name in _JSON_FIELDS and isinstance(value, str) else value


def _proc_stat(pid: int) -> list[str] | None:
    """The fields after the command name in /proc/<pid>/stat (Linux); None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux /proc); None where unknown."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether `pid` runs on this machine (and, when `started` is given, is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc: trust kill(0)
    if fields[0] in ("Z", "X"):  # a zombie has ended; only its exit status is left
        return False
    return started is None or len(fields) <= 19 or fields[19] == started


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (no semicolons inside these scripts' strings)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _inserted_id(cursor: sqlite3.Cursor) -> int:
    """The row id an INSERT just made (sqlite3 types `lastrowid` as optional for other statements)."""
    if cursor.lastrowid is None:
        raise StoreError("the results store did not return the id of the row it just wrote.")
    return cursor.lastrowid
