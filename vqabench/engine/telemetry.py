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


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (AdamW: its two moments and step), as allocated."""
    import torch

    return sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    )


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


def host_pid() -> int:
    """The pid NVML knows this process by: $VQABENCH_HOST_PID where set (containers), else os.getpid()."""
    value = os.environ.get("VQABENCH_HOST_PID", "").strip()
    if not value:
        return os.getpid()
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"environment variable VQABENCH_HOST_PID has value {value!r}; it must be a positive pid.")
    return int(value)


def _nvml_status(source: NvmlSource) -> str:
    """ "nvml", or "nvml; per-process memory n/a (<reason>)" when only the worker's own figure is missing."""
    problem = source.process_memory_problem()
    return "nvml" if problem is None else f"nvml; {problem}"


def _cuda_index(device: str) -> int | None:
    """The torch device index of a "cuda" / "cuda:N" device string; None for other devices."""
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return None
    if index:
        return int(index)
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else 0


class NvmlUnavailable(RuntimeError):
    """NVML is loaded but cannot say which device is ours; the message is the reason for the status."""


#: The process queries, newest first: drivers older than the bindings lack ``_v3``, and pynvml
#: then raises NVMLLibraryMismatchError (not an NVMLError) from the unversioned name.
PROCESS_QUERIES = ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2")


def _describe_error(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class NvmlSource:
    """Reads one GPU (or MIG device) through NVML: this pid's memory, device memory, utilisation and power.

    `nvml` is the pynvml module; tests pass a stand-in because no GPU runs here. Every
    counter is read on its own and any exception leaves only that figure None (power on some
    boards, utilisation on MIG slices, process queries on old drivers). ``unavailable`` keeps
    the last reason per counter.
    """

    def __init__(self, handle: Any, pid: int, nvml: Any) -> None:
        self.handle = handle
        self.pid = pid
        self.nvml = nvml
        self._closed = False
        self._process_queries = [name for name in PROCESS_QUERIES if hasattr(nvml, name)]
        self.unavailable: dict[str, str] = {}

    @classmethod
    def open(cls, cuda_index: int, pid: int, nvml: Any | None = None) -> NvmlSource:
        """Initialise NVML and find the device that torch calls cuda:`cuda_index`.

        Raises NVMLError (or pynvml's other exceptions) when NVML cannot start, and
        NvmlUnavailable when it cannot tell which device is ours (MIG without a matching UUID).
        """
        if nvml is None:
            import pynvml

            nvml = pynvml
        nvml.nvmlInit()
        try:
            handle = _nvml_handle(nvml, cuda_index)
        except BaseException:
            nvml.nvmlShutdown()
            raise
        return cls(handle, pid, nvml)

    def read(self) -> Reading | None:
        if self._closed:
            return None
        nvml = self.nvml
        memory = self._query("memory", nvml.nvmlDeviceGetMemoryInfo)
        util = self._query("utilisation", nvml.nvmlDeviceGetUtilizationRates)
        power_mw = self._query("power", nvml.nvmlDeviceGetPowerUsage)
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
            with contextlib.suppress(Exception):  # pynvml raises more than NVMLError
                self.nvml.nvmlShutdown()

    def _query(self, counter: str, function: Any) -> Any:
        try:
            value = function(self.handle)
        except Exception as exc:  # NVMLError, NVMLLibraryMismatchError, a ctypes error: only this counter is lost
            self.unavailable[counter] = _describe_error(exc)
            return None
        self.unavailable.pop(counter, None)
        return value

    def processes(self) -> list[Any] | None:
        """NVML's compute processes on this device, trying ``_v3`` then ``_v2``; None if neither answers."""
        for name in list(self._process_queries):
            try:
                found = getattr(self.nvml, name)(self.handle)
            except Exception as exc:
                self.unavailable["process"] = f"{name}: {_describe_error(exc)}"
                if len(self._process_queries) > 1 and name == self._process_queries[0]:
                    self._process_queries.remove(name)  # an older driver: go straight to the next one
                continue
            self.unavailable.pop("process", None)
            return list(found)
        return None

    def _process_mib(self) -> float | None:
        processes = self.processes()
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

    def process_memory_problem(self) -> str | None:
        """Why per-process memory is unavailable right now (one clause for the status), or None if it is read."""
        processes = self.processes()
        if processes is None:
            return f"per-process memory n/a ({self.unavailable.get('process', 'no process query in pynvml')})"
        mine = [p for p in processes if p.pid == self.pid]
        if not mine:
            others = sorted({int(p.pid) for p in processes})[:8]
            hint = (
                "NVML lists host pids: in a container set VQABENCH_HOST_PID to the worker's host pid"
                if others
                else "no process holds a CUDA context on this device yet"
            )
            return f"per-process memory n/a (pid {self.pid} is not among NVML's processes {others}; {hint})"
        if self._process_mib() is None:
            return "per-process memory n/a (the driver does not report it for this device)"
        return None


def _bare_uuid(uuid: Any) -> str:
    """A UUID without its "GPU-"/"MIG-" prefixes, lower case, so torch's and NVML's forms compare."""
    text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    text = text.strip().lower()
    while text[:4] in ("gpu-", "mig-"):
        text = text[4:]
    return text


def _nvml_devices(nvml: Any) -> tuple[list[tuple[str, Any]], bool]:
    """(uuid, handle) of every GPU and every MIG device NVML sees, and whether any GPU has MIG on."""
    found: list[tuple[str, Any]] = []
    mig_on = False
    enabled = getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1)
    for index in range(int(nvml.nvmlDeviceGetCount())):
        try:
            gpu = nvml.nvmlDeviceGetHandleByIndex(index)
            found.append((_bare_uuid(nvml.nvmlDeviceGetUUID(gpu)), gpu))
        except Exception:
            continue
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(gpu)
        except Exception:  # not MIG-capable, or an old driver
            continue
        if current != enabled:
            continue
        mig_on = True
        try:
            slots = int(nvml.nvmlDeviceGetMaxMigDeviceCount(gpu))
        except Exception:
            continue
        for slot in range(slots):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, slot)
                found.append((_bare_uuid(nvml.nvmlDeviceGetUUID(mig)), mig))
            except Exception:  # an empty slot
                continue
    return found, mig_on


