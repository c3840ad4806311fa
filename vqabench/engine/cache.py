"""Arrays computed once from (inputs, code version) and read many times, kept on disk.

One store for every derived array the engine would otherwise recompute: preprocessed images
(``kind="images"``, uint8 ``[M, 3, S, S]``) and frozen-encoder outputs (``kind="encoder"``,
``[N, Lq, hidden]`` per split, or one row per image plus an int64 row map per split). An entry is
a folder of ``.npy`` files whose rows are read back by position as they are needed
(:class:`Entry`), so resident memory does not grow with the dataset.

* **Key.** :class:`CacheKey` names everything the values depend on (a dict of strings, plus
  the kind and this module's :data:`FORMAT_VERSION`); its hash is the entry's folder name.
* **Atomic.** An entry is written into a temporary sibling folder with plain sequential
  writes (a full disk is an ``OSError``, never the ``SIGBUS`` a memory-mapped write gets),
  its completeness marker last, then renamed into place in one step. A killed writer leaves
  only a ``.tmp-<host>-<pid>`` folder that no reader opens; the next writer in that folder
  removes it once its process is gone (:func:`remove_stale_temporaries`).
* **Checked.** The marker records each array's shape, dtype and byte size; an entry whose
  files do not match it (truncated, replaced) is removed and rebuilt.
* **Fallback.** With no folder (``root=None``) entries live in memory, for callers that
  choose to go on when the folder cannot be written.

numpy has no bfloat16: such arrays are stored as their raw 16 bits (``uint16``), and the
marker says so; :meth:`Entry.rows` returns them as ``torch.bfloat16``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Bump when the on-disk layout changes: old entries are then simply never found.
FORMAT_VERSION = 1
MARKER = "complete.json"
_NUMPY_DTYPES = {"uint8": np.uint8, "int64": np.int64, "float32": np.float32, "bfloat16": np.uint16}
#: A temporary left by a writer on another host (whose process cannot be asked whether it is
#: alive) is removed once nothing in it has changed for this long.
STALE_TEMPORARY_AGE_S = 24 * 60 * 60
_TEMPORARY = ".tmp-"


def _host() -> str:
    """This machine's name as temporaries carry it: no '-', so the one before the pid is unambiguous."""
    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "host"


def temporary_sibling(final: Path) -> Path:
    """Where a writer builds `final` before renaming it into place: unique to this host and process.

    The name says who owns it, so that :func:`remove_stale_temporaries` can tell a live
    writer's temporary from one whose writer was killed.
    """
    return final.with_name(f"{final.name}{_TEMPORARY}{_host()}-{os.getpid()}")


