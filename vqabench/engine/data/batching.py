"""Turn preference pairs into tensors once per run, then serve batches of them.

Images are resized once into uint8 ``[3, S, S]`` arrays written to the on-disk array cache
(:mod:`vqabench.engine.cache`, kind ``images``) and read back a batch's rows at a time, so resident
memory does not grow with the number of images. Text is tokenized once and kept in memory
(small). Batches come from a ``torch.utils.data.DataLoader`` (``num_workers`` from the spec;
pinned memory on CUDA) that gathers a batch's uint8 images; they are copied to the device
as uint8 and converted and normalised there. With the frozen-encoder cache on
(:mod:`vqabench.engine.encoder_cache`) a batch carries the cached features instead of images
(its pairs' rows, or its pairs' images' rows where the features read the image only).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image

from vqabench.engine.cache import ArraySpec, ArrayStore, CacheKey, Entry
from vqabench.engine.data.records import DataError, DataSplits, PreferencePair
from vqabench.models.family import ALL_SAVINGS, LoadedModel, ModelError, ModelFamily, Savings

#: Names the image preprocessing; part of every key derived from preprocessed pixels.
IMAGE_PREPROCESSING = "rgb-bicubic-uint8-v1"
IMAGE_BLOCK = 64  # images decoded and written per block
#: The per-image encoder cache's feature array (:mod:`vqabench.engine.encoder_cache`).
IMAGES = "images"


def rows_array(split: str) -> str:
    """The per-image encoder cache's array mapping each pair of `split` to its image's feature row."""
    return f"{split}.rows"


@dataclass
class EncodedSplit:
    """One split as padded tensors; row i is pair i of the split."""

    pairs: list[PreferencePair]
    image_index: torch.Tensor  # [N] rows of EncodedData.images
    question_ids: torch.Tensor  # [N, Lq]
    question_mask: torch.Tensor
    chosen_ids: torch.Tensor  # [N, La]: the answer as the family frames it (e.g. BOS, tokens, SEP)
    chosen_mask: torch.Tensor
    rejected_ids: torch.Tensor
    rejected_mask: torch.Tensor
    _on_device: dict[str, DeviceTokens] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.pairs)

    def tokens_on(self, device: torch.device) -> DeviceTokens:
        """This split's token tensors on `device`, copied once per run (kilobytes), then indexed there."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = DeviceTokens(
                *(t.to(device) for t in (self.question_ids, self.question_mask, self.chosen_ids, self.chosen_mask)),
                *(t.to(device) for t in (self.rejected_ids, self.rejected_mask)),
            )
        return self._on_device[key]

    def answer_width(self, mask: torch.Tensor, rows: torch.Tensor) -> int:
        """Longest answer among `rows` (at least 1), read from the split's CPU mask: no device sync."""
        return max(int(mask[rows].sum(1).max()), 1)


@dataclass
class DeviceTokens:
    """A split's token tensors resident on the training device."""

    question_ids: torch.Tensor
    question_mask: torch.Tensor
    chosen_ids: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_ids: torch.Tensor
    rejected_mask: torch.Tensor


@dataclass
class Batch:
    pixel_values: torch.Tensor | None  # None when the features come from the encoder cache
    question_ids: torch.Tensor
    question_mask: torch.Tensor
    chosen: tuple[torch.Tensor, torch.Tensor]
    rejected: tuple[torch.Tensor, torch.Tensor]
    rows: torch.Tensor  # positions of these examples in their split (CPU)
    device_rows: torch.Tensor | None = None  # the same positions on the training device
    features: torch.Tensor | None = None  # the frozen part's cached output [B, ...]

    def rows_on(self, device: torch.device) -> torch.Tensor:
        return self.device_rows if self.device_rows is not None else self.rows.to(device)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.question_ids, self.question_mask

    def features_of(self, family: ModelFamily, model: Any, savings: Savings = ALL_SAVINGS) -> torch.Tensor:
        """The frozen part's output the trainable part reads: from the encoder cache, else computed now."""
        if self.features is not None:
            return self.features
        assert self.pixel_values is not None
        return family.features(model, self.pixel_values, self.question_ids, self.question_mask, savings)


