"""Telemetry: n/a without a GPU, correct per-epoch peaks and means, never a crash."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from types import SimpleNamespace
from typing import ClassVar

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


class FakeCLibrary:
    """Stands in for libnvidia-ml behind the REAL pynvml wrappers: an old driver without ``_v3``.

    pynvml looks each C function up by name on ``pynvml.nvmlLib``; a missing name becomes
    NVML_ERROR_FUNCTION_NOT_FOUND, which the unversioned wrapper turns into
    NVMLLibraryMismatchError (not an NVMLError). ``_v2`` fills the caller's struct array.
    """

    def __init__(self, processes: list[tuple[int, int]]) -> None:
        self.processes = processes

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle, count_ref, array):
        count = count_ref._obj
        if array is None:
            count.value = len(self.processes)
            return pynvml.NVML_ERROR_INSUFFICIENT_SIZE if self.processes else pynvml.NVML_SUCCESS
        for i, (pid, used) in enumerate(self.processes):
            array[i].pid = pid
            array[i].usedGpuMemory = used
        count.value = len(self.processes)
        return pynvml.NVML_SUCCESS


@pytest.fixture
def old_driver(monkeypatch):
    """Installs FakeCLibrary as pynvml's loaded library; returns a factory taking the process list."""

    def install(processes: list[tuple[int, int]]) -> None:
        monkeypatch.setattr(pynvml, "nvmlLib", FakeCLibrary(processes))
        monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer_cache", {})

    return install


class RealWrappersNvml(FakeNvml):
    """FakeNvml whose process queries are pynvml's own wrappers (over FakeCLibrary)."""

    nvmlDeviceGetComputeRunningProcesses = staticmethod(pynvml.nvmlDeviceGetComputeRunningProcesses)
    nvmlDeviceGetComputeRunningProcesses_v2 = staticmethod(pynvml.nvmlDeviceGetComputeRunningProcesses_v2)


def test_library_mismatch_on_v3_falls_back_to_v2_and_keeps_every_other_counter(old_driver):
    me = os.getpid()
    old_driver([(me, 640 * MIB), (me + 1, 9000 * MIB)])
    with pytest.raises(pynvml.NVMLLibraryMismatchError):  # the real wrapper: not an NVMLError
        pynvml.nvmlDeviceGetComputeRunningProcesses("h")
    source = NvmlSource("h", me, RealWrappersNvml([]))
    reading = source.read()
    assert reading.process_mib == 640
    assert reading.device_used_mib == 3 * 1024 and reading.util_percent == 87.0 and reading.power_w == 250
    assert source._process_queries == ["nvmlDeviceGetComputeRunningProcesses_v2"]  # v3 is not retried
    assert source.read().process_mib == 640
    assert Telemetry("cuda:0", source=source).status == "nvml"


def test_library_mismatch_on_every_process_query_leaves_only_process_memory_none(monkeypatch):
    class NoProcessQueries(FakeNvml):
        def nvmlDeviceGetComputeRunningProcesses(self, handle):
            raise pynvml.NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not match")

        def nvmlDeviceGetComputeRunningProcesses_v2(self, handle):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    source = NvmlSource("h", os.getpid(), NoProcessQueries([]))
    reading = source.read()
    assert reading.process_mib is None
    assert reading.device_used_mib == 3 * 1024 and reading.util_percent == 87.0 and reading.power_w == 250
    status = Telemetry("cuda:0", source=source).status
    assert status.startswith("nvml; per-process memory n/a") and "Function Not Found" in status


def test_any_exception_from_one_counter_leaves_only_that_figure_none():
    class Broken(FakeNvml):
        def nvmlDeviceGetUtilizationRates(self, handle):
            raise OSError("ctypes argument error")

        def nvmlDeviceGetMemoryInfo(self, handle):
            raise pynvml.NVMLLibraryMismatchError("mismatch")

    me = os.getpid()
    source = NvmlSource("h", me, Broken([_proc(me, 100 * MIB)]))
    reading = source.read()
    assert reading.util_percent is None and reading.device_used_mib is None and reading.device_total_mib is None
    assert reading.process_mib == 100 and reading.power_w == 250
    assert set(source.unavailable) == {"utilisation", "memory"}


