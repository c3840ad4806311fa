"""What a training run costs in memory and power: NVML sampling, CUDA peaks and process RSS.

A :class:`Telemetry` samples in a daemon thread every ``interval`` seconds and folds the
readings into per-epoch windows (:meth:`Telemetry.begin_epoch` / :meth:`Telemetry.end_epoch`).
Where something cannot be measured (no GPU, no NVML, a counter the driver does not support)
the figure is ``None``, never a fake zero. torch and pynvml are imported lazily, so importing
this module is cheap. Documented in ``docs/telemetry.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

MIB = 1024 * 1024
_EVENT_FIELDS = (
    "peak_rss_mib",
    "cuda_max_allocated_mib",
    "cuda_max_reserved_mib",
    "gpu_process_peak_mib",
    "gpu_device_peak_mib",
    "gpu_util_mean",
    "gpu_power_mean_w",
)


@dataclass(frozen=True)
class Reading:
    """One GPU sample; each figure is None when it could not be read this time."""

    process_mib: float | None = None  # memory NVML attributes to the watched pid
    device_used_mib: float | None = None
    device_total_mib: float | None = None
    util_percent: float | None = None
    power_w: float | None = None


class ReadingSource(Protocol):
    """Anything that yields GPU readings; returns None when it has nothing to report."""

    def read(self) -> Reading | None: ...


@dataclass
class EpochTelemetry:
    """Memory and GPU figures of one epoch window; names match events.EpochEnded.

    ``peak_rss_mib`` is this epoch's peak RSS: the kernel's high-water mark, reset when the
    epoch begins (Linux); where it cannot be reset, the lifetime peak (getrusage);
    ``epoch_rss_peak_mib`` is the highest RSS the sampler saw inside this window.
    """

    peak_rss_mib: float
    epoch_rss_peak_mib: float | None = None
    cuda_max_allocated_mib: float | None = None
    cuda_max_reserved_mib: float | None = None
    gpu_process_peak_mib: float | None = None
    gpu_device_peak_mib: float | None = None
    gpu_device_total_mib: float | None = None
    gpu_util_mean: float | None = None
    gpu_power_mean_w: float | None = None
    samples: int = 0  # sampler ticks inside the window
    failed_samples: int = 0  # ticks whose source raised

    def event_fields(self) -> dict[str, Any]:
        """The subset that events.EpochEnded carries, ready for EpochEnded(**...)."""
        return {name: getattr(self, name) for name in _EVENT_FIELDS}


def module_bytes(module: Any) -> int:
    """Bytes held by a module's parameters and buffers; shared tensors are counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def process_peak_rss_mib() -> float:
    """This process's lifetime peak resident set size in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim).

    Work between epochs (eval answers, judging) leaves freed but resident heap behind; without
    this, an epoch's RSS would start from whatever that work happened to leave.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; False where Linux can't.

    Lets each epoch report its own peak instead of the lifetime peak, which would carry
    over whatever the process did before (building the base checkpoint, say).
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_mib() -> float | None:
    """VmHWM from /proc/self/status: the peak RSS since start or the last reset_peak_rss()."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_rss_mib() -> float | None:
    """This process's resident set size now, from /proc/self/statm; None where there is no /proc."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            resident_pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB


def _cuda_index(device: str) -> int | None:
    """The torch device index of a "cuda" / "cuda:N" device string; None for other devices."""
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return None
    if index:
        return int(index)
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else 0


class NvmlSource:
    """Reads one GPU through NVML: this pid's memory, device memory, utilisation and power.

    `nvml` is the pynvml module; tests pass a stand-in because no GPU runs here. Every
    counter is read on its own, so one unsupported counter (power on some boards, process
    memory on MIG slices) leaves only that figure None.
    """

    def __init__(self, handle: Any, pid: int, nvml: Any) -> None:
        self.handle = handle
        self.pid = pid
        self.nvml = nvml
        self._closed = False

    @classmethod
    def open(cls, cuda_index: int, pid: int, nvml: Any | None = None) -> NvmlSource:
        """Initialise NVML and find the GPU that torch calls cuda:`cuda_index`; raises NVMLError."""
        if nvml is None:
            import pynvml

            nvml = pynvml
        nvml.nvmlInit()
        try:
            handle = _nvml_handle(nvml, cuda_index)
        except Exception:
            nvml.nvmlShutdown()
            raise
        return cls(handle, pid, nvml)

    def read(self) -> Reading | None:
        if self._closed:
            return None
        nvml = self.nvml
        memory = self._query(nvml.nvmlDeviceGetMemoryInfo)
        util = self._query(nvml.nvmlDeviceGetUtilizationRates)
        power_mw = self._query(nvml.nvmlDeviceGetPowerUsage)
        return Reading(
            process_mib=self._process_mib(),
            device_used_mib=memory.used / MIB if memory is not None else None,
            device_total_mib=memory.total / MIB if memory is not None else None,
            util_percent=float(util.gpu) if util is not None else None,
            power_w=power_mw / 1000.0 if power_mw is not None else None,
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(self.nvml.NVMLError):
                self.nvml.nvmlShutdown()

    def _query(self, function: Any) -> Any:
        try:
            return function(self.handle)
        except self.nvml.NVMLError:
            return None

    def _process_mib(self) -> float | None:
        processes = self._query(self.nvml.nvmlDeviceGetComputeRunningProcesses)
        if processes is None:
            return None
        # pynvml maps NVML_VALUE_NOT_AVAILABLE to None; older bindings leave the raw sentinel
        sentinel = getattr(self.nvml, "NVML_VALUE_NOT_AVAILABLE_ulonglong", None)
        sentinel_value = getattr(sentinel, "value", 2**64 - 1)
        used = [p.usedGpuMemory for p in processes if p.pid == self.pid]
        known = [u for u in used if u is not None and u != sentinel_value]
        if not known:  # not listed (no CUDA context yet, or another PID namespace) or not available
            return None
        return sum(known) / MIB


def _nvml_handle(nvml: Any, cuda_index: int) -> Any:
    """Map torch's cuda index to an NVML handle.

    NVML numbers every GPU in PCI bus order and ignores CUDA_VISIBLE_DEVICES; CUDA numbers the
    visible GPUs only, fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID. The device UUID that
    torch reports is exact; the CUDA_VISIBLE_DEVICES entry is the fallback, and its integer
    form is only right under PCI_BUS_ID order or with one GPU.
    """
    uuid = _torch_device_uuid(cuda_index)
    if uuid is not None:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(uuid)
        except nvml.NVMLError:
            pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if cuda_index < len(visible):
        entry = visible[cuda_index]
        if entry.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(entry))
        return nvml.nvmlDeviceGetHandleByUUID(entry)
    return nvml.nvmlDeviceGetHandleByIndex(cuda_index)


def _torch_device_uuid(cuda_index: int) -> str | None:
    """ "GPU-<uuid>" of torch's cuda:`cuda_index`, or None where torch cannot say."""
    if "torch" not in sys.modules:
        return None
    import torch

    try:
        if not torch.cuda.is_available():
            return None
        uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
    except (AttributeError, RuntimeError, AssertionError):
        return None
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


