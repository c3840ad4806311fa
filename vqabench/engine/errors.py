"""What kind of failure stopped a run, and the one sentence that says so (the worker's ``run_failed``)."""

from __future__ import annotations


class NumericsError(RuntimeError):
    """A loss that is not finite; the message names the epoch and step."""


def classify(exc: BaseException) -> tuple[str, str]:
    """(error kind, one-sentence message) for a failure."""
    from vqabench.engine.cache import CacheError
    from vqabench.engine.data.records import DataError
    from vqabench.engine.out_of_memory import OutOfMemory, out_of_memory_sentence
    from vqabench.judges import JudgeError
    from vqabench.models.family import ModelError
    from vqabench.spec import SpecError

    text = str(exc).strip() or type(exc).__name__
    for cls, kind in (
        (SpecError, "config"),
        (CacheError, "disk"),
        (DataError, "data"),
        (ModelError, "model"),
        (NumericsError, "numerics"),
        (JudgeError, "judge"),
        (OutOfMemory, "memory"),
    ):
        if isinstance(exc, cls):
            return kind, text
    error_kind = getattr(exc, "error_kind", None)  # a child's failure (the base checkpoint build)
    if isinstance(error_kind, str):
        return error_kind, text
    if type(exc).__name__ in ("DistBackendError", "DistNetworkError") or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    ):
        return "distributed", f"another process of this run stopped ({text.splitlines()[0]})."
    lowered = text.lower()
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in lowered or "can't allocate memory" in lowered:
        return "memory", out_of_memory_sentence(exc, "running", None)
    if isinstance(exc, MemoryError):
        return "memory", "the host ran out of memory; lower the preset key 'batch_size' or 'limit', or free memory."
    if isinstance(exc, KeyboardInterrupt):
        return "cancelled", "the run was interrupted."
    return "internal", f"internal error {type(exc).__name__}: {text.splitlines()[0]}"
