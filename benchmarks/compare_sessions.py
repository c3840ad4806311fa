"""Do two stored sessions agree on every quality, loss and memory figure (timings aside)?

Used for issue 23's before/after check: the same ``--preset all`` session run on the code
before BLIP moved behind the model seam and after, each into its own results folder, then

    python benchmarks/compare_sessions.py BEFORE/results.db AFTER/results.db

compares, run by run (matched by name), every figure that does not depend on the clock or on
the machine's load: per-epoch train and eval loss, the preference figures, the reference and
parameter counts, the best epoch, the test split's EM/F1/judge and every test answer, and the
Data table's counts. Peak RSS is left out (it moves with the allocator and the load); the
reference's bytes and the trainable and total parameter counts are the memory figures that
are fixed by the code. Exit 0 when every figure is equal (floats within `--tolerance`,
default 0: bit for bit), 1 otherwise, listing each difference.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

RUN_FIGURES = ("method", "status", "trainable_params", "total_params", "reference_strategy", "reference_bytes")
RUN_FIGURES += ("epochs", "steps_per_epoch", "best_epoch", "best_eval_loss")
EPOCH_FIGURES = ("train_loss", "eval_loss", "lr", "reference_bytes", "chosen_logp", "rejected_logp")
EPOCH_FIGURES += ("reward_margin", "pref_accuracy", "em", "f1", "judge_score", "scored_n")
EVAL_FIGURES = ("split", "n", "em", "f1", "judge", "judge_score", "judge_n", "unparseable")
#: Keys of run_started's `data` that hold a clock reading or a path on this machine (the start
#: checkpoint's folder is named by the session), not a figure.
NOT_FIGURES = ("seconds", "path", "model_source")


def last_session(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT max(id) FROM sessions").fetchone()[0])


def rows(db: sqlite3.Connection, sql: str, *args: object) -> list[dict]:
    cursor = db.execute(sql, args)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def differ(a: object, b: object, tolerance: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) > tolerance
    return a != b


def data_figures(data: str | None) -> dict:
    """run_started's `data` (sizes, the Data table's counts, fingerprints, bytes), flattened to dotted keys."""
    flat: dict = {}

    def walk(value: object, prefix: str) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                if not any(word in key for word in NOT_FIGURES):
                    walk(inner, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = value

    walk(json.loads(data) if data else {}, "")
    return flat


def compare_rows(
    before: list[dict],
    after: list[dict],
    keys: tuple[str, ...],
    prefix: str,
    column: str,
    tolerance: float,
    differences: list[str],
) -> int:
    """Row by row, each of `keys`, a row named "<prefix> <its column>"; returns how many figures were compared."""
    if len(before) != len(after):
        differences.append(f"{prefix}: {len(before)} {column} rows before, {len(after)} after")
    compared = 0
    for x, y in zip(before, after, strict=False):
        for key in keys:
            compared += 1
            if differ(x[key], y[key], tolerance):
                differences.append(f"{prefix} {x[column]}: {key} {x[key]!r} before, {y[key]!r} after")
    return compared


def compare(before: Path, after: Path, tolerance: float) -> list[str]:
    differences: list[str] = []
    compared = 0
    old, new = sqlite3.connect(before), sqlite3.connect(after)
    old_runs = {r["name"]: r for r in rows(old, "SELECT * FROM runs WHERE session_id = ?", last_session(old))}
    new_runs = {r["name"]: r for r in rows(new, "SELECT * FROM runs WHERE session_id = ?", last_session(new))}
    if set(old_runs) != set(new_runs):
        differences.append(f"runs: {sorted(old_runs)} before, {sorted(new_runs)} after")
    for name in sorted(set(old_runs) & set(new_runs)):
        a, b = old_runs[name], new_runs[name]
        for key in RUN_FIGURES:
            compared += 1
            if differ(a[key], b[key], tolerance):
                differences.append(f"{name}: {key} {a[key]!r} before, {b[key]!r} after")
        da, db = data_figures(a["data"]), data_figures(b["data"])
        added = sorted(set(db) - set(da))
        if added:
            print(f"{name}: recorded after only (not compared): {', '.join(added)}")
        for key in sorted(da):
            compared += 1
            if da.get(key) != db.get(key):
                differences.append(f"{name}: data.{key} {da.get(key)!r} before, {db.get(key)!r} after")
        ea = rows(old, "SELECT * FROM epochs WHERE run_id = ? ORDER BY epoch", a["id"])
        eb = rows(new, "SELECT * FROM epochs WHERE run_id = ? ORDER BY epoch", b["id"])
        compared += compare_rows(ea, eb, EPOCH_FIGURES, f"{name} epoch", "epoch", tolerance, differences)
        va = rows(old, "SELECT * FROM evals WHERE run_id = ? ORDER BY id", a["id"])
        vb = rows(new, "SELECT * FROM evals WHERE run_id = ? ORDER BY id", b["id"])
        compared += compare_rows(va, vb, EVAL_FIGURES, name, "split", tolerance, differences)
        for x, y in zip(va, vb, strict=False):
            answers = [
                Path(p).read_text() if p and Path(p).exists() else None for p in (x["predictions"], y["predictions"])
            ]
            compared += 1
            if answers[0] != answers[1]:
                differences.append(f"{name} {x['split']}: the answers differ")
    print(f"{len(old_runs)} runs, {compared} figures compared, {len(differences)} differ (tolerance {tolerance:g}).")
    return differences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="results.db of the session before")
    parser.add_argument("after", type=Path, help="results.db of the session after")
    parser.add_argument("--tolerance", type=float, default=0.0, help="largest absolute difference of a float")
    args = parser.parse_args(argv)
    differences = compare(args.before, args.after, args.tolerance)
    for line in differences:
        print("  " + line)
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