class MigNvml(FakeNvml):
    """Two GPUs; GPU 1 has MIG on with slots 0 and 2 filled. Handles are the UUIDs."""

    GPUS = ("GPU-aaaa-0000", "GPU-bbbb-1111")
    MIGS: ClassVar[dict[int, dict[int, str]]] = {1: {0: "MIG-cccc-2222", 2: "MIG-dddd-3333"}}
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE

    def nvmlDeviceGetCount(self) -> int:
        return len(self.GPUS)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self.index_asked.append(index)
        return self.GPUS[index]

    def nvmlDeviceGetUUID(self, handle: str) -> bytes:
        return handle.encode()  # older bindings return bytes

    def nvmlDeviceGetMigMode(self, handle: str) -> tuple[int, int]:
        index = self.GPUS.index(handle)
        if index not in self.MIGS:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: str) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: str, slot: int) -> str:
        migs = self.MIGS[self.GPUS.index(handle)]
        if slot not in migs:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return migs[slot]

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        if handle.startswith("MIG-"):
            return SimpleNamespace(used=2 * 1024 * MIB, total=10 * 1024 * MIB, free=8 * 1024 * MIB)
        return super().nvmlDeviceGetMemoryInfo(handle)

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        if handle.startswith("MIG-"):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return super().nvmlDeviceGetUtilizationRates(handle)


def test_mig_device_is_found_by_its_mig_uuid_not_the_parent_card(monkeypatch):
    monkeypatch.setattr(telemetry, "_torch_device_uuid", lambda index: "dddd-3333")  # torch prints no prefix
    fake = MigNvml([])
    handle = telemetry._nvml_handle(fake, 0)
    assert handle == "MIG-dddd-3333"
    reading = NvmlSource(handle, os.getpid(), fake).read()
    assert reading.device_total_mib == 10 * 1024  # the slice, not the 80 GiB card
    assert reading.util_percent is None  # not supported on MIG: only that figure is lost
    monkeypatch.setattr(telemetry, "_torch_device_uuid", lambda index: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-cccc-2222")
    assert telemetry._nvml_handle(fake, 0) == "MIG-cccc-2222"


def test_mig_without_a_matching_uuid_is_na_with_the_reason_never_the_parent(monkeypatch):
    monkeypatch.setattr(telemetry, "_torch_device_uuid", lambda index: "ffff-9999")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    fake = MigNvml([])
    with pytest.raises(telemetry.NvmlUnavailable, match="MIG is enabled"):
        telemetry._nvml_handle(fake, 0)
    fake.index_asked.clear()
    monkeypatch.setitem(sys.modules, "pynvml", fake)  # what Telemetry imports
    tele = Telemetry("cuda:0")
    assert tele.status.startswith("n/a: MIG is enabled") and "ffff-9999" in tele.status
    assert tele.source is None and fake.init_count == 0  # NVML released again
    assert fake.index_asked == [0, 1]  # listed, never used as the fallback


def test_gpu_uuid_matches_across_prefixes_without_mig(monkeypatch):
    monkeypatch.setattr(telemetry, "_torch_device_uuid", lambda index: "bbbb-1111")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = MigNvml([])
    fake.MIGS = {}
    assert telemetry._nvml_handle(fake, 0) == "GPU-bbbb-1111"


def test_container_pid_comes_from_vqabench_host_pid_and_the_status_says_why_when_missing(monkeypatch):
    inner = os.getpid()
    fake = FakeNvml([_proc(424242, 700 * MIB), _proc(515151, 90 * MIB)])  # NVML lists host pids only
    status = Telemetry("cuda:0", source=NvmlSource("h", inner, fake)).status
    assert status.startswith("nvml; per-process memory n/a")
    assert f"pid {inner} is not among" in status and "VQABENCH_HOST_PID" in status and "424242" in status
    monkeypatch.setenv("VQABENCH_HOST_PID", "424242")
    assert telemetry.host_pid() == 424242
    tele = Telemetry("cpu", source=ScriptedSource([]))
    assert tele.pid == 424242
    source = NvmlSource("h", tele.pid, fake)
    assert source.read().process_mib == 700
    assert Telemetry("cuda:0", pid=tele.pid, source=source).status == "nvml"
    monkeypatch.setenv("VQABENCH_HOST_PID", "not-a-pid")
    with pytest.raises(ValueError, match="VQABENCH_HOST_PID"):
        telemetry.host_pid()
    assert Telemetry("cpu").pid == inner  # a bad setting is logged, never fatal