class BatchRows(torch.utils.data.Dataset):
    """What a DataLoader worker gathers for one batch of rows: uint8 images, or cached features.

    Cached features come one row per pair (named after the split) or, where the entry holds one
    row per image, from the image row its split's row map names."""

    def __init__(self, images: Entry, image_index: torch.Tensor, encodings: Entry | None, split: str):
        self.images, self.image_index, self.encodings, self.split = images, image_index, encodings, split
        self.feature_rows: torch.Tensor | None = None  # pair -> row of the per-image array
        if encodings is not None and IMAGES in encodings.specs:
            self.feature_rows = encodings.rows(rows_array(split), slice(None))

    def __len__(self) -> int:
        return int(self.image_index.shape[0])

    def __getitem__(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.encodings is None:
            return {"rows": rows, "pixels": self.images.rows("pixels", self.image_index[rows])}
        if self.feature_rows is not None:
            return {"rows": rows, "features": self.encodings.rows(IMAGES, self.feature_rows[rows])}
        return {"rows": rows, "features": self.encodings.rows(self.split, rows)}


@dataclass
class EncodedData:
    images: Entry  # array "pixels": [M, 3, S, S] uint8, on disk, read by rows
    mean: torch.Tensor  # [1, 3, 1, 1]
    std: torch.Tensor
    splits: dict[str, EncodedSplit]
    answers_truncated: int
    num_workers: int = 0  # DataLoader worker processes (0: gather in this process)
    encodings: Entry | None = None  # the frozen-encoder cache, one array per split, when it is on
    family: ModelFamily | None = None  # the model family whose features `encodings` holds
    # split -> row whose chosen answer KTO's KL term pairs with each row's question (reference.py)
    mismatched: dict[str, torch.Tensor] = field(default_factory=dict)
    mismatched_on_device: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # copied once

    def batch(self, split: str, rows: torch.Tensor, device: torch.device) -> Batch:
        """One batch gathered in this process (no DataLoader)."""
        return self._to_batch(split, BatchRows(*self._sources(split))[rows.cpu()], device, pinned=False)

    def batches(self, split: str, row_blocks: Sequence[torch.Tensor], device: torch.device) -> Iterator[Batch]:
        """The batches of `row_blocks` (each a tensor of split rows), in order, through a DataLoader."""
        pinned = device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            BatchRows(*self._sources(split)),
            batch_size=None,
            sampler=[r.cpu() for r in row_blocks],
            num_workers=self.num_workers,
            pin_memory=pinned,
        )
        for item in loader:
            yield self._to_batch(split, item, device, pinned)

    def image_batches(
        self, image_rows: torch.Tensor, blocks: Sequence[torch.Tensor], device: torch.device
    ) -> Iterator[torch.Tensor]:
        """Normalised pixels of `image_rows` (rows of `images`), one block (positions in it) at a time."""
        pinned = device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            BatchRows(self.images, image_rows, None, ""),
            batch_size=None,
            sampler=[b.cpu() for b in blocks],
            num_workers=self.num_workers,
            pin_memory=pinned,
        )
        for item in loader:
            yield self._pixels(item["pixels"], device, pinned)

    def _sources(self, split: str) -> tuple[Entry, torch.Tensor, Entry | None, str]:
        return self.images, self.splits[split].image_index, self.encodings, split

    def _pixels(self, uint8: torch.Tensor, device: torch.device, pinned: bool) -> torch.Tensor:
        """uint8 over the bus, float and normalised on the device."""
        if self.mean.device != device:  # once per device, not once per batch
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        pixels = uint8.to(device, non_blocking=pinned).to(torch.float32)
        return (pixels / 255.0 - self.mean) / self.std

    def _to_batch(self, split: str, item: dict[str, torch.Tensor], device: torch.device, pinned: bool) -> Batch:
        s = self.splits[split]
        rows = item["rows"]
        pixels = embeds = None
        if "pixels" in item:
            pixels = self._pixels(item["pixels"], device, pinned)
        else:
            embeds = item["features"].to(device, non_blocking=pinned).to(torch.float32)

        # Tokens live on the device (once per run); the only per-batch copy is the row indices,
        # asynchronous from pageable memory. Widths come from the CPU masks, so nothing waits.
        tokens = s.tokens_on(device)
        at = rows.to(device, non_blocking=True)

        def trimmed(ids: torch.Tensor, mask: torch.Tensor, cpu_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            width = s.answer_width(cpu_mask, rows)
            return ids[at, :width], mask[at, :width]

        # Prompts are trimmed per batch too: every family scores an answer the same whatever its
        # prompt's padding (tested per family). Cached features were made at the split's full
        # width; the family trims them to the batch's (a question encoding: its first positions).
        q_ids, q_mask = trimmed(tokens.question_ids, tokens.question_mask, s.question_mask)
        if embeds is not None and self.family is not None:
            embeds = self.family.trim_features(embeds, q_ids.shape[1])
        return Batch(
            pixels,
            q_ids,
            q_mask,
            trimmed(tokens.chosen_ids, tokens.chosen_mask, s.chosen_mask),
            trimmed(tokens.rejected_ids, tokens.rejected_mask, s.rejected_mask),
            rows,
            device_rows=at,
            features=embeds,
        )


def image_to_uint8(image: Image.Image, size: int) -> torch.Tensor:
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=1)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


