"""Turn preference pairs into tensors once per run, then cut batches from them.

Images are resized once into a uint8 tensor (normalised per batch, which is cheap) and
text is tokenized once, so no epoch repeats preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def __len__(self) -> int:
        return len(self.pairs)


@dataclass
class Batch:
    pixel_values: torch.Tensor
    question_ids: torch.Tensor
    question_mask: torch.Tensor
    chosen: tuple[torch.Tensor, torch.Tensor]
    rejected: tuple[torch.Tensor, torch.Tensor]
    rows: torch.Tensor  # positions of these examples in their split

    def __len__(self) -> int:
        return int(self.rows.shape[0])


@dataclass
class EncodedData:
    images: torch.Tensor  # [M, 3, S, S] uint8
    mean: torch.Tensor  # [1, 3, 1, 1]
    std: torch.Tensor
    splits: dict[str, EncodedSplit]
    answers_truncated: int

    def batch(self, split: str, rows: torch.Tensor, device: torch.device) -> Batch:
        s = self.splits[split]
        rows = rows.cpu()
        if self.mean.device != device:  # once per device, not once per batch
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        pixels = self.images[s.image_index[rows]].to(device=device, dtype=torch.float32)
        pixels = (pixels / 255.0 - self.mean) / self.std

        def trimmed(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            ids, mask = ids[rows], mask[rows]
            width = max(int(mask.sum(1).max()), 1)
            return ids[:, :width].to(device), mask[:, :width].to(device)

        # Questions keep the split's full width: transformers 5's BLIP decoder ignores the
        # cross-attention mask, so the number of padded question positions would otherwise
        # change an answer's score with the batch it happens to be in.
        q_ids, q_mask = s.question_ids[rows].to(device), s.question_mask[rows].to(device)
        return Batch(
            pixels, q_ids, q_mask, trimmed(s.chosen_ids, s.chosen_mask), trimmed(s.rejected_ids, s.rejected_mask), rows
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
    """Tokenizes questions and answers with the model's tokenizer, memoised per string."""

    def __init__(self, loaded: LoadedModel, max_question_tokens: int, max_answer_tokens: int):
        self.loaded = loaded
        self.max_q = max_question_tokens
        self.max_a = max_answer_tokens
        self._q: dict[str, list[int]] = {}
        self._a: dict[str, list[int]] = {}
        self.truncated = 0

    def answer_tokens(self, text: str) -> list[int]:
        """Answer content tokens, untruncated (for length statistics)."""
        return self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.answer_tokens(text))

    def question(self, text: str) -> list[int]:
        if text not in self._q:
            ids = self.loaded.tokenizer(text, truncation=True, max_length=self.max_q)["input_ids"]
            self._q[text] = ids
        return self._q[text]

    def answer(self, text: str) -> list[int]:
        if text not in self._a:
            tokens = self.answer_tokens(text)
            if len(tokens) > self.max_a:
                self.truncated += 1
                tokens = tokens[: self.max_a]
            self._a[text] = [self.loaded.bos_token_id, *tokens, self.loaded.sep_token_id]
        return self._a[text]


def encode(data: DataSplits, loaded: LoadedModel, max_question_tokens: int, max_answer_tokens: int) -> EncodedData:
    """Preprocess every split once: images to uint8 tensors, text to padded token ids."""
    text = TextEncoder(loaded, max_question_tokens, max_answer_tokens)
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
