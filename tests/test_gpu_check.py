"""benchmarks/gpu_check.py's assertions, fed recorded event streams: each one must fire on its violation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vqabench import events as ev

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import probe_check  # noqa: E402

H200_TOTAL = 143771.0  # MiB, what NVML reports for an H200

#: A run as the worker streams it on a GPU (JSON lines, as recorded), figures in MiB.
GOOD_RUN = [
    '{"type":"run_started","v":1,"run":"embedded-sft","method":"sft","config":{},"device":"cuda (NVIDIA H200)",'
    '"torch_version":"2.13.0","trainable_params":1,"total_params":2,"reference_strategy":null,"reference_bytes":0,'
    '"epochs":2,"steps_per_epoch":16,"telemetry":"nvml","data":{},"pid":4242}',
    *(
        json.dumps(
            {
                "type": "epoch_end",
                "v": 1,
                "epoch": epoch,
                "epochs": 2,
                "train_loss": 1.0,
                "eval_loss": 1.1,
                "epoch_seconds": 0.8,
                "eval_seconds": 0.1,
                "samples_per_s": 640.0,
                "lr": 1e-4,
                "peak_rss_mib": 2100.0,
                "reference_bytes": 0,
                "chosen_logp": -1.0,
                "rejected_logp": -2.0,
                "reward_margin": 1.0,
                "pref_accuracy": 0.9,
                "is_best": True,
                "cuda_max_allocated_mib": 61.2,
                "cuda_max_reserved_mib": 84.0,
                "gpu_process_peak_mib": 612.0,
                "gpu_device_peak_mib": 1105.0,
                "gpu_util_mean": 41.0,
                "gpu_power_mean_w": 180.5,
            }
        )
        for epoch in (1, 2)
    ),
    '{"type":"run_finished","v":1,"best_epoch":2,"best_eval_loss":1.1,"checkpoint":"x","total_seconds":9.0,'
    '"train_seconds":1.6}',
]


def _stream(lines: list[str], **epoch_changes) -> list[ev.Event]:
    events = [ev.parse_event(line) for line in lines]
    for event in events:
        if isinstance(event, ev.EpochEnded) and event.epoch == 2:
            for name, value in epoch_changes.items():
                setattr(event, name, value)
    return events


def test_a_sound_gpu_run_passes():
    assert gpu_check.run_violations(_stream(GOOD_RUN), H200_TOTAL, epochs=2) == []


@pytest.mark.parametrize("name", gpu_check.GPU_FIELDS)
def test_every_null_gpu_figure_is_a_violation(name):
    found = gpu_check.run_violations(_stream(GOOD_RUN, **{name: None}), H200_TOTAL, epochs=2)
    assert found == [f"epoch 2: {name} is null"]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"cuda_max_allocated_mib": 90.0}, "cuda_max_allocated_mib 90.0 MiB > cuda_max_reserved_mib 84.0 MiB"),
        ({"cuda_max_reserved_mib": 700.0}, "cuda_max_reserved_mib 700.0 MiB > gpu_process_peak_mib 612.0 MiB"),
        ({"gpu_process_peak_mib": 2000.0}, "gpu_process_peak_mib 2000.0 MiB > gpu_device_peak_mib 1105.0 MiB"),
        ({"gpu_device_peak_mib": 150000.0}, "gpu_device_peak_mib 150000.0 MiB > device total 143771.0 MiB"),
    ],
)
def test_memory_out_of_order_is_a_violation(changes, expected):
    assert gpu_check.run_violations(_stream(GOOD_RUN, **changes), H200_TOTAL, epochs=2) == [f"epoch 2: {expected}"]


def test_telemetry_not_nvml_a_cpu_device_a_failure_or_missing_epochs_are_violations():
    events = _stream(GOOD_RUN)
    events[0].telemetry = "nvml; per-process memory n/a (pid 7 is not among NVML's processes [])"
    events[0].device = "cpu (x86_64, 16 threads)"
    found = gpu_check.run_violations(events, H200_TOTAL, epochs=3)
    assert any("telemetry status" in v for v in found)
    assert any("not CUDA" in v for v in found)
    assert "2 epoch_end events, expected 3" in found
    failed = [events[0], ev.RunFailed(error_kind="internal", message="boom.")]
    found = gpu_check.run_violations(failed, H200_TOTAL)
    assert "the run failed (internal): boom." in found and "no epoch_end event" in found
    assert gpu_check.run_violations([], H200_TOTAL) == ["no run_started event"]
    assert gpu_check.run_violations(_stream(GOOD_RUN), None, epochs=2)[-1] == "epoch 2: the device total is unknown"


def test_the_forced_oom_must_end_as_memory_with_one_sentence_naming_batch_size():
    good = ev.RunFailed(
        error_kind="memory",
        message="CUDA ran out of memory allocating 24.00 GiB while running the warm-up step with batch_size 2048; "
        "lower the preset key 'batch_size' (now 2048) or free the GPU.",
    )
    assert gpu_check.oom_violations([good]) == []
    assert gpu_check.oom_violations(_stream(GOOD_RUN)) == ["the run did not fail: nothing ran out of memory"]
    internal = ev.RunFailed(error_kind="internal", message="internal error OutOfMemoryError: CUDA out of memory.")
    (violation,) = [v for v in gpu_check.oom_violations([internal]) if "error_kind" in v]
    assert "'internal'" in violation
    torch_text = ev.RunFailed(error_kind="memory", message="CUDA out of memory. Tried to allocate 2 GiB. GPU 0 has.")
    found = gpu_check.oom_violations([torch_text])
    assert any("not one sentence" in v for v in found) and any("batch_size" in v for v in found)


def test_the_summary_is_one_table_and_any_violation_makes_the_exit_code_non_zero():
    checks = [gpu_check.Check("a", figures="1.0 ms/step"), gpu_check.Check("b", ["x | y", "z"])]
    table = gpu_check.summary(checks)
    assert table.splitlines()[0] == "| Check | Result | Figures / violations |"
    assert "| a | pass | 1.0 ms/step |" in table and "| b | FAIL | x / y; z |" in table
    assert gpu_check.exit_code(checks) == 1 and gpu_check.exit_code(checks[:1]) == 0


def test_a_crashing_check_is_a_violation_not_the_end_of_the_script():
    def crash() -> gpu_check.Check:
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    check = gpu_check.timed("crashes", crash)
    assert not check.ok and check.violations == [
        "crashed: RuntimeError: CUDA error: an illegal memory access was encountered"
    ]


def test_without_a_gpu_the_script_says_so_and_exits_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr


PROBE_STARTED = ev.ProbeStarted(
    presets=["qwen7b-dpo-adapter"],
    device="cuda (NVIDIA H100 80GB HBM3)",
    torch_version="2.13.0",
    model_source="qwen2-vl-7b-random",
    batch_size=8,
    steps=5,
    warmup=2,
    rounds=2,
    cores=16,
)


def _round(number: int, peak_mib: float | None = 30_000.0, steps: list[float] | None = None) -> ev.ProbeMeasured:
    return ev.ProbeMeasured(
        preset="qwen7b-dpo-adapter",
        method="dpo",
        round=number,
        step_ms=[410.0, 400.0, 420.0] if steps is None else steps,
        peak_memory_mib=peak_mib,
        memory_source="CUDA",
        reference_strategy="adapter",
        reference_bytes=0,
        setup_seconds=0.0,
    )


def test_a_finished_probe_within_its_peak_limit_passes_and_prints_median_and_peak():
    rounds = [_round(1), _round(2, peak_mib=38_000.0)]
    assert probe_check.probe_violations(PROBE_STARTED, rounds, status="done", max_peak_gb=40) == []
    # 38,000 MiB = 39.85e9 bytes: within 40 GB (decimal), the unit
    assert probe_check.probe_figures(rounds) == [
        "qwen7b-dpo-adapter: 410.0 ms/step (median of 6), CUDA peak 39.85 GB (38000 MiB)"
    ]


def test_a_probe_peak_over_the_limit_a_missing_round_or_a_failed_session_is_a_violation():
    over = probe_check.probe_violations(
        PROBE_STARTED, [_round(1), _round(2, peak_mib=38_200.0)], status="done", max_peak_gb=40
    )
    assert over == ["qwen7b-dpo-adapter: round 2 CUDA peak 40.06 GB > 40 GB"]
    assert probe_check.probe_violations(PROBE_STARTED, [_round(1), _round(2, 38_200.0)], status="done") == []
    found = probe_check.probe_violations(PROBE_STARTED, [_round(1, steps=[float("nan")])], status="failed")
    assert found == [
        "the probe session ended 'failed', not 'done'",
        "qwen7b-dpo-adapter: measured in rounds [1], expected 1..2",
        "qwen7b-dpo-adapter: round 1 step times [nan]",
    ]
    assert probe_check.probe_violations(None, [], status="done") == ["the session is not a probe (no probe_started)"]
    no_peak = probe_check.probe_violations(PROBE_STARTED, [_round(1), _round(2, None)], status="done")
    assert no_peak == ["qwen7b-dpo-adapter: round 2 has no peak memory"]
