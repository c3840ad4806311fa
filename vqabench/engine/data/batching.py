"""Turn preference pairs into tensors once per run, then cut batches from them.

Images are resized once into a uint8 tensor (normalised per batch, which is cheap) and
text is tokenized once, so no epoch repeats preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from vqabench.engine.data.records import DataSplits, PreferencePair
from vqabench.engine.model import LoadedModel


@dataclass
class EncodedSplit:
    """One split as padded tensors; row i is pair i of the split."""

    pairs: list[PreferencePair]
    image_index: torch.Tensor  # [N] rows of EncodedData.images
    question_ids: torch.Tensor  # [N, Lq]
    question_mask: torch.Tensor
    chosen_ids: torch.Tensor  # [N, La]: BOS, answer tokens, SEP
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
    pixel_values: torch.Tensor
    question_ids: torch.Tensor
    question_mask: torch.Tensor
    chosen: tuple[torch.Tensor, torch.Tensor]
    rejected: tuple[torch.Tensor, torch.Tensor]
    rows: torch.Tensor  # positions of these examples in their split (CPU)
    device_rows: torch.Tensor | None = None  # the same positions on the training device

    def rows_on(self, device: torch.device) -> torch.Tensor:
        return self.device_rows if self.device_rows is not None else self.rows.to(device)

    def __len__(self) -> int:
        return int(self.rows.shape[0])


@dataclass
class EncodedData:
    images: torch.Tensor  # [M, 3, S, S] uint8
    mean: torch.Tensor  # [1, 3, 1, 1]
    std: torch.Tensor
    splits: dict[str, EncodedSplit]
    answers_truncated: int
    # split -> row whose chosen answer KTO's KL term pairs with each row's question (reference.py)
    mismatched: dict[str, torch.Tensor] = field(default_factory=dict)
    mismatched_on_device: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # copied once

    def batch(self, split: str, rows: torch.Tensor, device: torch.device) -> Batch:
        s = self.splits[split]
        rows = rows.cpu()
        if self.mean.device != device:  # once per device, not once per batch
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        pixels = self.images[s.image_index[rows]].to(device=device, dtype=torch.float32)
        pixels = (pixels / 255.0 - self.mean) / self.std

        # Tokens live on the device (once per run); the only per-batch copy is the row indices,
        # asynchronous from pageable memory. Widths come from the CPU masks, so nothing waits.
        tokens = s.tokens_on(device)
        at = rows.to(device, non_blocking=True)

        def trimmed(ids: torch.Tensor, mask: torch.Tensor, cpu_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            width = s.answer_width(cpu_mask, rows)
            return ids[at, :width], mask[at, :width]

        # Questions are trimmed per batch too: the decoder honours the cross-attention mask
        # (engine/cross_attention.py), so padding does not change any score.
        q_ids, q_mask = trimmed(tokens.question_ids, tokens.question_mask, s.question_mask)
        return Batch(
            pixels,
            q_ids,
            q_mask,
            trimmed(tokens.chosen_ids, tokens.chosen_mask, s.chosen_mask),
            trimmed(tokens.rejected_ids, tokens.rejected_mask, s.rejected_mask),
            rows,
            at,
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
    """Tokenizes questions and answers with the model's tokenizer, memoised per string.

    An answer longer than `max_answer_tokens` is cut and gets no SEP (it did not end there),
    and is counted in `truncated`.
    """

    def __init__(self, loaded: LoadedModel, max_question_tokens: int = 0, max_answer_tokens: int = 0):
        self.loaded = loaded
        self.max_q = max_question_tokens
        self.max_a = max_answer_tokens
        self._q: dict[str, list[int]] = {}
        self._a: dict[str, list[int]] = {}
        self.truncated = 0

    def question_tokens(self, text: str) -> list[int]:
        """Question tokens with the tokenizer's [CLS]/[SEP], untruncated."""
        if text not in self._q:
            self._q[text] = self.loaded.tokenizer(text)["input_ids"]
        return self._q[text]

    def answer_tokens(self, text: str) -> list[int]:
        """Answer content tokens, untruncated."""
        if text not in self._a:
            self._a[text] = self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._a[text]

    def question_length(self, text: str) -> int:
        return len(self.question_tokens(text))

    def answer_length(self, text: str) -> int:
        return len(self.answer_tokens(text))

    def question(self, text: str) -> list[int]:
        ids = self.question_tokens(text)
        if len(ids) > self.max_q:  # cut, keeping the closing [SEP] as the tokenizer's truncation does
            ids = [*ids[: self.max_q - 1], ids[-1]]
        return ids

    def answer(self, text: str) -> list[int]:
        tokens = self.answer_tokens(text)
        if len(tokens) > self.max_a:
            self.truncated += 1
            return [self.loaded.bos_token_id, *tokens[: self.max_a]]
        return [self.loaded.bos_token_id, *tokens, self.loaded.sep_token_id]


def encode(
    data: DataSplits,
    loaded: LoadedModel,
    max_question_tokens: int,
    max_answer_tokens: int,
    text: TextEncoder | None = None,
) -> EncodedData:
    """Preprocess every split once: images to uint8 tensors, text to padded token ids.

    Pass the `text` encoder that measured the lengths to reuse its tokenisations.
    """
    text = text or TextEncoder(loaded)
    text.max_q, text.max_a, text.truncated = max_question_tokens, max_answer_tokens, 0
    names = [n for n in ("base", "train", "eval", "test") if getattr(data, n)]
    used = sorted({p.image_id for n in names for p in getattr(data, n)})
    index = {image_id: i for i, image_id in enumerate(used)}
    size = loaded.image_size
    images = torch.empty((len(used), 3, size, size), dtype=torch.uint8)
    for image_id, i in index.items():
        images[i] = image_to_uint8(data.images[image_id], size)
    pad = loaded.pad_token_id
    splits = {}
    for name in names:
        pairs = getattr(data, name)
        q_ids, q_mask = _pad([text.question(p.question) for p in pairs], pad)
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
    return EncodedData(images, mean, std, splits, text.truncated)
