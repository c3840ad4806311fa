"""Out-of-memory failures as one sentence: what was being allocated, the batch size, the key to lower.

torch raises ``torch.OutOfMemoryError`` with several sentences of allocator detail. The worker
reports ``error_kind = "memory"`` with :class:`OutOfMemory`'s message instead; the detail stays
in the traceback on stderr. Documented in ``docs/telemetry.md``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_TRIED = re.compile(r"Tried to allocate ([0-9.]+ [KMGT]?i?B)")


class OutOfMemory(RuntimeError):
    """The device (or the host) ran out of memory; the message is one sentence for the user."""


def out_of_memory_sentence(exc: BaseException, activity: str, batch_size: int | None) -> str:
    """One sentence: what ran out while doing `activity`, how much was asked for, and what to lower."""
    text = str(exc)
    tried = _TRIED.search(text)
    amount = f"allocating {tried.group(1)} " if tried else ""
    where = "CUDA" if "CUDA" in text or isinstance(exc, torch.OutOfMemoryError) else "the device"
    if batch_size is None:
        return f"{where} ran out of memory {amount}while {activity}; lower the preset key 'batch_size' or free the GPU."
    return (
        f"{where} ran out of memory {amount}while {activity} with batch_size {batch_size}; "
        f"lower the preset key 'batch_size' (now {batch_size}) or free the GPU."
    )


@contextmanager
def explain_out_of_memory(activity: str, batch_size: int) -> Iterator[None]:
    """Turn a torch.OutOfMemoryError raised inside into :class:`OutOfMemory` naming `activity`."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise OutOfMemory(out_of_memory_sentence(exc, activity, batch_size)) from exc
