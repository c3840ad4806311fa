"""The embedded model's base checkpoint: the small embedded model trained on easy-VQA's base split.

Fine-tuning in the study starts from a pretrained model, one that already answers. The
embedded default gets the same footing from a checkpoint the project makes itself: every
part of the small model trained with SFT on the base split (images disjoint from the
fine-tuning, eval and test splits). Deterministic for a data seed; cached on disk keyed by
the shipped config, vocabulary, seed, sample count and recipe; rebuilt if missing.

It is built in a child process (``python -m vqabench.engine.base_checkpoint``) that reports
progress with the worker's event protocol, so the memory it used is given back before the
run it serves starts measuring. It is always built on the CPU, whatever device the run uses:
CPU kernels give the same bytes on every machine, so the cache key (which names no device)
holds. A failure of the child is re-raised with its kind (``memory``, ``data``, ...) and its
one-sentence message.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vqabench import events as ev
from vqabench import objectives
from vqabench.engine.data import easyvqa
from vqabench.engine.data.batching import encode
from vqabench.engine.data.records import DataSplits
from vqabench.event_stream import EventWriter, protocol_stream
from vqabench.models import registry
from vqabench.models.checkpoints import build_variant, save_checkpoint
from vqabench.models.family import META_FILE
from vqabench.spec import DatasetSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseRecipe:
    """How the base checkpoint is trained; every field is part of its cache key."""

    version: int = 3  # 3: trained with the cross-attention mask honoured
    data: str = "easy-VQA base split"
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.01

    def key(self) -> str:
        return str(sorted(asdict(self).items()))


RECIPE = BaseRecipe()
#: The built-in variant the base checkpoint starts from (random weights of the embedded model).
EMBEDDED_INIT = "embedded-init"


def _embedded_fingerprint() -> str:
    found = registry.variant(EMBEDDED_INIT)
    assert found is not None and found.fingerprint is not None
    return found.fingerprint()


BASE_MESSAGE = "building the embedded base checkpoint (once, then cached)"


def base_folder(cache_dir: Path, seed: int, samples: int) -> Path:
    text = f"{_embedded_fingerprint()}|{seed}|{samples}|{RECIPE.key()}"
    return cache_dir / "base" / hashlib.sha256(text.encode()).hexdigest()[:16]


class BaseCheckpointError(RuntimeError):
    """Building the base checkpoint failed; carries the child's error kind for the worker's report."""

    def __init__(self, error_kind: str, message: str) -> None:
        super().__init__(message)
        self.error_kind = error_kind


def build_base_checkpoint(
    folder: Path,
    *,
    seed: int,
    samples: int,
    progress: Callable[[int, int, float], None] | None = None,
) -> None:
    """Train the embedded model on easy-VQA's base split (on the CPU) and save it to `folder` atomically."""
    device = torch.device("cpu")
    data = easyvqa.load_splits(DatasetSpec(seed=seed), seed=seed, limit=1, with_base=True)
    loaded = build_variant(EMBEDDED_INIT, seed)
    model = loaded.model.to(device)
    encoded = encode(DataSplits(train=data.base, eval=[], test=[], images=data.images), loaded, 32, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE.lr, weight_decay=RECIPE.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    bs = RECIPE.batch_size
    steps = max(1, samples // bs)
    n = len(encoded.splits["train"])
    order = torch.empty(0, dtype=torch.long)
    model.train()
    running = 0.0
    for step in range(steps):
        if len(order) < bs:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        rows, order = order[:bs], order[bs:]
        batch = encoded.batch("train", rows, device)
        q = batch.features_of(loaded.family, model)
        scores = loaded.family.answer_scores(model, q, batch.prompt, batch.chosen)
        loss = objectives.sft_loss(scores.logps, scores.lengths).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        running = 0.9 * running + 0.1 * value if step else value
        if progress is not None and (step % 10 == 0 or step + 1 == steps):
            progress(step + 1, steps, running)
    model.eval()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        loaded.model = model.cpu()
        loaded.source = (
            f"embedded small {loaded.family.name}, base checkpoint ({samples} easy-VQA base samples, seed {seed})"
        )
        save_checkpoint(loaded, tmp)
        if folder.exists():  # another process finished first; keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_base_checkpoint(*, seed: int, samples: int, cache_dir: Path, emit: Callable[[ev.Event], None]) -> Path:
    """The cached base checkpoint's folder, built first in a child process if missing."""
    folder = base_folder(cache_dir, seed, samples)
    if (folder / META_FILE).exists():
        return folder
    log.info("building the embedded base checkpoint in %s (%d samples)", folder, samples)
    cmd = [
        sys.executable,
        "-m",
        "vqabench.engine.base_checkpoint",
        str(folder),
        "--seed",
        str(seed),
        "--samples",
        str(samples),
    ]
    failure: ev.RunFailed | None = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        for line in child.stdout:
            try:
                event = ev.parse_event(line)
            except ev.EventError:
                log.warning("base checkpoint builder wrote a non-event line: %s", line.rstrip())
                continue
            if isinstance(event, ev.RunFailed):  # the run's own failure is reported once, by the worker
                failure = event
            else:
                emit(event)
    if failure is not None:
        raise BaseCheckpointError(
            failure.error_kind, f"building the embedded base checkpoint failed: {failure.message.rstrip('.')}."
        )
    if child.returncode is not None and child.returncode < 0:
        signal_number = -child.returncode
        kind = "memory" if signal_number == 9 else "internal"
        raise BaseCheckpointError(
            kind,
            f"the embedded base checkpoint build was killed by signal {signal_number}"
            f"{' (most likely the out-of-memory killer)' if signal_number == 9 else ''}; free host memory and retry.",
        )
    if child.returncode != 0 or not (folder / META_FILE).exists():
        raise RuntimeError(
            f"building the embedded base checkpoint failed (exit code {child.returncode}); its log is above on stderr."
        )
    return folder


def main(argv: list[str] | None = None) -> int:
    import traceback

    from vqabench.engine.errors import classify

    emit = EventWriter(protocol_stream())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    p = argparse.ArgumentParser(description="Build the embedded base checkpoint (used by the worker).")
    p.add_argument("folder", type=Path)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--samples", type=int, required=True)
    args = p.parse_args(argv)

    def progress(step: int, steps: int, loss: float) -> None:
        emit(ev.Progress(phase="base", epoch=0, step=step, steps=steps, running_loss=loss, message=BASE_MESSAGE))

    try:
        build_base_checkpoint(args.folder, seed=args.seed, samples=args.samples, progress=progress)
    except BaseException as exc:
        kind, message = classify(exc)
        if kind == "memory":
            message = f"the host ran out of memory (batch {RECIPE.batch_size} on the CPU); free memory and retry."
        log.error("%s\n%s", message, traceback.format_exc())
        emit(ev.RunFailed(error_kind=kind, message=message))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
