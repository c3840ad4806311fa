"""Seeded, image-grouped train/eval/test splits that every method of a study shares.

When a dataset brings its own test or eval split it is used (capped at `test_size` /
`eval_size` pairs by a seeded sample). Whatever is missing is carved out of the train split:
the distinct images are put in a seeded order — sorted by SHA-256 of ``"<seed>:<image id>"``,
so the order depends on nothing but the seed and the image bytes, not on row order, Python's
`random` or the platform — and whole images are dealt to test first, then eval, until each
holds at least its size in pairs; the rest is train. All pairs of one image go to one split, so
no image is ever in two carved splits, and a split can exceed its size by one image's pairs.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from vqabench.engine.data.records import PreferencePair


def image_order_key(seed: int, image_id: str) -> str:
    """The seeded position of an image in the carving order."""
    return hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest()


def seeded_order(pairs: list[PreferencePair], seed: int) -> list[PreferencePair]:
    """Pairs grouped by image in the seeded image order, rows of one image in input order."""
    groups: dict[str, list[PreferencePair]] = defaultdict(list)
    for pair in pairs:
        groups[pair.image_id].append(pair)
    ordered = sorted(groups, key=lambda image_id: image_order_key(seed, image_id))
    return [pair for image_id in ordered for pair in groups[image_id]]


def carve(pairs: list[PreferencePair], sizes: dict[str, int], seed: int) -> dict[str, list[PreferencePair]]:
    """Deal whole images to the named parts in order until each holds `size` pairs; rest = "train"."""
    groups: dict[str, list[PreferencePair]] = defaultdict(list)
    for pair in pairs:
        groups[pair.image_id].append(pair)
    order = sorted(groups, key=lambda image_id: image_order_key(seed, image_id))
    parts: dict[str, list[PreferencePair]] = {name: [] for name in sizes}
    position = 0
    for name, size in sizes.items():
        while len(parts[name]) < size and position < len(order):
            parts[name].extend(groups[order[position]])
            position += 1
    parts["train"] = [pair for image_id in order[position:] for pair in groups[image_id]]
    return parts


def sample(pairs: list[PreferencePair], size: int, seed: int) -> list[PreferencePair]:
    """A seeded subset of about `size` pairs (whole images); all of them when size is 0 or larger."""
    if size <= 0 or size >= len(pairs):
        return list(pairs)
    return carve(pairs, {"kept": size}, seed)["kept"]


def limit_train(train: list[PreferencePair], limit: int | None, seed: int) -> list[PreferencePair]:
    """The first `limit` train pairs in the seeded order (a random subset, not the file's head)."""
    ordered = seeded_order(train, seed)
    return ordered if limit is None else ordered[:limit]
