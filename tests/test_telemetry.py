"""Telemetry: n/a without a GPU, correct per-epoch peaks and means, never a crash."""

from __future__ import annotations

import dataclasses
import os
import time
from types import SimpleNamespace

import pynvml
import pytest
import torch
from torch import nn

from vqabench.engine import telemetry
from vqabench.engine.telemetry import MIB, NvmlSource, Reading, Telemetry, module_bytes
from vqabench.events import EpochEnded, encode_event, parse_event


class ScriptedSource:
    """Plays back a fixed list of readings; an Exception in the list is raised instead."""

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.calls = 0

    def read(self) -> Reading | None:
        self.calls += 1
        if not self.script:
            return None
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def _nvml_available() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def _epoch_ended(fields: dict) -> EpochEnded:
    return EpochEnded(
        epoch=1,
        epochs=1,
        train_loss=0.5,
        eval_loss=0.6,
        epoch_seconds=1.0,
        eval_seconds=0.1,
        samples_per_s=10.0,
        lr=1e-4,
        reference_bytes=0,
        chosen_logp=-1.0,
        rejected_logp=-2.0,
        reward_margin=1.0,
        pref_accuracy=1.0,
        is_best=True,
        **fields,
    )


def test_cpu_run_says_na_and_still_reports_rss():
    tele = Telemetry("cpu", interval=0.01)
    assert tele.status.startswith("n/a")
    tele.start()
    tele.begin_epoch()
    ballast = bytearray(32 * MIB)  # touch memory so the sampler sees a real RSS
    time.sleep(0.1)
    result = tele.end_epoch()
    tele.stop()
    del ballast
    assert result.peak_rss_mib > 32
    assert result.epoch_rss_peak_mib is not None and result.epoch_rss_peak_mib > 32
    assert result.peak_rss_mib >= result.epoch_rss_peak_mib
    assert result.samples >= 3
    for name in (
        "cuda_max_allocated_mib",
        "cuda_max_reserved_mib",
        "gpu_process_peak_mib",
        "gpu_device_peak_mib",
        "gpu_util_mean",
        "gpu_power_mean_w",
    ):
        assert getattr(result, name) is None, name


@pytest.mark.skipif(_nvml_available(), reason="this machine has NVML; the n/a path is not reachable")
def test_cuda_device_without_nvml_says_why_and_gives_none():
    tele = Telemetry("cuda:0")
    assert tele.status.startswith("n/a: ")
    assert "\n" not in tele.status and "cuda:0" in tele.status
    tele.begin_epoch()
    result = tele.end_epoch()
    tele.stop()
    assert result.gpu_device_peak_mib is None and result.gpu_power_mean_w is None
    assert result.peak_rss_mib > 0


def test_epoch_fields_fit_the_event_and_stay_null_not_zero():
    tele = Telemetry("cpu")
    tele.begin_epoch()
    fields = tele.end_epoch().event_fields()
    assert set(fields) <= {f.name for f in dataclasses.fields(EpochEnded)}
    line = encode_event(_epoch_ended(fields))
    back = parse_event(line)
    assert back.gpu_util_mean is None and back.cuda_max_allocated_mib is None
    assert back.peak_rss_mib == fields["peak_rss_mib"]


def test_scripted_readings_give_peaks_and_means_per_epoch():
    source = ScriptedSource(
        [
            Reading(process_mib=9999, device_used_mib=9999, util_percent=0, power_w=0),  # before the epoch
            Reading(process_mib=100, device_used_mib=1000, device_total_mib=8000, util_percent=50, power_w=100),
            Reading(process_mib=300, device_used_mib=1500, device_total_mib=8000, util_percent=None, power_w=200),
            Reading(process_mib=200, device_used_mib=1200, device_total_mib=8000, util_percent=90, power_w=None),
            None,  # end_epoch's closing sample: nothing to report
            Reading(process_mib=50, device_used_mib=900, device_total_mib=8000, util_percent=10, power_w=60),
        ]
    )
    tele = Telemetry("cpu", source=source)
    tele.sample()  # outside an epoch window: read but not counted
    tele.begin_epoch()
    tele.sample()
    tele.sample()
    tele.sample()
    first = tele.end_epoch()
    assert first.gpu_process_peak_mib == 300
    assert first.gpu_device_peak_mib == 1500
    assert first.gpu_device_total_mib == 8000
    assert first.gpu_util_mean == pytest.approx(70.0)  # mean of 50 and 90; the None is left out
    assert first.gpu_power_mean_w == pytest.approx(150.0)
    assert first.samples == 4 and first.failed_samples == 0

    tele.begin_epoch()
    second = tele.end_epoch()  # one closing sample: the 50 MiB reading
    assert second.gpu_process_peak_mib == 50
    assert second.gpu_util_mean == pytest.approx(10.0)

    tele.begin_epoch()
    empty = tele.end_epoch()  # script exhausted: nothing measured, so None rather than 0
    assert empty.gpu_process_peak_mib is None and empty.gpu_util_mean is None
    assert empty.peak_rss_mib > 0


