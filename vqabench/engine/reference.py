"""DPO-style reference models: a frozen copy, or log-probs precomputed once and cached.

* ``copy`` keeps a frozen copy of only the trainable part (the answer decoder when the
  encoders are frozen). The frozen encoders and their output are shared with the policy,
  so the reference costs one extra decoder pass and no second vision pass.
* ``precompute`` scores every train and eval pair once before training with the starting
  checkpoint (which *is* the reference), stores the log-probs on disk keyed by checkpoint
  and data hashes, and keeps no reference weights resident while training.

Both run the reference in eval mode (no dropout), so they give the same numbers.
KTO's KL term pairs question i with the chosen answer of row (i+1) mod N of its split: a
fixed "mismatched" pairing that can be precomputed too.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vqabench.engine import model as blip
from vqabench.engine.data.batching import Batch, EncodedData
from vqabench.engine.distributed import SINGLE, Ranks
from vqabench.engine.telemetry import module_bytes

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int], None]


def mismatched_rows(split_rows: torch.Tensor, split_size: int) -> torch.Tensor:
    """Rows whose chosen answer is paired with each row's question for KTO's KL estimate."""
    return (split_rows + 1) % split_size


def mismatched_answers(encoded: EncodedData, split: str, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    s = encoded.splits[split]
    rows = mismatched_rows(batch.rows, len(s))
    ids, mask = s.chosen_ids[rows], s.chosen_mask[rows]
    width = max(int(mask.sum(1).max()), 1)
    device = batch.question_ids.device
    return ids[:, :width].to(device), mask[:, :width].to(device)


@dataclass
class ReferenceLogps:
    chosen: torch.Tensor
    rejected: torch.Tensor
    mismatched: torch.Tensor | None = None


class CopyReference:
    """A frozen copy of the trainable part, run beside the policy on the same encodings."""

    strategy = "copy"

    def __init__(self, loaded: blip.LoadedModel, train: str):
        self.train = train
        self.part = copy.deepcopy(blip.trainable_part(loaded.model, train)).eval()
        for p in self.part.parameters():
            p.requires_grad_(False)
        self.pad_id = loaded.pad_token_id

    @property
    def resident_bytes(self) -> int:
        return module_bytes(self.part)

    @torch.no_grad()
    def logps(
        self,
        encoded: EncodedData,
        split: str,
        batch: Batch,
        question_embeds: torch.Tensor,
        with_mismatched: bool = False,
    ) -> ReferenceLogps:
        if self.train == "decoder":
            decoder, q = self.part, question_embeds.detach()
        else:  # a full copy: it has its own encoders (and no encoder cache: they train)
            decoder = self.part.get_submodule("text_decoder")
            q = batch.encodings(self.part)
        c, r, _, _ = blip.pair_logps(decoder, q, batch.question_mask, batch.chosen, batch.rejected, self.pad_id)
        mm = None
        if with_mismatched:
            mm, _ = blip.answer_logps(decoder, q, batch.question_mask, *mismatched_answers(encoded, split, batch))
        return ReferenceLogps(c, r, mm)


class PrecomputedReference:
    """Reference log-probs for every pair, computed once and kept as small tensors."""

    strategy = "precompute"
    resident_bytes = 0  # no reference weights stay resident while training

    def __init__(self, table: dict[str, dict[str, torch.Tensor]], path: Path | None, seconds: float, from_cache: bool):
        self.table = table
        self.path = path
        self.seconds = seconds
        self.from_cache = from_cache

    def logps(
        self,
        encoded: EncodedData,
        split: str,
        batch: Batch,
        question_embeds: torch.Tensor,
        with_mismatched: bool = False,
    ) -> ReferenceLogps:
        t = self.table[split]
        device = question_embeds.device
        rows = batch.rows
        mm = t["mismatched"][rows].to(device) if with_mismatched else None
        return ReferenceLogps(t["chosen"][rows].to(device), t["rejected"][rows].to(device), mm)

    @classmethod
    def build(
        cls,
        loaded: blip.LoadedModel,
        encoded: EncodedData,
        *,
        batch_size: int,
        device: torch.device,
        cache_dir: Path | None,
        checkpoint_key: str,
        data_key: str,
        progress: ProgressFn | None = None,
        ranks: Ranks = SINGLE,
    ) -> PrecomputedReference:
        """Load the cached table for this checkpoint and data, or score every pair once.

        On several processes each rank scores a slice of every split, the slices are gathered,
        and rank 0 alone writes the cache.
        """
        import time

        key = hashlib.sha256(
            f"{checkpoint_key}|{data_key}|{encoded.splits['train'].chosen_ids.shape}|"
            f"{len(encoded.splits['eval'])}".encode()
        ).hexdigest()[:24]
        path = cache_dir / "reference" / f"{key}.pt" if cache_dir is not None else None
        if path is not None and ranks.all(path.exists(), device):
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                log.info("reference log-probs loaded from %s", path)
                return cls(cached, path, 0.0, True)
            except (OSError, RuntimeError) as exc:
                log.warning("ignoring unreadable reference cache %s: %s", path, exc)
        start = time.perf_counter()
        model = loaded.model
        was_training = model.training
        model.eval()
        table: dict[str, dict[str, torch.Tensor]] = {}
        total = sum(-(-len(ranks.shard(len(encoded.splits[s]))) // batch_size) for s in ("train", "eval"))
        done = 0
        with torch.no_grad():
            for split in ("train", "eval"):
                shard = ranks.shard(len(encoded.splits[split]))
                parts: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": [], "mismatched": []}
                for name in parts:
                    parts[name].append(torch.zeros(0))
                blocks = [
                    torch.arange(lo, min(lo + batch_size, shard.stop))
                    for lo in range(shard.start, shard.stop, batch_size)
                ]
                for batch in encoded.batches(split, blocks, device):
                    q = batch.encodings(model)
                    c, r, _, _ = blip.pair_logps(
                        model.text_decoder, q, batch.question_mask, batch.chosen, batch.rejected, loaded.pad_token_id
                    )
                    mm, _ = blip.answer_logps(
                        model.text_decoder, q, batch.question_mask, *mismatched_answers(encoded, split, batch)
                    )
                    for name, value in (("chosen", c), ("rejected", r), ("mismatched", mm)):
                        parts[name].append(value.float().cpu())
                    done += 1
                    if progress is not None:
                        progress(done, total)
                table[split] = {k: ranks.gather_cat(torch.cat(v)) for k, v in parts.items()}
        model.train(was_training)
        if path is not None and ranks.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(table, tmp)
            tmp.replace(path)
        return cls(table, path, time.perf_counter() - start, False)