def _process_is_gone(pid: int) -> bool:
    """Whether no process `pid` exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def _last_change(path: Path) -> float:
    """The newest modification time of `path` and, for a folder, of the files in it."""
    times = [path.stat().st_mtime]
    if path.is_dir():
        times += [child.stat().st_mtime for child in path.iterdir()]
    return max(times)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries in `folder` (see :func:`temporary_sibling`) whose writer is gone.

    One from this host is stale when its process no longer exists; one from another host (or
    with no host in its name, as before hosts were named) when nothing in it has changed for
    :data:`STALE_TEMPORARY_AGE_S`. A live writer's temporary on this host is never removed.
    Returns what was removed.
    """
    now = time.time()
    removed: list[Path] = []
    try:
        candidates = [p for p in folder.iterdir() if _TEMPORARY in p.name]
    except OSError:
        return removed
    for path in candidates:
        owner = path.name.partition(_TEMPORARY)[2]
        host, _, pid = owner.rpartition("-")
        try:
            if host == _host() and pid.isdigit():
                stale = _process_is_gone(int(pid))
            else:
                stale = now - _last_change(path) > STALE_TEMPORARY_AGE_S
        except OSError:  # removed meanwhile by another writer
            continue
        if not stale:
            continue
        log.info("removing %s, left by a writer that is gone", path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def publish_file(final: Path, write: Callable[[Path], None]) -> None:
    """Write one file through its own temporary sibling and rename it into place in one step.

    Writers of the same file in several processes (concurrent runs sharing a start) never
    share a temporary; temporaries of killed writers in the folder are removed first.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent)
    tmp = temporary_sibling(final)
    try:
        write(tmp)
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)


class CacheError(OSError):
    """A cache folder that cannot be written (read-only, full disk); the message is one sentence."""

    def __init__(self, folder: Path | None, reason: str):
        self.folder, self.reason = folder, reason
        super().__init__(
            f"the cache folder '{folder}' cannot be written ({reason}); "
            f"free some space or point cache_dir (or $VQABENCH_CACHE) at a writable folder."
        )

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class CacheKey:
    """Everything an entry's values depend on; equal keys mean interchangeable values."""

    kind: str  # "images", "encoder"
    parts: dict[str, str]

    @property
    def digest(self) -> str:
        text = json.dumps([self.kind, FORMAT_VERSION, sorted(self.parts.items())])
        return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class ArraySpec:
    """One array of an entry: its name, shape and dtype name (uint8, int64, float32, bfloat16)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(_NUMPY_DTYPES[self.dtype]).itemsize


@dataclass
class Entry:
    """A complete entry: arrays read from their files by position (or held in memory).

    Rows are read with positioned reads into a fresh buffer, not through a memory map: the
    kernel's page cache still serves repeated reads, but its pages are not mapped into this
    process, so they neither count in its resident set nor have to fit in it. (Pages of a
    memory map that a pass touches stay in the resident set for as long as the map is open:
    with a map, a run's peak RSS grew by about the bytes of every cached 384x384 image it read,
    docs/benchmarks.md section 9.) The files are plain ``.npy``: ``numpy.load(..., mmap_mode="r")`` opens them too.
    """

    key: CacheKey
    path: Path | None  # None: in memory
    specs: dict[str, ArraySpec]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # in-memory entries only
    _files: dict[str, tuple[Any, int]] = field(default_factory=dict, repr=False)  # name -> (file, data offset)
    _opened_in: int = -1  # the pid whose descriptors `_files` holds (reopen after fork)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())

    def rows(self, name: str, rows: torch.Tensor | slice) -> torch.Tensor:
        """Rows of one array as a (copied) tensor in its stored dtype."""
        spec = self.specs[name]
        index = np.arange(*rows.indices(spec.shape[0])) if isinstance(rows, slice) else rows.numpy()
        values = self._read(name, index) if self.path is not None else np.ascontiguousarray(self.arrays[name][index])
        if spec.dtype == "bfloat16":
            return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(values)

    def _read(self, name: str, index: np.ndarray) -> np.ndarray:
        """Rows `index` of file-backed array `name`, one read per run of consecutive rows."""
        spec = self.specs[name]
        out = np.empty((len(index), *spec.shape[1:]), dtype=_NUMPY_DTYPES[spec.dtype])
        if out.size == 0:
            return out
        row_bytes = out.nbytes // len(index)
        buffer = out.reshape(-1).view(np.uint8).data
        fd, offset = self._file(name)
        if index.min() < 0 or index.max() >= spec.shape[0]:
            raise IndexError(f"rows outside 0..{spec.shape[0] - 1} of cache array '{name}'")
        start = 0
        while start < len(index):
            end = start + 1
            while end < len(index) and index[end] == index[end - 1] + 1:
                end += 1
            _read_exactly(fd, buffer[start * row_bytes : end * row_bytes], offset + int(index[start]) * row_bytes)
            start = end
        return out

    def _file(self, name: str) -> tuple[int, int]:
        """(descriptor, offset of the data) of array `name`, opened once per process."""
        assert self.path is not None
        if self._opened_in != os.getpid():
            self._files, self._opened_in = {}, os.getpid()  # a forked child opens its own
        if name not in self._files:
            fh = open(self.path / f"{name}.npy", "rb", buffering=0)  # noqa: SIM115 (closed with the entry)
            _, offset = _read_header(fh)
            self._files[name] = (fh, offset)
        fh, offset = self._files[name]
        return fh.fileno(), offset

    def close(self) -> None:
        """Close this process's files (they also close when the entry is garbage-collected)."""
        if self._opened_in == os.getpid():
            for fh, _ in self._files.values():
                fh.close()
        self._files, self._opened_in = {}, -1

    def __getstate__(self) -> dict[str, Any]:
        """A DataLoader worker opens the files itself; open files are not pickled."""
        state = dict(self.__dict__)
        state["_files"], state["_opened_in"] = {}, -1
        return state


def _read_exactly(fd: int, into: memoryview, offset: int) -> None:
    """Fill `into` from `fd` at `offset`; a file shorter than that is an error, never zeros."""
    done = 0
    while done < len(into):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [into[done:]], offset + done)
        else:  # no preadv on this platform: read, then copy
            chunk = os.pread(fd, len(into) - done, offset + done)
            into[done : done + len(chunk)] = chunk
            n = len(chunk)
        if n == 0:
            raise OSError(f"cache file ended {len(into) - done} bytes early")
        done += n


def _read_header(fh: Any) -> tuple[tuple[int, ...], int]:
    """An .npy file's shape and the offset where its data starts."""
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, _ = read(fh)
    return tuple(shape), fh.tell()


