"""DPO-style reference models: a frozen copy, or log-probs precomputed once and cached.

* ``copy`` keeps a frozen copy of only the trainable part (an answer decoder, a causal
  VLM's language model). The frozen part's weights and its output (the features) are
  shared with the policy, so the reference costs one extra pass of the trainable part and
  no second vision pass.
* ``precompute`` scores every train and eval pair once before training with the starting
  checkpoint (which *is* the reference), under the run's autocast like every other forward
  pass, stores the log-probs on disk keyed by everything that changes them
  (:func:`reference_cache_key`), and keeps no reference weights resident while training.
* ``adapter`` (``train = "lora"``) is the policy itself with its LoRA adapters disabled
  (peft's ``disable_adapter``): the frozen base *is* the starting model, so it costs one
  extra pass of the language model and no resident bytes.

All run the reference in eval mode (no dropout, LoRA's included), so they give the same numbers.
KTO's KL term pairs each question with the chosen answer of another image's row, from a
seeded permutation within fixed blocks of the split (:func:`mismatched_rows`): a fixed
"mismatched" pairing that can be precomputed too.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqabench.engine.cache import publish_file
from vqabench.engine.data.batching import Batch, EncodedData
from vqabench.engine.distributed import SINGLE, Ranks
from vqabench.engine.precision import autocast
from vqabench.engine.telemetry import module_bytes
from vqabench.models import parts
from vqabench.models.family import ALL_SAVINGS, LoadedModel, ModelFamily, Savings

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int], None]


#: Block size and seed of the mismatched pairing when a run did not assign its own.
MISMATCH_BLOCK = 16
MISMATCH_SEED = 0


def mismatched_rows(image_index: torch.Tensor, block: int, seed: int) -> torch.Tensor:
    """For each row of a split, the row whose chosen answer KTO's KL term pairs with its question.

    The split's rows are shuffled with `seed` and cut into blocks of `block` rows (a batch's
    worth, as TRL builds its KL dataset); within each block a seeded permutation is drawn
    that never gives a question an answer about its own image. The pairing depends only on
    the split's images, `block` and `seed`, so precomputed and live reference log-probs agree.
    A row whose block holds no other image takes a row of another image from the whole split
    (a row of the same image only when the split has a single image).
    """
    n = int(image_index.shape[0])
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    partners = torch.empty(n, dtype=torch.long)
    for lo in range(0, n, block):
        rows = order[lo : lo + block]
        partners[rows] = rows[_derangement(image_index[rows], g)]
    stuck = (image_index[partners] == image_index).nonzero().flatten()
    for i in stuck.tolist():
        others = (image_index != image_index[i]).nonzero().flatten()
        if len(others):
            partners[i] = others[int(torch.randint(len(others), (1,), generator=g))]
    return partners


def _derangement(images: torch.Tensor, g: torch.Generator, tries: int = 20) -> torch.Tensor:
    """Positions p with images[p] != images where possible: random draws, else a shift by image."""
    m = len(images)
    for _ in range(tries):
        perm = torch.randperm(m, generator=g)
        if bool((images[perm] != images).all()):
            return perm
    # Sorted by image, shifting by the largest image group pairs different images whenever
    # that group is at most half the block; rows it cannot serve are fixed by the caller.
    shuffled = torch.randperm(m, generator=g)
    ordered = shuffled[torch.argsort(images[shuffled], stable=True)]
    shift = int(torch.unique(images, return_counts=True)[1].max()) % m if m > 1 else 0
    perm = torch.empty(m, dtype=torch.long)
    perm[ordered] = ordered.roll(-shift)
    return perm


def assign_mismatched(encoded: EncodedData, block: int, seed: int) -> None:
    """Fix KTO's mismatched pairing of every split (see :func:`mismatched_rows`)."""
    for name, split in encoded.splits.items():
        encoded.mismatched[name] = mismatched_rows(split.image_index, block, seed)


def split_mismatched(encoded: EncodedData, split: str) -> torch.Tensor:
    if split not in encoded.mismatched:
        encoded.mismatched[split] = mismatched_rows(encoded.splits[split].image_index, MISMATCH_BLOCK, MISMATCH_SEED)
    return encoded.mismatched[split]


