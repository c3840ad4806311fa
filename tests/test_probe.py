"""`vqabench probe`: the interleaved step-cost probe, its table, its session in the store, the real worker."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from fake_worker import canned_probe
from test_headless import cli_env, fake, vqabench

from vqabench.report import probe_table, render_markdown
from vqabench.spec import ProbePlan, RunSpec, SpecError
from vqabench.store import ResultsStore


def _plan(rounds: int = 3) -> dict:
    presets = (("sft", "sft", None), ("dpo-beta0.1", "dpo", 0.1), ("dpo-beta0.5", "dpo", 0.5), ("orpo", "orpo", None))
    specs = [RunSpec(name=n, method=m, after="sft" if m == "dpo" else None, beta=b) for n, m, b in presets]
    return ProbePlan(specs, steps=20, rounds=rounds, warmup=3).to_dict()["probe"]


def test_the_probe_table_gives_spread_ratio_interval_memory_reference_and_setup():
    started, *measured = canned_probe(_plan())
    table = probe_table(started, measured)
    rows = {row[0]: row for row in table.rows}
    assert list(rows) == ["sft", "dpo-beta0.1", "dpo-beta0.5", "orpo"]
    assert rows["sft"][2] == "40.0 (39.2 … 40.8)" and rows["sft"][3] == "1.00"  # the baseline itself
    ratio, low, high = (float(x) for x in re.findall(r"[\d.]+", rows["dpo-beta0.1"][3]))
    assert ratio == pytest.approx(1.6) and low <= 1.6 <= high
    assert rows["dpo-beta0.1"][3] == rows["dpo-beta0.5"][3]  # the same work: the same row
    assert rows["dpo-beta0.1"][1] == "dpo (copy)" and rows["dpo-beta0.1"][6] == "6.0" and rows["orpo"][6] == "none"
    assert rows["dpo-beta0.1"][7] == "0.05" and rows["orpo"][7] == "–"
    assert rows["sft"][4] == f"{16 * 1000 / 40.0:.1f}"  # samples/s at batch 16
    assert any("Every preset starts from the same model (embedded base checkpoint)" in n for n in table.notes)


def test_a_probe_plan_is_checked_before_anything_starts():
    with pytest.raises(SpecError, match="'steps' is 0; it must be at least 1"):
        ProbePlan([RunSpec(name="sft", method="sft")], steps=0).validate()
    plan = ProbePlan([RunSpec(name="sft", method="sft")], steps=5, rounds=2)
    assert ProbePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_probe_command_prints_the_table_and_stores_it_for_export(tmp_path):
    proc = vqabench(tmp_path, *fake(tmp_path, {}), "probe", "--preset", "sft,dpo-beta0.1,dpo-beta0.5", "--rounds", "2")
    assert proc.returncode == 0, proc.stderr
    assert "round 2/2 sft: 40.0 ms/step" in proc.stderr
    # the shipped DPO presets ask for reference = "auto": 3 epochs and a roomy disk give precompute
    assert re.search(r"^\| dpo-beta0\.1 +\| dpo \(precompute\) +\| +64\.0 \(", proc.stdout, re.M)
    assert "Stored as session 1" in proc.stdout
    plan = json.loads(next((tmp_path / "vqabench-results" / "runs").glob("*-probe/probe.json")).read_text())
    assert [s["name"] for s in plan["probe"]["specs"]] == ["sft", "dpo-beta0.1", "dpo-beta0.5"]
    with ResultsStore(tmp_path / "vqabench-results", create=False) as store:
        session = store.last_session()
        assert session.status == "done" and " probe --preset sft,dpo-beta0.1,dpo-beta0.5" in session.command
        started, measured = store.probe(session.id)
        assert started.rounds == 2 and len(measured) == 6 and measured[0].step_ms[0] == pytest.approx(39.2)
        report = render_markdown(store, session.id)
    assert "## Step cost probe" in report and "## Quality" not in report
    exported = vqabench(tmp_path, "export", "--last")
    assert exported.stdout == report


def test_a_failing_probe_exits_1_with_its_reason_and_keeps_what_it_measured(tmp_path):
    proc = vqabench(tmp_path, *fake(tmp_path, {"default": {"probe_fail": True}}), "probe", "--preset", "sft,orpo")
    assert proc.returncode == 1
    assert "vqabench: the probe failed: internal error RuntimeError: the probe broke." in proc.stderr
    with ResultsStore(tmp_path / "vqabench-results", create=False) as store:
        session = store.last_session()
        assert session.status == "failed" and len(store.probe(session.id)[1]) == 2


def test_the_real_probe_worker_times_every_preset_from_one_start_model(tmp_path, vqa_cache):
    """The engine itself, tiny: two rounds, three steps of batch 8 on the embedded model."""
    from vqabench.events import ProbeMeasured, ProbeStarted, parse_event

    specs = [
        RunSpec(name="sft", method="sft", batch_size=8, base_samples=512),
        RunSpec(name="dpo", method="dpo", after="sft", batch_size=8, base_samples=512),
        # "auto" resolves as a run's does: two epochs and a table that fits, so precompute
        RunSpec(name="dpo-pre", method="dpo", after="sft", reference="auto", epochs=2, batch_size=8, base_samples=512),
    ]
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(ProbePlan(specs, steps=3, rounds=2, warmup=1, cache_dir=str(vqa_cache)).to_dict()))
    proc = subprocess.run(
        [sys.executable, "-m", "vqabench.engine.worker", str(path)],
        capture_output=True, text=True, timeout=600, env=cli_env(tmp_path, vqa_cache),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [parse_event(line) for line in proc.stdout.splitlines()]
    [started] = [e for e in events if isinstance(e, ProbeStarted)]
    measured = [e for e in events if isinstance(e, ProbeMeasured)]
    assert started.presets == ["sft", "dpo", "dpo-pre"] and started.steps == 3
    assert started.machine_cores is not None and started.machine_cores >= 1  # what its load is judged against
    assert [(m.round, m.preset) for m in measured] == [
        (1, "sft"), (1, "dpo"), (1, "dpo-pre"), (2, "dpo-pre"), (2, "dpo"), (2, "sft")]  # fmt: skip
    assert all(len(m.step_ms) == 3 and min(m.step_ms) > 0 for m in measured)
    copy, pre = measured[1], measured[2]
    assert copy.reference_bytes > 0 and copy.setup_seconds > 0
    assert pre.reference_strategy == "precompute" and pre.reference_bytes == 0 and pre.setup_seconds > 0
    assert all(m.memory_source == "RSS" and m.peak_memory_mib > 100 for m in measured)


def _measured(preset: str, method: str, round_: int, ms: float, load: float = 1.0):
    from vqabench.events import ProbeMeasured

    steps = [ms * (1 + 0.01 * ((i * 7) % 5 - 2)) for i in range(20)]
    return ProbeMeasured(preset, method, round_, steps, 500.0, "RSS", None, 0, 0.0, load_avg_max=load)


def _started(rounds: int, threads: int = 2, machine_cores: int | None = 2):
    from vqabench.events import ProbeStarted

    return ProbeStarted(["sft", "orpo"], "cpu", "2.13", "m", 16, 20, 3, rounds, threads, 1, machine_cores)


def test_the_probe_ratio_is_paired_by_round_and_a_disturbed_round_widens_it_to_noisy():
    # round 2's ORPO block ran while another process took the cores: its ratio is far off
    rounds = {1: (40.0, 46.0), 2: (40.0, 20.0), 3: (40.0, 47.0)}
    measured = [
        m
        for r, (sft, orpo) in rounds.items()
        for m in (_measured("sft", "sft", r, sft), _measured("orpo", "orpo", r, orpo))
    ]
    table = probe_table(_started(3), measured)
    relative = {row[0]: row[3] for row in table.rows}["orpo"]
    low, high = (float(x) for x in re.findall(r"\[([\d.]+), ([\d.]+)\]", relative)[0])
    assert low < 1.0 < high and relative.endswith(" noisy")
    assert any(note.startswith("noisy: the 95% interval reaches 1") for note in table.notes)
    calm = [
        m for r in (1, 2, 3) for m in (_measured("sft", "sft", r, 40.0), _measured("orpo", "orpo", r, 46.0 + r / 10))
    ]
    relative = {row[0]: row[3] for row in probe_table(_started(3), calm).rows}["orpo"]
    assert re.fullmatch(r"1\.1\d \[1\.1\d, 1\.1\d\]", relative)
    one = [_measured("sft", "sft", 1, 40.0), _measured("orpo", "orpo", 1, 46.0)]
    one_round = {row[0]: row[3] for row in probe_table(_started(1), one).rows}
    assert one_round["orpo"] == "1.15"  # one round: a ratio, no interval


@pytest.mark.parametrize(
    ("load", "threads", "machine_cores", "flagged"),
    [
        (2.04, 2, 2, False),  # the probe's own 2 threads on 2 cores, and a whisper of other work
        (1.9, 1, 2, False),  # 1 thread on 2 cores: other work fits on the idle core
        (2.6, 2, 2, True),  # other work competed for the probe's cores
        (2.6, 1, 2, True),
        (2.6, 2, None, True),  # an older probe without the machine's cores: judged against its threads
    ],
)
def test_the_probe_load_flag_discounts_its_own_threads(load, threads, machine_cores, flagged):
    measured = [_measured("sft", "sft", 1, 40.0, load), _measured("orpo", "orpo", 1, 46.0, load)]
    notes = probe_table(_started(1, threads, machine_cores), measured).notes
    assert any("other work competed for the cores" in note for note in notes) == flagged


def _estimated_gib(text: str, preset: str) -> float:
    block = text.split(f"{preset}: ", 1)[1].split("\n\n", 1)[0]
    return float(re.search(r"estimated peak +([\d.]+) GiB", block).group(1))


def test_probe_memory_prints_each_presets_estimate_without_starting_a_worker(tmp_path):
    failing_worker = fake(tmp_path, {"default": {"probe_fail": True}})  # a worker started would fail the command
    proc = vqabench(tmp_path, *failing_worker, "probe", "--memory", "--preset", "sft,orpo")
    assert proc.returncode == 0, proc.stderr
    for preset in ("sft", "orpo"):
        block = proc.stdout.split(f"{preset}: embedded, train decoder", 1)[1].split("\n\n", 1)[0]
        terms = {m[0]: float(m[1]) for m in re.findall(r"^  (\w[\w ]*?) +([\d.]+) GiB", block, re.M)}
        assert {"weights", "gradients", "optimizer", "activations"} <= set(terms)
        total = terms.pop("estimated peak")
        assert sum(terms.values()) == pytest.approx(total, abs=0.002)  # each printed to 1 MiB
        assert "measured peak" not in block
    assert not (tmp_path / "vqabench-results" / "results.db").exists()  # nothing ran, nothing was stored


def test_probe_memory_puts_a_stored_cuda_peak_beside_the_estimate_with_the_ratio(tmp_path):
    from vqabench.events import ProbeMeasured, ProbeStarted

    with ResultsStore(tmp_path / "vqabench-results") as store:
        session = store.begin_session("sft,orpo", "vqabench probe")
        store.add_probe(session.id, ProbeStarted(["sft", "orpo"], "cuda", "2.9", "m", 16, 20, 3, 1, 1, 1, 16))
        store.add_probe_round(session.id, ProbeMeasured("sft", "sft", 1, [40.0], 64.0, "CUDA", None, 0, 0.0))
        store.add_probe_round(session.id, ProbeMeasured("orpo", "orpo", 1, [40.0], 512.0, "RSS", None, 0, 0.0))
        store.finish_session(session.id, "done")
    proc = vqabench(tmp_path, "probe", "--memory", "--preset", "sft,orpo")
    assert proc.returncode == 0, proc.stderr
    estimated = _estimated_gib(proc.stdout, "sft")
    line = re.search(r"measured peak +0\.062 GiB \(CUDA, probe session 1\); estimate/measured ([\d.]+)", proc.stdout)
    assert line is not None, proc.stdout
    assert float(line.group(1)) == pytest.approx(estimated / (64 / 1024), rel=0.02)
    orpo = proc.stdout.split("orpo: ", 1)[1].split("\n\n", 1)[0]
    assert "measured peak" not in orpo  # an RSS peak holds the whole process: not set beside the estimate


def test_a_gpu_probe_sets_each_presets_largest_cuda_round_beside_the_estimate():
    from vqabench.events import ProbeMeasured
    from vqabench.probe import ProbeOutcome, measured_cuda_peaks

    rounds = [
        ProbeMeasured("sft", "sft", 1, [40.0], 60.0, "CUDA", None, 0, 0.0),
        ProbeMeasured("sft", "sft", 2, [40.0], 64.0, "CUDA", None, 0, 0.0),
        ProbeMeasured("orpo", "orpo", 1, [40.0], 900.0, "RSS", None, 0, 0.0),
    ]
    peaks = measured_cuda_peaks(ProbeOutcome(7, None, None, rounds))
    assert list(peaks) == ["sft"] and peaks["sft"].mib == 64.0 and peaks["sft"].where == "probe session 7"


def test_savings_variants_turn_each_saving_off_once_and_skip_what_is_already_off():
    from vqabench.probe import savings_variants

    spec = RunSpec(name="dpo", method="dpo", after="sft", model="qwen2-vl-tiny-random", train="lm")
    variants = savings_variants(spec)
    assert [v.name for v in variants] == ["dpo", "dpo-no-shared-prompt", "dpo-full-logits", "dpo-no-feature-cache"]
    assert [(v.shared_prompt, v.answer_only_logits, v.uses_encoder_cache) for v in variants] == [
        (True, True, True), (False, True, True), (True, False, True), (True, True, False)]  # fmt: skip
    already_off = spec.replace(shared_prompt=False, encoder_cache="off")
    assert [v.name for v in savings_variants(already_off)] == ["dpo", "dpo-full-logits"]


def test_probe_savings_times_each_preset_with_each_saving_off(tmp_path):
    proc = vqabench(tmp_path, *fake(tmp_path, {}), "probe", "--preset", "sft", "--rounds", "1", "--savings")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(next((tmp_path / "vqabench-results" / "runs").glob("*-probe/probe.json")).read_text())
    specs = plan["probe"]["specs"]
    assert [s["name"] for s in specs] == ["sft", "sft-no-shared-prompt", "sft-full-logits", "sft-no-feature-cache"]
    assert [(s["shared_prompt"], s["answer_only_logits"], s["encoder_cache"]) for s in specs] == [
        (True, True, "auto"), (False, True, "auto"), (True, False, "auto"), (True, True, "off")]  # fmt: skip
    for name in ("sft-no-shared-prompt", "sft-full-logits", "sft-no-feature-cache"):
        assert re.search(rf"^\| {name} +\| sft ", proc.stdout, re.M), name
