"""benchmarks/vs_trl.py at its smallest: both engines' DPO steps on one tiny model, one round of one step."""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="TRL is the optional 'compare' extra (pip install 'vqabench[compare]'); CI lacks it")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import torch
import vs_trl

from vqabench.engine.probe import prepare
from vqabench.spec import ProbePlan


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_one_round_of_one_step_gives_finite_figures_for_both_sides(capsys):
    argv = ["--models", "idefics3-tiny-random", "--steps", "1", "--warmup", "0", "--rounds", "1", "--batch-size", "2"]
    assert vs_trl.main(argv) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| idefics3-tiny-random")]
    rows = {cells[1]: cells for cells in map(_cells, lines)}
    timed = [
        "TRL, tower frozen",
        "vqabench, tower frozen",
        "TRL, LoRA",
        "vqabench, LoRA",
        "TRL defaults: all trained, grad. ckpt",
    ]
    assert list(rows) == [*timed, "TRL, precomputed reference"]
    medians = {}
    for name in timed:
        timing = re.fullmatch(r"([\d.]+) \(([\d.]+) … ([\d.]+)\)", rows[name][4])
        assert timing is not None, rows[name]
        low, median, high = (float(x) for x in (timing[2], timing[1], timing[3]))
        assert 0 < low <= median <= high and math.isfinite(high)  # one step: all three the same
        assert median == pytest.approx(low, abs=0.06) and median == pytest.approx(high, abs=0.06)
        reference, peak, above = (float(x) for x in rows[name][6:9])
        assert 0 <= reference < 10 and 100 < peak < 64 * 1024 and math.isfinite(above) and above < peak
        medians[name] = median
    assert rows["vqabench, LoRA"][6] == "0.0"  # the adapter reference holds no weights of its own
    # One round, so no interval: the ratio alone, the two medians' quotient (each printed to 0.1 ms).
    for vq, trl in (("vqabench, tower frozen", "TRL, tower frozen"), ("vqabench, LoRA", "TRL, LoRA")):
        assert float(rows[vq][5]) == pytest.approx(medians[vq] / medians[trl], rel=0.02, abs=0.006)
    assert rows["TRL, precomputed reference"][4] == "cannot: refused for vision data"
    assert "`precompute_ref_log_probs=True` is not supported for vision datasets" in out


def test_sides_picks_pairings_in_table_order_and_refuses_what_it_cannot_divide():
    names = [s.name for s in vs_trl.sides_for("lora")]
    assert names == ["TRL, LoRA", "vqabench, LoRA"]
    assert [s.name for s in vs_trl.sides_for("lora, frozen")] == [s.name for s in vs_trl.SIDES[:4]]
    assert vs_trl.sides_for("all") == vs_trl.SIDES
    with pytest.raises(SystemExit, match="allowed: all or frozen, lora, defaults"):
        vs_trl.sides_for("lora,bogus")
    with pytest.raises(SystemExit, match="add frozen"):
        vs_trl.sides_for("defaults")


def test_a_lora_only_comparison_prints_only_its_pairing(capsys, tmp_path):
    argv = ["--models", "idefics3-tiny-random", "--sides", "lora", "--steps", "1", "--warmup", "0", "--rounds", "1",
            "--batch-size", "2", "--start-on-disk", str(tmp_path)]  # fmt: skip
    assert vs_trl.main(argv) == 0
    out = capsys.readouterr().out
    rows = [_cells(line)[1] for line in out.splitlines() if line.startswith("| idefics3-tiny-random")]
    assert rows == ["TRL, LoRA", "vqabench, LoRA", "TRL, precomputed reference"]
    assert "t-interval over rounds." in out and "TRL defaults row" not in out  # no note on a row not run


def test_a_start_model_on_disk_keeps_its_weights_and_their_ties(tmp_path):
    args = argparse.Namespace(batch_size=2)
    side = vs_trl.sides_for("lora")[1]
    plan = ProbePlan([vs_trl.vqabench_spec(side, "gemma3-tiny-random", args)], steps=1, rounds=1, warmup=0)
    probe = prepare(plan, lambda event: None)
    model = probe.start.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    shared = {n for n, p in model.named_parameters(remove_duplicate=False)} - set(grads)
    assert shared == {"lm_head.weight"}  # this family ties its head to the embeddings
    vs_trl.start_on_disk(probe, str(tmp_path))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {n for n, p in model.named_parameters(remove_duplicate=False)} - set(grads) == shared  # ties kept
    assert list(tmp_path.iterdir()) == []  # no model-sized file left behind
    maps = Path("/proc/self/maps").read_text()
    assert f"{tmp_path / 'start.pt'} (deleted)" in maps  # the weights are read from the mapped file
