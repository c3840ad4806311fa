"""The on-disk array cache: atomic entries, a completeness marker, positioned reads, clear errors."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vqabench.engine import cache
from vqabench.engine.cache import ArraySpec, ArrayStore, CacheError, CacheKey

KEY = CacheKey("images", {"data": "abc", "size": "4"})
SPECS = [ArraySpec("pixels", (10, 3, 4, 4), "uint8"), ArraySpec("codes", (10, 2), "bfloat16")]


def fill(store: ArrayStore, key: CacheKey = KEY):
    writer = store.create(key, SPECS)
    pixels = torch.arange(10 * 48, dtype=torch.int64).remainder(251).to(torch.uint8).view(10, 3, 4, 4)
    codes = torch.linspace(-3, 3, 20).view(10, 2).to(torch.bfloat16)
    for lo in (0, 4, 8):
        writer.write("pixels", pixels[lo : lo + 4])
        writer.write("codes", codes[lo : lo + 4])
    return writer.commit(), pixels, codes


def test_an_entry_is_written_once_and_read_back_by_position(tmp_path):
    store = ArrayStore(tmp_path)
    entry, pixels, codes = fill(store)
    again = store.open(KEY)
    assert again is not None and again.path == entry.path
    on_disk = np.load(entry.path / "pixels.npy", mmap_mode="r")  # plain .npy files: numpy maps them too
    assert np.array_equal(on_disk, pixels.numpy())
    rows = torch.tensor([7, 0, 3])
    assert torch.equal(again.rows("pixels", rows), pixels[rows])
    runs = torch.tensor([2, 3, 4, 9, 5, 6, 6])  # consecutive runs are read in one go; repeats too
    assert torch.equal(again.rows("pixels", runs), pixels[runs])
    assert torch.equal(again.rows("codes", slice(3, 8)), codes[3:8])
    assert again.rows("pixels", torch.tensor([], dtype=torch.long)).shape == (0, 3, 4, 4)
    with pytest.raises(IndexError):
        again.rows("pixels", torch.tensor([10]))
    assert torch.equal(again.rows("codes", rows), codes[rows]) and again.rows("codes", rows).dtype == torch.bfloat16
    assert again.nbytes == 10 * 48 + 10 * 2 * 2
    assert [p.name for p in (tmp_path / "images").iterdir()] == [KEY.digest]  # no temporary left


def test_a_key_that_differs_in_any_part_misses():
    other = CacheKey("images", {"data": "abc", "size": "8"})
    assert other.digest != KEY.digest
    assert CacheKey("encoder", KEY.parts).digest != KEY.digest


def test_a_killed_writer_leaves_nothing_that_is_trusted(tmp_path):
    store = ArrayStore(tmp_path)
    writer = store.create(KEY, SPECS)
    writer.write("pixels", torch.zeros(4, 3, 4, 4, dtype=torch.uint8))
    # the process dies here: no commit, no marker, the temporary folder stays behind
    assert store.open(KEY) is None
    assert all(".tmp-" in p.name for p in (tmp_path / "images").iterdir())
    entry, pixels, _ = fill(store)  # the next writer of the key replaces the leftover
    assert torch.equal(entry.rows("pixels", slice(0, 10)), pixels)


@pytest.mark.parametrize("damage", ["truncate", "no_marker", "marker_garbage"])
def test_a_damaged_entry_is_detected_by_its_marker_and_rebuilt(tmp_path, damage):
    store = ArrayStore(tmp_path)
    entry, pixels, _ = fill(store)
    assert entry.path is not None
    if damage == "truncate":
        data = (entry.path / "pixels.npy").read_bytes()
        (entry.path / "pixels.npy").write_bytes(data[:-7])
    elif damage == "no_marker":
        (entry.path / "complete.json").unlink()
    else:
        (entry.path / "complete.json").write_text("{not json")
    assert ArrayStore(tmp_path).open(KEY) is None
    assert not entry.path.exists()  # removed, so the next run rebuilds it
    rebuilt, _, _ = fill(store)
    assert torch.equal(rebuilt.rows("pixels", slice(0, 10)), pixels)


def test_a_writer_that_does_not_fill_every_row_cannot_publish(tmp_path):
    store = ArrayStore(tmp_path)
    writer = store.create(KEY, SPECS)
    writer.write("pixels", torch.zeros(10, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="codes"):
        writer.commit()
    assert store.open(KEY) is None


def test_a_folder_that_cannot_be_written_gives_one_sentence_naming_it(tmp_path):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    with pytest.raises(CacheError) as info:
        ArrayStore(blocked).create(KEY, SPECS)
    message = str(info.value)
    assert str(blocked) in message and message.count(". ") == 0 and message.endswith(".")


def test_a_full_disk_gives_one_sentence_and_leaves_no_partial_entry(tmp_path):
    """A real write failure: the file size limit (RLIMIT_FSIZE) makes the kernel refuse the write."""
    script = textwrap.dedent(
        f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from pathlib import Path
        from vqabench.engine.cache import ArraySpec, ArrayStore, CacheError, CacheKey
        try:
            ArrayStore(Path({str(tmp_path)!r})).create(
                CacheKey("images", {{"n": "1"}}), [ArraySpec("pixels", (100, 3, 64, 64), "uint8")]
            )
        except CacheError as exc:
            print(exc)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.strip()
    assert message.startswith(f"the cache folder '{tmp_path}' cannot be written (File too large)"), message
    assert list((tmp_path / "images").iterdir()) == []


def test_without_a_folder_entries_live_in_memory():
    entry, pixels, _ = fill(ArrayStore(None))
    assert entry.path is None
    assert torch.equal(entry.rows("pixels", torch.tensor([9, 1])), pixels[[9, 1]])
    assert ArrayStore(None).open(KEY) is None


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_reading_every_row_does_not_keep_the_file_in_this_process_resident_set(tmp_path):
    # 96 MiB of rows, read back whole in batches: a memory map would leave every page it
    # touched in the resident set (RssFile); positioned reads leave the page cache outside it.
    spec = ArraySpec("pixels", (384, 3, 256, 256), "uint8")
    store = ArrayStore(tmp_path)
    writer = store.create(KEY, [spec])
    block = torch.arange(32 * 3 * 256 * 256, dtype=torch.int64).remainder(253).to(torch.uint8).view(32, 3, 256, 256)
    for _ in range(12):
        writer.write("pixels", block)
    entry = writer.commit()
    before = _rss_mib()
    for lo in range(0, 384, 16):
        batch = entry.rows("pixels", torch.arange(lo, lo + 16))
        assert torch.equal(batch, block[lo % 32 : lo % 32 + 16])
        del batch
    assert _rss_mib() - before < 24  # 96 MiB were read


def test_a_file_cut_short_after_it_was_opened_is_an_error_not_zeros(tmp_path):
    store = ArrayStore(tmp_path)
    entry, _, _ = fill(store)
    assert entry.path is not None
    entry.rows("pixels", torch.tensor([0]))  # opened
    with open(entry.path / "pixels.npy", "r+b") as fh:
        fh.truncate(fh.seek(0, 2) - 48)
    with pytest.raises(OSError, match="ended"):
        entry.rows("pixels", torch.tensor([9]))


OTHER_KEY = CacheKey("images", {"data": "other", "size": "4"})
WRITER_THAT_STOPS = """
import sys, time
from pathlib import Path
from vqabench.engine.cache import ArraySpec, ArrayStore, CacheKey
writer = ArrayStore(Path(sys.argv[1])).create(
    CacheKey("images", {"data": "abc", "size": "4"}), [ArraySpec("pixels", (64, 3, 64, 64), "uint8")]
)
print(writer.tmp, flush=True)
time.sleep(120)
"""


def test_a_killed_writers_temporary_is_removed_by_the_next_writer_and_a_live_ones_is_kept(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER_THAT_STOPS, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        left = Path(proc.stdout.readline().strip())
        assert left.is_dir() and left.name.endswith(f"-{proc.pid}") and cache._host() in left.name
        assert (left / "pixels.npy").stat().st_size >= 64 * 3 * 64 * 64  # reserved up front
        fill(ArrayStore(tmp_path), OTHER_KEY)  # the writer is alive: its temporary stays
        assert left.is_dir()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    fill(ArrayStore(tmp_path), OTHER_KEY)  # any next writer in the folder removes what is left
    assert not left.exists()
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [OTHER_KEY.digest]


def _temporary(folder: Path, host: str, pid: int, age_s: float = 0.0) -> Path:
    path = folder / f"{KEY.digest}.tmp-{host}-{pid}"
    path.mkdir(parents=True)
    (path / "pixels.npy").write_bytes(b"x")
    then = time.time() - age_s
    for p in (path / "pixels.npy", path):
        os.utime(p, (then, then))
    return path


def test_temporaries_of_live_writers_on_this_host_are_kept_whatever_their_age(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = _temporary(tmp_path, cache._host(), os.getpid(), age_s=3 * cache.STALE_TEMPORARY_AGE_S)
        theirs = _temporary(tmp_path, cache._host(), sleeper.pid, age_s=3 * cache.STALE_TEMPORARY_AGE_S)
        assert cache.remove_stale_temporaries(tmp_path) == []
        assert mine.is_dir() and theirs.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)
    assert cache.remove_stale_temporaries(tmp_path) == [theirs]  # gone now (the pid was reaped)


def test_temporaries_from_another_host_are_removed_only_once_untouched_for_the_stated_age(tmp_path):
    day = cache.STALE_TEMPORARY_AGE_S
    young = _temporary(tmp_path / "a", "elsewhere.example", os.getpid(), age_s=day - 600)
    old = _temporary(tmp_path / "b", "elsewhere.example", os.getpid(), age_s=day + 600)
    unnamed = _temporary(tmp_path / "c", "", 123, age_s=day + 600)  # the name before hosts were in it
    assert unnamed.name.endswith(".tmp--123")
    (unnamed.parent / f"{KEY.digest}.tmp-123").mkdir()
    assert cache.remove_stale_temporaries(tmp_path / "a") == []
    assert young.is_dir()
    assert cache.remove_stale_temporaries(tmp_path / "b") == [old]
    assert cache.remove_stale_temporaries(tmp_path / "c") == [unnamed]  # the fresh one stays
    assert (unnamed.parent / f"{KEY.digest}.tmp-123").is_dir()


def _publish_after_both_wrote(final: Path, payload: bytes, barrier) -> None:
    def write(tmp: Path) -> None:
        tmp.write_bytes(payload)
        barrier.wait(timeout=30)  # both writers have written their temporary before either renames

    cache.publish_file(final, write)


def test_two_processes_publishing_one_file_never_share_a_temporary(tmp_path):
    """Concurrent runs sharing a start write the same reference table at once."""
    final = tmp_path / "reference" / "table.pt"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    payloads = [bytes([1]) * 300_000, bytes([2]) * 200_000]
    writers = [context.Process(target=_publish_after_both_wrote, args=(final, p, barrier)) for p in payloads]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=60)
    assert [w.exitcode for w in writers] == [0, 0]
    assert final.read_bytes() in payloads  # one writer's whole file, never a mix
    assert [p.name for p in final.parent.iterdir()] == ["table.pt"]


def test_publishing_a_file_removes_the_temporary_of_a_killed_writer(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    final = tmp_path / "table.pt"
    left = tmp_path / f"table.pt.tmp-{cache._host()}-{dead.pid}"
    left.write_bytes(b"half a table")
    cache.publish_file(final, lambda tmp: tmp.write_bytes(b"table"))
    assert [p.name for p in tmp_path.iterdir()] == ["table.pt"] and final.read_bytes() == b"table"
