"""benchmarks/tune.py: trials of a tune that fit in a time budget, with and without pruning, and the
best-objective curve, as Markdown tables for record.py (here on the fake worker, a 6-second budget)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from fake_worker import worker_cmd

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "tune.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_tune", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_tune_benchmark_counts_trials_per_pass_until_the_deadline(tmp_path, capsys):
    bench = load_bench()
    # each fake epoch sleeps 0.3 s, so 20 trials of two presets cannot end in 6 s: the deadline stops it
    fake = " ".join(worker_cmd(tmp_path, {"default": {"epoch_sleep": 0.3}}))
    code = bench.main(
        [*("--minutes", "0.1", "--trials", "20", "--preset", "sft,orpo", "--epochs", "1"), "--worker-cmd", fake]
    )
    assert code == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if re.match(r"\| (on|off) \| (sft|orpo) \| \w+ \| \d", line)]
    assert sorted((r[0], r[1]) for r in rows) == [
        ("| off", "orpo"),
        ("| off", "sft"),
        ("| on", "orpo"),
        ("| on", "sft"),
    ]
    for row in rows:
        trials, complete, pruned, failed = (int(x) for x in row[3:7])
        assert trials == complete + pruned + failed and pruned >= 0 and failed >= 0
    first = rows[0]  # the preset tuned first in the pruning pass
    trials, complete, _, failed = (int(x) for x in first[3:7])
    assert 1 <= complete <= trials < 20 and failed <= 1  # some fit; at most the one the deadline stopped failed
    totals = re.findall(r"\| (on|off) \| (\d+) \| ([\d.]+) \| the deadline \|", out)
    assert [t[0] for t in totals] == ["on", "off"]
    for _, total, wall in totals:
        assert int(total) >= 1 and 6.0 <= float(wall) < 20.0
    # the curve: one best-so-far value per trial; the fake's objective after one epoch is
    # SFT's eval loss 1.1 + 0.1, ORPO's eval NLL of the chosen answers 1.0, whatever the setting
    (curve,) = re.findall(rf"\| on \| {first[1]} \| ([^|]+) \|$", out, flags=re.M)
    values = [float(v) for v in curve.split(", ") if v != "n/a"]
    expected = {"sft": 1.2, "orpo": 1.0}[first[1]]
    assert len(curve.split(", ")) == trials and values and all(abs(v - expected) < 1e-6 for v in values)