class _Window:
    """Running peaks and means of one epoch window."""

    def __init__(self) -> None:
        self.samples = 0
        self.failed = 0
        self.rss_peak: float | None = None
        self.process_peak: float | None = None
        self.device_peak: float | None = None
        self.device_total: float | None = None
        self.util: list[float] = []
        self.power: list[float] = []

    def add(self, reading: Reading | None, rss_mib: float | None) -> None:
        self.samples += 1
        self.rss_peak = _max(self.rss_peak, rss_mib)
        if reading is None:
            return
        self.process_peak = _max(self.process_peak, reading.process_mib)
        self.device_peak = _max(self.device_peak, reading.device_used_mib)
        if reading.device_total_mib is not None:
            self.device_total = reading.device_total_mib
        if reading.util_percent is not None:
            self.util.append(reading.util_percent)
        if reading.power_w is not None:
            self.power.append(reading.power_w)


def _max(current: float | None, value: float | None) -> float | None:
    if value is None:
        return current
    return value if current is None else max(current, value)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


class Telemetry:
    """Per-epoch memory, utilisation and power of the worker, sampled in a daemon thread.

    ``status`` is "nvml" when GPU figures are read, else "n/a: <reason>" (once, for
    run_started). `pid` is the process whose GPU memory NVML reports (default: this one; in
    a container without the host PID namespace NVML lists host pids, so pass that one); RSS
    is always this process's. `source` replaces NVML with any object whose ``read()``
    returns a :class:`Reading` or None, so the aggregation is testable without a GPU.
    """

    def __init__(
        self, device: str, interval: float = 0.2, pid: int | None = None, source: ReadingSource | None = None
    ) -> None:
        if interval <= 0:
            raise ValueError(f"telemetry interval must be positive, got {interval!r}")
        self.device = device
        self.interval = interval
        self.pid = os.getpid() if pid is None else pid
        self._cuda_index = _cuda_index(device)
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._window: _Window | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self._hwm_reset = False
        if source is not None:
            self.source: ReadingSource | None = source
            self.status = "nvml" if isinstance(source, NvmlSource) else f"custom source {type(source).__name__}"
        else:
            self.source, self.status = self._open_nvml()

    def _open_nvml(self) -> tuple[NvmlSource | None, str]:
        if self._cuda_index is None:
            return None, f"n/a: device is {self.device}, not a CUDA GPU"
        try:
            import pynvml
        except ImportError:
            return None, "n/a: nvidia-ml-py (pynvml) is not installed"
        try:
            return NvmlSource.open(self._cuda_index, self.pid, pynvml), "nvml"
        except pynvml.NVMLError as exc:
            return None, f"n/a: NVML cannot read cuda:{self._cuda_index} ({exc})"

    @property
    def uses_cuda(self) -> bool:
        """Whether torch.cuda peak statistics apply (a CUDA device that torch can use)."""
        if self._cuda_index is None:
            return False
        import torch

        return torch.cuda.is_available()

    def start(self) -> None:
        """Start the sampler thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="vqabench-telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the sampler thread and release NVML; epoch windows can still be closed afterwards."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval * 5 + 1.0)
            self._thread = None
        close = getattr(self.source, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Telemetry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Take one reading now and fold it into the open epoch window (no-op outside one)."""
        reading: Reading | None = None
        failed = False
        if self.source is not None:
            with self._read_lock:
                try:
                    reading = self.source.read()
                except Exception as exc:  # a sampler must never take the run down
                    failed = True
                    if self.last_error is None:
                        log.warning("telemetry: reading failed, figures for this sample are None: %s", exc)
                    self.last_error = f"{type(exc).__name__}: {exc}"
        rss = process_rss_mib()
        with self._lock:
            if self._window is not None:
                self._window.add(reading, rss)
                self._window.failed += int(failed)

    def begin_epoch(self) -> None:
        """Open a new window and reset torch's CUDA peak counters."""
        if self.uses_cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self._cuda_index)
        release_free_memory()
        self._hwm_reset = reset_peak_rss()
        with self._lock:
            self._window = _Window()

    def end_epoch(self) -> EpochTelemetry:
        """Close the window (after one last reading) and return its figures."""
        self.sample()
        with self._lock:
            window, self._window = self._window or _Window(), None
        allocated = reserved = None
        if self.uses_cuda:
            import torch

            allocated = torch.cuda.max_memory_allocated(self._cuda_index) / MIB
            reserved = torch.cuda.max_memory_reserved(self._cuda_index) / MIB
        # the kernel updates its high-water mark lazily, so a sampled RSS can run slightly above it
        since_reset = peak_rss_since_reset_mib() if self._hwm_reset else None
        high_water = since_reset if since_reset is not None else process_peak_rss_mib()
        peak = high_water if window.rss_peak is None else max(high_water, window.rss_peak)
        return EpochTelemetry(
            peak_rss_mib=peak,
            epoch_rss_peak_mib=window.rss_peak,
            cuda_max_allocated_mib=allocated,
            cuda_max_reserved_mib=reserved,
            gpu_process_peak_mib=window.process_peak,
            gpu_device_peak_mib=window.device_peak,
            gpu_device_total_mib=window.device_total,
            gpu_util_mean=_mean(window.util),
            gpu_power_mean_w=_mean(window.power),
            samples=window.samples,
            failed_samples=window.failed,
        )