class EntryWriter:
    """Fills the arrays of a new entry row block by row block, in order; `commit` publishes it."""

    def __init__(self, store: ArrayStore, key: CacheKey, specs: list[ArraySpec]):
        self.key, self.store = key, store
        self.specs = {s.name: s for s in specs}
        self.filled = dict.fromkeys(self.specs, 0)
        self._files: dict[str, Any] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.tmp: Path | None = None
        if store.root is None:
            self.arrays = {s.name: np.empty(s.shape, dtype=_NUMPY_DTYPES[s.dtype]) for s in specs}
            return
        folder = store.root / key.kind
        try:
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(folder)
            self.tmp = temporary_sibling(folder / key.digest)
            shutil.rmtree(self.tmp, ignore_errors=True)  # left by an earlier process with this pid
            self.tmp.mkdir()
            for s in specs:
                fh = open(self.tmp / f"{s.name}.npy", "wb")  # noqa: SIM115 (closed in commit/abort)
                self._files[s.name] = fh
                np.lib.format.write_array_header_1_0(
                    fh,
                    {
                        "descr": np.lib.format.dtype_to_descr(np.dtype(_NUMPY_DTYPES[s.dtype])),
                        "fortran_order": False,
                        "shape": s.shape,
                    },
                )
                if hasattr(os, "posix_fallocate") and s.nbytes:  # a full disk fails here, before any work
                    os.posix_fallocate(fh.fileno(), fh.tell(), s.nbytes)
        except OSError as exc:
            self.abort()
            raise store.write_error(exc) from exc

    def write(self, name: str, values: torch.Tensor | np.ndarray) -> None:
        """Append the next rows of array `name`."""
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu()
            if values.dtype == torch.bfloat16:
                values = values.view(torch.int16)  # the raw 16 bits; numpy has no bfloat16
            values = values.numpy()
        spec = self.specs[name]
        stored = _NUMPY_DTYPES[spec.dtype]
        values = np.ascontiguousarray(values.view(stored) if values.dtype == np.int16 else values, dtype=stored)
        lo, hi = self.filled[name], self.filled[name] + values.shape[0]
        if hi > spec.shape[0] or values.shape[1:] != spec.shape[1:]:
            raise ValueError(f"rows {lo}:{hi} of shape {values.shape[1:]} do not fit array '{name}' {spec.shape}")
        if self.tmp is None:
            self.arrays[name][lo:hi] = values
        else:
            try:
                self._files[name].write(values.tobytes())
            except OSError as exc:
                self.abort()
                raise self.store.write_error(exc) from exc
        self.filled[name] = hi

    def commit(self) -> Entry:
        """Check every array is full, write the marker last, and publish the entry atomically."""
        short = [n for n, s in self.specs.items() if self.filled[n] != s.shape[0]]
        if short:
            self.abort()
            raise ValueError(f"cache entry {self.key.digest}: array(s) {', '.join(short)} not filled")
        if self.tmp is None:
            return Entry(self.key, None, self.specs, self.arrays)
        target = self.tmp.parent / self.key.digest
        try:
            for fh in self._files.values():
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
            marker = {
                "kind": self.key.kind,
                "parts": self.key.parts,
                "format": FORMAT_VERSION,
                "arrays": {
                    n: {"shape": list(s.shape), "dtype": s.dtype, "bytes": s.nbytes} for n, s in self.specs.items()
                },
            }
            (self.tmp / MARKER).write_text(json.dumps(marker, indent=1))
            if target.exists():  # another process published this key first: keep theirs
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:
                try:
                    self.tmp.rename(target)
                except OSError:
                    if not target.exists():
                        raise
                    shutil.rmtree(self.tmp, ignore_errors=True)
        except OSError as exc:
            self.abort()
            raise self.store.write_error(exc) from exc
        entry = self.store.open(self.key)
        assert entry is not None, f"cache entry {target} was published but does not open"
        return entry

    def abort(self) -> None:
        """Close and remove the temporary folder; nothing of this entry is left to be trusted."""
        for fh in self._files.values():
            with contextlib.suppress(OSError):
                fh.close()
        self._files.clear()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


class ArrayStore:
    """Entries under `root` (None: in memory only), one folder per kind, one sub-folder per key."""

    def __init__(self, root: Path | None):
        self.root = root

    def folder(self, kind: str) -> Path | None:
        return self.root / kind if self.root is not None else None

    def write_error(self, exc: OSError) -> CacheError:
        return CacheError(self.root, exc.strerror or type(exc).__name__)

    def open(self, key: CacheKey) -> Entry | None:
        """The complete entry for `key`, or None; an entry that fails its marker's checks is removed."""
        if self.root is None:
            return None
        path = self.root / key.kind / key.digest
        if not path.is_dir():
            return None
        problem = _check(path, key)
        if problem is None:
            marker = json.loads((path / MARKER).read_text())
            specs = {n: ArraySpec(n, tuple(a["shape"]), a["dtype"]) for n, a in marker["arrays"].items()}
            return Entry(key, path, specs)
        log.warning("cache entry %s is %s; removing it to rebuild", path, problem)
        shutil.rmtree(path, ignore_errors=True)
        return None

    def create(self, key: CacheKey, specs: list[ArraySpec]) -> EntryWriter:
        """A writer for a new entry; raises CacheError when the folder cannot be written."""
        return EntryWriter(self, key, specs)


def _check(path: Path, key: CacheKey) -> str | None:
    """None if the entry at `path` is complete and matches `key`, else what is wrong with it."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return "incomplete (no readable completeness marker)"
    if marker.get("parts") != key.parts or marker.get("format") != FORMAT_VERSION:
        return "for another key"
    for name, info in marker.get("arrays", {}).items():
        file = path / f"{name}.npy"
        try:
            with file.open("rb") as fh:
                shape, header = _read_header(fh)
            size = file.stat().st_size
        except (OSError, ValueError):
            return f"damaged ({file.name} unreadable)"
        if list(shape) != info["shape"] or size != header + info["bytes"]:
            return f"damaged ({file.name} has {size - header} bytes of data, the marker says {info['bytes']})"
    return None