def test_a_source_that_raises_midway_degrades_to_none():
    source = ScriptedSource(
        [
            Reading(process_mib=10, util_percent=20, power_w=30),
            RuntimeError("GPU fell off the bus"),
            pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST),
            Reading(process_mib=40, util_percent=60, power_w=70),
        ]
    )
    tele = Telemetry("cpu", source=source)
    tele.begin_epoch()
    for _ in range(3):
        tele.sample()
    result = tele.end_epoch()
    assert result.failed_samples == 2 and result.samples == 4
    assert result.gpu_process_peak_mib == 40
    assert result.gpu_util_mean == pytest.approx(40.0)
    assert result.gpu_power_mean_w == pytest.approx(50.0)
    assert "GPU" in tele.last_error


def test_sampler_thread_survives_a_failing_source():
    class Flaky:
        def __init__(self) -> None:
            self.calls = 0

        def read(self) -> Reading:
            self.calls += 1
            if self.calls % 2:
                raise OSError("intermittent")
            return Reading(device_used_mib=float(self.calls))

    source = Flaky()
    tele = Telemetry("cpu", interval=0.005, source=source)
    tele.begin_epoch()
    tele.start()
    deadline = time.monotonic() + 2.0
    while source.calls < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tele._thread is not None and tele._thread.is_alive()
    result = tele.end_epoch()
    tele.stop()
    assert result.failed_samples >= 4
    assert result.gpu_device_peak_mib is not None and result.gpu_device_peak_mib >= 4
    assert tele._thread is None


class FakeNvml:
    """Stands in for pynvml (no GPU here), raising the real pynvml error classes."""

    NVMLError = pynvml.NVMLError
    NVML_VALUE_NOT_AVAILABLE_ulonglong = pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong

    def __init__(self, processes: list, power_mw: int | None = 250_000) -> None:
        self.processes = processes
        self.power_mw = power_mw
        self.init_count = 0
        self.index_asked: list[int] = []
        self.uuid_asked: list[str] = []

    def nvmlInit(self) -> None:
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self.init_count -= 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self.index_asked.append(index)
        return f"handle{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self.uuid_asked.append(uuid)
        return f"handle-{uuid}"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(used=3 * 1024 * MIB, total=80 * 1024 * MIB, free=77 * 1024 * MIB)

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        if self.power_mw is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self.power_mw

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list:
        if isinstance(self.processes, Exception):
            raise self.processes
        return self.processes


def _proc(pid: int, used: int | None) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, usedGpuMemory=used)


def test_nvml_source_filters_this_pid_and_converts_units():
    me = os.getpid()
    fake = FakeNvml([_proc(me, 512 * MIB), _proc(me + 1, 9000 * MIB), _proc(me, 256 * MIB)])
    source = NvmlSource.open(0, me, fake)
    reading = source.read()
    assert reading.process_mib == 768  # both of this pid's contexts, not the other process
    assert reading.device_used_mib == 3 * 1024 and reading.device_total_mib == 80 * 1024
    assert reading.util_percent == 87.0
    assert reading.power_w == pytest.approx(250.0)  # mW -> W
    tele = Telemetry("cuda:0", source=source)
    assert tele.status == "nvml"
    tele.stop()
    assert fake.init_count == 0  # NVML released
    assert source.read() is None


@pytest.mark.parametrize("used", [None, pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value])
def test_nvml_process_memory_not_available_is_none(used):
    me = os.getpid()
    source = NvmlSource("h", me, FakeNvml([_proc(me, used)]))
    assert source.read().process_mib is None


def test_nvml_unsupported_counters_leave_only_that_figure_none():
    me = os.getpid()
    fake = FakeNvml(pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED), power_mw=None)
    reading = NvmlSource("h", me, fake).read()
    assert reading.process_mib is None and reading.power_w is None
    assert reading.device_used_mib == 3 * 1024 and reading.util_percent == 87.0
    assert NvmlSource("h", me + 12345, FakeNvml([_proc(me, 100 * MIB)])).read().process_mib is None


def test_nvml_handle_follows_cuda_visible_devices(monkeypatch):
    fake = FakeNvml([])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert telemetry._nvml_handle(fake, 1) == "handle1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa, GPU-bbbb")
    assert telemetry._nvml_handle(fake, 1) == "handle-GPU-bbbb"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert telemetry._nvml_handle(fake, 0) == "handle0"


def test_module_bytes_counts_parameters_and_buffers_once():
    linear = nn.Linear(4, 3)  # 12 + 3 float32
    norm = nn.BatchNorm1d(3)  # weight, bias, running mean, running var (float32) + int64 counter
    model = nn.Sequential(linear, norm, linear)  # the shared layer must count once
    assert module_bytes(model) == (4 * 3 + 3) * 4 + (3 * 4) * 4 + 8
    assert module_bytes(nn.Linear(4, 3).to(torch.float16)) == (4 * 3 + 3) * 2
    assert module_bytes(nn.ReLU()) == 0


def test_peak_rss_is_per_epoch_not_the_lifetime_peak():
    import numpy as np

    from vqabench.engine.telemetry import Telemetry, reset_peak_rss

    if not reset_peak_rss():
        pytest.skip("this kernel cannot reset the RSS high-water mark")
    tel = Telemetry("cpu", interval=0.05)
    big = np.ones(64 * 2**20 // 8)  # 64 MiB touched in the first epoch only
    big += 1
    tel.begin_epoch()
    big2 = np.ones(64 * 2**20 // 8)
    big2 += 1
    first = tel.end_epoch().peak_rss_mib
    del big, big2
    tel.begin_epoch()
    second = tel.end_epoch().peak_rss_mib
    assert second < first - 50  # the second epoch does not inherit the first one's peak