def mismatched_answers(encoded: EncodedData, split: str, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen answers KTO's KL term pairs with the batch's questions, trimmed to the batch."""
    s = encoded.splits[split]
    device = batch.question_ids.device
    rows = split_mismatched(encoded, split)[batch.rows]  # CPU: the width needs no device sync
    width = s.answer_width(s.chosen_mask, rows)
    tokens = s.tokens_on(device)
    key = (split, str(device))
    if key not in encoded.mismatched_on_device:  # once per run: a batch then only indexes on the device
        encoded.mismatched_on_device[key] = split_mismatched(encoded, split).to(device)
    at = encoded.mismatched_on_device[key][batch.rows_on(device)]
    return tokens.chosen_ids[at, :width], tokens.chosen_mask[at, :width]


#: Version of the code that turns a checkpoint and data into reference log-probs; bump it when
#: scoring changes (masking, truncation, the mismatched pairing), so older tables are not reused.
SCORING_VERSION = 2
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's files, as ``save_pretrained`` writes them (vocabulary, specials, config)."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            if path.name in _TOKENIZER_FILES or path.name.startswith(("added_tokens", "merges", "spiece")):
                h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def reference_cache_key(
    loaded: LoadedModel,
    encoded: EncodedData,
    checkpoint_key: str,
    data_key: str,
    *,
    precision: str,
    device: torch.device,
) -> str:
    """Everything a precomputed table depends on: weights, data, token layout, pairing, the
    features the trainable part reads (live, or the encoder cache's entry and its dtype), the
    precision, the device type and the torch, transformers and scoring code versions."""
    import transformers

    train = encoded.splits["train"]
    pairing = hashlib.sha256()
    for name in ("train", "eval"):
        pairing.update(split_mismatched(encoded, name).numpy().tobytes())
    key_parts = [
        checkpoint_key,
        data_key,
        str(tuple(train.chosen_ids.shape)),
        str(tuple(train.question_ids.shape)),
        str(len(encoded.splits["eval"])),
        pairing.hexdigest(),
        _encodings_part(encoded),
        f"precision {precision}",
        f"device {device.type}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
        f"tokenizer {tokenizer_fingerprint(loaded.tokenizer)}",
        f"scoring {SCORING_VERSION}",
    ]
    return hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:24]


def _encodings_part(encoded: EncodedData) -> str:
    """Where the trainable part's features come from: computed live, or an encoder cache entry (key, dtype)."""
    if encoded.encodings is None:
        return "encoder cache off"
    return f"encoder cache {encoded.encodings.key.digest} {encoded.encodings.key.parts.get('dtype', '?')}"


@dataclass
class ReferenceLogps:
    chosen: torch.Tensor
    rejected: torch.Tensor
    mismatched: torch.Tensor | None = None


class CopyReference:
    """A frozen copy of the trainable part, run beside the policy on the same features.

    The copy is the whole model object, but every weight outside the trainable part is the
    policy's own tensor (shared, not copied), so only the trainable part costs memory.
    """

    strategy = "copy"

    def __init__(self, loaded: LoadedModel, train: str):
        self.train = train
        self.family: ModelFamily = loaded.family
        trained = {id(t) for t in parts.trainable_part(loaded, train).parameters()}
        shared = {id(t): t for t in (*loaded.model.parameters(), *loaded.model.buffers()) if id(t) not in trained}
        self.model = copy.deepcopy(loaded.model, memo=shared).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.part = parts.trainable_part(
            LoadedModel(loaded.family, self.model, loaded.tokenizer, loaded.image, loaded.source), train
        )
        self.pad_id = loaded.pad_token_id
        self.savings = loaded.savings

    @property
    def resident_bytes(self) -> int:
        return module_bytes(self.part)

    @torch.no_grad()
    def logps(
        self,
        encoded: EncodedData,
        split: str,
        batch: Batch,
        features: torch.Tensor,
        with_mismatched: bool = False,
    ) -> ReferenceLogps:
        # The frozen part is shared, so the policy's features serve the copy too; a full copy
        # ("all") has its own (and no encoder cache: every weight trains).
        q = features.detach() if self.train != "all" else batch.features_of(self.family, self.model, self.savings)
        return _scored(self.family, self.model, q, encoded, split, batch, self.pad_id, with_mismatched, self.savings)


def _scored(
    family: ModelFamily,
    model: nn.Module,
    q: torch.Tensor,
    encoded: EncodedData,
    split: str,
    batch: Batch,
    pad_id: int,
    with_mismatched: bool,
    savings: Savings = ALL_SAVINGS,
) -> ReferenceLogps:
    """A reference model's chosen and rejected log-probs (and KTO's mismatched ones) for a batch."""
    c, r = family.pair_scores(model, q, batch.prompt, batch.chosen, batch.rejected, pad_id, savings)
    mm = None
    if with_mismatched:
        mismatched = mismatched_answers(encoded, split, batch)
        mm = family.answer_scores(model, q, batch.prompt, mismatched, savings=savings).logps
    return ReferenceLogps(c.logps, r.logps, mm)


class PrecomputedReference:
    """Reference log-probs for every pair, computed once and kept as small tensors."""

    strategy = "precompute"
    resident_bytes = 0  # no reference weights stay resident while training

    def __init__(self, table: dict[str, dict[str, torch.Tensor]], path: Path | None, seconds: float, from_cache: bool):
        self.table = table
        self.path = path
        self.seconds = seconds
        self.from_cache = from_cache
        self._on_device: dict[str, dict[str, dict[str, torch.Tensor]]] = {}

    def table_on(self, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
        """The table on `device`, copied once per run (a few floats per pair), then indexed there."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = {
                split: {name: values.to(device) for name, values in columns.items()}
                for split, columns in self.table.items()
            }
        return self._on_device[key]

    def logps(
        self,
        encoded: EncodedData,
        split: str,
        batch: Batch,
        features: torch.Tensor,
        with_mismatched: bool = False,
    ) -> ReferenceLogps:
        device = features.device
        t = self.table_on(device)[split]
        rows = batch.rows_on(device)
        mm = t["mismatched"][rows] if with_mismatched else None
        return ReferenceLogps(t["chosen"][rows], t["rejected"][rows], mm)

    @classmethod
    def build(
        cls,
        loaded: LoadedModel,
        encoded: EncodedData,
        *,
        batch_size: int,
        device: torch.device,
        cache_dir: Path | None,
        checkpoint_key: str,
        data_key: str,
        precision: str,
        progress: ProgressFn | None = None,
        ranks: Ranks = SINGLE,
    ) -> PrecomputedReference:
        """Load the cached table for this checkpoint and data, or score every pair once.

        The pairs are scored under the autocast of the run's `precision`, as the policy's and a
        copy reference's passes are, so DPO starts at log 2 whichever strategy and precision.
        On several processes each rank scores a slice of every split, the slices are gathered,
        and rank 0 alone writes the cache.
        """
        import time

        key = reference_cache_key(loaded, encoded, checkpoint_key, data_key, precision=precision, device=device)
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
        with torch.no_grad(), autocast(precision, device):
            for split in ("train", "eval"):
                shard = ranks.shard(len(encoded.splits[split]))
                columns: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": [], "mismatched": []}
                for name in columns:
                    columns[name].append(torch.zeros(0))
                blocks = [
                    torch.arange(lo, min(lo + batch_size, shard.stop))
                    for lo in range(shard.start, shard.stop, batch_size)
                ]
                for batch in encoded.batches(split, blocks, device):
                    q = batch.features_of(loaded.family, model, loaded.savings)
                    scored = _scored(
                        loaded.family, model, q, encoded, split, batch, loaded.pad_token_id, True, loaded.savings
                    )
                    for name, value in (
                        ("chosen", scored.chosen),
                        ("rejected", scored.rejected),
                        ("mismatched", scored.mismatched),
                    ):
                        assert value is not None
                        columns[name].append(value.float().cpu())
                    done += 1
                    if progress is not None:
                        progress(done, total)
                table[split] = {k: ranks.gather_cat(torch.cat(v)) for k, v in columns.items()}
        model.train(was_training)
        if path is not None and ranks.is_main:
            publish_file(path, lambda tmp: torch.save(table, tmp))
        return cls(table, path, time.perf_counter() - start, False)


class AdapterReference:
    """The LoRA policy with its adapters disabled: the starting model, at no resident cost."""

    strategy = "adapter"
    resident_bytes = 0  # the base weights are the policy's own

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded  # its model is a peft.PeftModel
        self.pad_id = loaded.pad_token_id

    @torch.no_grad()
    def logps(
        self,
        encoded: EncodedData,
        split: str,
        batch: Batch,
        features: torch.Tensor,
        with_mismatched: bool = False,
    ) -> ReferenceLogps:
        model = self.loaded.model
        part = parts.trainable_part(self.loaded, "lora")
        was_training = part.training
        part.eval()  # eval semantics like the other strategies: dropout is off
        try:
            with model.disable_adapter():
                return _scored(
                    self.loaded.family,
                    model,
                    features.detach(),
                    encoded,
                    split,
                    batch,
                    self.pad_id,
                    with_mismatched,
                    self.loaded.savings,
                )
        finally:
            part.train(was_training)
