"""The embedded model's base checkpoint: the small BLIP trained on easy-VQA's base split.

Fine-tuning in the paper starts from blip-vqa-base, a model that already answers. The
embedded default gets the same footing from a checkpoint the project makes itself: every
part of the small model trained with SFT on the base split (images disjoint from the
fine-tuning, eval and test splits). Deterministic for a data seed; cached on disk keyed by
the shipped config, vocabulary, seed and recipe; rebuilt if missing.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from vqabench import objectives
from vqabench.engine import model as blip
from vqabench.engine.data.batching import encode
from vqabench.engine.data.records import DataSplits

log = logging.getLogger(__name__)

RECIPE = {"version": 1, "lr": 1e-3, "batch_size": 64, "weight_decay": 0.01}


def base_key(seed: int, samples: int, data_fingerprint: str) -> str:
    text = f"{blip.embedded_fingerprint()}|{seed}|{samples}|{data_fingerprint}|{sorted(RECIPE.items())}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_base_checkpoint(data: DataSplits, *, seed: int, samples: int, cache_dir: Path,
                           device: torch.device,
                           progress: Callable[[int, int, float], None] | None = None) -> tuple[Path, bool]:
    """Path of the cached base checkpoint, building it first if needed; (path, was_built)."""
    base_pairs_fp = hashlib.sha256("".join(f"{p.image_id}|{p.question}|{p.chosen}\n" for p in data.base)
                                   .encode()).hexdigest()[:16]
    folder = cache_dir / "base" / base_key(seed, samples, base_pairs_fp)
    if (folder / blip.META_FILE).exists():
        return folder, False
    if not data.base:
        raise ValueError("the embedded model needs the base split to build its base checkpoint")
    log.info("building the embedded base checkpoint in %s (%d samples)", folder, samples)
    loaded = blip.build_embedded(seed)
    model = loaded.model.to(device)
    encoded = encode(DataSplits(train=data.base, eval=[], test=[], images=data.images), loaded, 32, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    generator = torch.Generator().manual_seed(seed)
    bs = RECIPE["batch_size"]
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
        q = blip.encode_questions(model, batch.pixel_values, batch.question_ids, batch.question_mask)
        c, c_len = blip.answer_logps(model.text_decoder, q, batch.question_mask, *batch.chosen)
        loss = objectives.sft_loss(c, c_len).mean()
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
        loaded.source = f"embedded small BLIP, base checkpoint ({samples} easy-VQA base samples, seed {seed})"
        blip.save_checkpoint(loaded, tmp)
        if folder.exists():  # another process finished first; keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder, True