def _nvml_handle(nvml: Any, cuda_index: int) -> Any:
    """Map torch's cuda index to an NVML handle of a GPU or a MIG device.

    NVML numbers every GPU in PCI bus order and ignores CUDA_VISIBLE_DEVICES; CUDA numbers the
    visible devices only, fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID. So the device is
    found by UUID: torch's UUID of the device, else a UUID entry of CUDA_VISIBLE_DEVICES, matched
    against nvmlDeviceGetUUID of every GPU and every MIG device. With MIG on and nothing matched
    this raises NvmlUnavailable rather than read the parent card (every tenant's memory). Without
    MIG the integer CUDA_VISIBLE_DEVICES entry, then the index itself, are the fallbacks (right
    with one GPU or under PCI_BUS_ID order).
    """
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    entry = visible[cuda_index] if cuda_index < len(visible) else None
    wanted = [u for u in (_torch_device_uuid(cuda_index), entry) if u is not None and not u.isdigit()]
    try:
        devices, mig_on = _nvml_devices(nvml)
    except Exception as exc:
        log.info("telemetry: cannot list NVML devices (%s); falling back to the device index", exc)
        devices, mig_on = [], False
    for uuid in wanted:
        for found, handle in devices:
            if found == _bare_uuid(uuid):
                return handle
    if mig_on:
        asked = ", ".join(wanted) or "none"
        raise NvmlUnavailable(
            f"MIG is enabled and no GPU or MIG device matches cuda:{cuda_index} (UUIDs tried: {asked}); "
            "set CUDA_VISIBLE_DEVICES to the MIG- UUID of the slice"
        )
    if entry is not None and entry.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(entry))
    if entry is not None and not devices:  # listing failed: let NVML look the UUID up itself
        return nvml.nvmlDeviceGetHandleByUUID(entry)
    return nvml.nvmlDeviceGetHandleByIndex(cuda_index)


def _torch_device_uuid(cuda_index: int) -> str | None:
    """The UUID of torch's cuda:`cuda_index` as torch prints it (no prefix), or None where torch cannot say."""
    if "torch" not in sys.modules:
        return None
    import torch

    try:
        if not torch.cuda.is_available():
            return None
        return str(torch.cuda.get_device_properties(cuda_index).uuid)
    except (AttributeError, RuntimeError, AssertionError):
        return None


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

    ``status`` is "nvml" when GPU figures are read, "nvml; per-process memory n/a (<reason>)"
    when all but the worker's own GPU memory are, else "n/a: <reason>" (once, for run_started).
    `pid` is the process whose GPU memory NVML reports (default: $VQABENCH_HOST_PID, else this
    one; in a container without the host PID namespace NVML lists host pids, so pass that one);
    RSS is always this process's. `source` replaces NVML with any object whose ``read()``
    returns a :class:`Reading` or None, so the aggregation is testable without a GPU.
    """

    def __init__(
        self, device: str, interval: float = 0.2, pid: int | None = None, source: ReadingSource | None = None
    ) -> None:
        if interval <= 0:
            raise ValueError(f"telemetry interval must be positive, got {interval!r}")
        self.device = device
        self.interval = interval
        try:
            self.pid = host_pid() if pid is None else pid
        except ValueError as exc:  # a bad setting must not take the run down: report it, watch this pid
            log.warning("telemetry: %s Using pid %d.", exc, os.getpid())
            self.pid = os.getpid()
        self._cuda_index = _cuda_index(device)
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._window: _Window | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self._hwm_reset = False
        self._latest: tuple[Reading | None, float | None] = (None, None)  # the last sample: reading, RSS
        if source is not None:
            self.source: ReadingSource | None = source
            self.status = (
                _nvml_status(source) if isinstance(source, NvmlSource) else f"custom source {type(source).__name__}"
            )
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
            source = NvmlSource.open(self._cuda_index, self.pid, pynvml)
        except NvmlUnavailable as exc:
            return None, f"n/a: {exc}"
        except Exception as exc:  # NVMLError, NVMLLibraryMismatchError, OSError from the library
            return None, f"n/a: NVML cannot read cuda:{self._cuda_index} ({_describe_error(exc)})"
        return source, _nvml_status(source)

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
            self._latest = (reading, rss)
            if self._window is not None:
                self._window.add(reading, rss)
                self._window.failed += int(failed)

    def latest(self) -> dict[str, float | None]:
        """The last sample as events.Progress's telemetry fields (all None before the first)."""
        with self._lock:
            reading, rss = self._latest
        return {
            "rss_mib": rss,
            "gpu_process_mib": reading.process_mib if reading else None,
            "gpu_device_mib": reading.device_used_mib if reading else None,
            "gpu_util": reading.util_percent if reading else None,
        }

    def begin_epoch(self) -> None:
        """Start the epoch from a clean slate, then open a new window.

        In this order: collect garbage (and trim the heap), wait for queued GPU work, hand the
        caching allocator's free blocks back (so reserved and NVML memory start from what is
        live, not from what eval or the reference pass left cached), reset torch's CUDA peaks
        and the RSS high-water mark.
        """
        release_free_memory()
        if self.uses_cuda:
            import torch

            torch.cuda.synchronize(self._cuda_index)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self._cuda_index)
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