class TextEncoder:
    """Tokenizes questions (as the family's prompt) and answers with the model's tokenizer, memoised per string.

    An answer longer than `max_answer_tokens` is cut and gets no end marker (it did not end
    there), and is counted in `truncated`. A prompt is cut only where the family allows it
    (an encoder's question); a causal VLM's never is.
    """

    def __init__(self, loaded: LoadedModel, max_question_tokens: int = 0, max_answer_tokens: int = 0):
        self.loaded = loaded
        self.max_q = max_question_tokens
        self.max_a = max_answer_tokens
        self._q: dict[str, list[int]] = {}
        self._a: dict[str, list[int]] = {}
        self.truncated = 0

    def question_tokens(self, text: str) -> list[int]:
        """The question as the model reads it (with its special tokens), untruncated."""
        if text not in self._q:
            self._q[text] = self.loaded.family.prompt_ids(self.loaded, text)
        return self._q[text]

    def answer_tokens(self, text: str) -> list[int]:
        """Answer content tokens, untruncated."""
        if text not in self._a:
            self._a[text] = self.loaded.family.answer_ids(self.loaded, text)
        return self._a[text]

    def question_length(self, text: str) -> int:
        return len(self.question_tokens(text))

    def answer_length(self, text: str) -> int:
        return len(self.answer_tokens(text))

    def question(self, text: str) -> list[int]:
        ids = self.question_tokens(text)
        if len(ids) > self.max_q:
            ids = self.loaded.family.cut_prompt(self.loaded, ids, self.max_q)
        return ids

    def answer(self, text: str) -> list[int]:
        tokens = self.answer_tokens(text)
        if len(tokens) > self.max_a:
            self.truncated += 1
            return self.loaded.family.frame_answer(self.loaded, tokens[: self.max_a], complete=False)
        return self.loaded.family.frame_answer(self.loaded, tokens, complete=True)


def image_cache_key(data: DataSplits, used: list[str], size: int) -> CacheKey:
    """Preprocessed pixels depend on the images used, their size, the preprocessing code and
    Pillow's version (its decoders and resampling filters can change between releases)."""
    ids = hashlib.sha256("\n".join(used).encode()).hexdigest()[:16]
    return CacheKey(
        "images",
        {
            "data": data.fingerprint,
            "image_ids": ids,
            "size": str(size),
            "preprocessing": IMAGE_PREPROCESSING,
            "pillow": PIL.__version__,
        },
    )


def cached_images(
    data: DataSplits,
    used: list[str],
    size: int,
    store: ArrayStore,
    progress: Callable[[int, int], None] | None = None,
) -> Entry:
    """The preprocessed images `used` (in that order) from the cache, written once if missing.

    Images are decoded a block at a time on a small thread pool (PIL releases the GIL) and
    appended to the entry, so no more than one block of decoded pictures is held at once.
    """
    key = image_cache_key(data, used, size)
    entry = store.open(key)
    if entry is not None:
        return entry
    writer = store.create(key, [ArraySpec("pixels", (len(used), 3, size, size), "uint8")])
    images: Mapping[str, Image.Image] = data.images
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for lo in range(0, len(used), IMAGE_BLOCK):
            block = used[lo : lo + IMAGE_BLOCK]
            pixels = list(pool.map(lambda image_id: image_to_uint8(images[image_id], size), block))
            writer.write("pixels", torch.stack(pixels))
            if progress is not None:
                progress(min(lo + IMAGE_BLOCK, len(used)), len(used))
    return writer.commit()


def encode(
    data: DataSplits,
    loaded: LoadedModel,
    max_question_tokens: int,
    max_answer_tokens: int,
    text: TextEncoder | None = None,
    store: ArrayStore | None = None,
    num_workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> EncodedData:
    """Preprocess every split once: images into the array cache (`store`; None: in memory), text to padded ids.

    Pass the `text` encoder that measured the lengths to reuse its tokenisations.
    """
    text = text or TextEncoder(loaded)
    text.max_q, text.max_a, text.truncated = max_question_tokens, max_answer_tokens, 0
    names = [n for n in ("base", "train", "eval", "test") if getattr(data, n)]
    used = sorted({p.image_id for n in names for p in getattr(data, n)})
    index = {image_id: i for i, image_id in enumerate(used)}
    images = cached_images(data, used, loaded.image_size, store or ArrayStore(None), progress)
    pad = loaded.pad_token_id
    splits = {}
    for name in names:
        pairs = getattr(data, name)
        q_ids, q_mask = _pad([_prompt(text, p, name, i) for i, p in enumerate(pairs)], pad)
        c_ids, c_mask = _pad([text.answer(p.chosen) for p in pairs], pad)
        r_ids, r_mask = _pad([text.answer(p.rejected or p.chosen) for p in pairs], pad)
        splits[name] = EncodedSplit(
            pairs,
            torch.tensor([index[p.image_id] for p in pairs], dtype=torch.long),
            q_ids,
            q_mask,
            c_ids,
            c_mask,
            r_ids,
            r_mask,
        )
    mean = torch.tensor(loaded.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(loaded.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return EncodedData(images, mean, std, splits, text.truncated, num_workers, family=loaded.family)


def _prompt(text: TextEncoder, pair: PreferencePair, split: str, row: int) -> list[int]:
    """A pair's prompt ids; a prompt the family cannot cut fails the run naming its row."""
    try:
        return text.question(pair.question)
    except ModelError as exc:
        raise DataError(f"{split} row {row} (image '{pair.image_id}'): {exc}") from exc
