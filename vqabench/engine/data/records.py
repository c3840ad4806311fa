"""Records that every data source produces: preference pairs, images, a quality report."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


class DataError(ValueError):
    """Data that cannot be trained on; the message is one sentence for the user."""


@dataclass(frozen=True)
class PreferencePair:
    """One question about one image with a preferred and a dispreferred answer.

    For test items `chosen` is the reference answer and `rejected` may be empty.
    """

    image_id: str
    question: str
    chosen: str
    rejected: str


@dataclass
class QualityReport:
    """What loading did: rows read, pairs built, rows skipped and why."""

    rows_read: int = 0
    pairs_built: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    # answer and question lengths in tokens, the limits used and how many were cut (token_limits.py)
    token_stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # one sentence each, shown with the Data table

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "pairs_built": self.pairs_built,
            "skipped": dict(self.skipped),
            "skipped_total": self.skipped_total,
            "token_stats": dict(self.token_stats),
            "warnings": list(self.warnings),
        }


@dataclass
class DataSplits:
    """Everything a run trains and scores on, with its images as RGB by id.

    `base` is only used to make the embedded model's base checkpoint (disjoint from the rest).
    """

    train: list[PreferencePair]
    eval: list[PreferencePair]
    test: list[PreferencePair]
    images: Mapping[str, Image.Image]  # by image id; may decode on access (hub data)
    base: list[PreferencePair] = field(default_factory=list)
    report: QualityReport = field(default_factory=QualityReport)
    name: str = ""
    fingerprint: str = ""  # stable hash of the pairs, keys reference caches

    def sizes(self) -> dict[str, int]:
        return {
            "base": len(self.base),
            "train": len(self.train),
            "eval": len(self.eval),
            "test": len(self.test),
            "images": len(self.images),
        }


def nearest_rank(sorted_values: list[int], percent: float) -> int:
    """The nearest-rank percentile of an ascending list (a value that occurs in the list)."""
    rank = max(1, -(-len(sorted_values) * percent // 100))  # ceil(n * p / 100), at least 1
    return sorted_values[int(rank) - 1]


def length_stats(lengths: list[int], limit: int) -> dict[str, Any]:
    """Count, nearest-rank percentiles and maximum of token lengths, and how many exceed `limit`."""
    ordered = sorted(lengths)
    stats: dict[str, Any] = {"count": len(ordered), "limit": limit, "truncated": sum(1 for n in ordered if n > limit)}
    if ordered:
        stats.update(
            p50=nearest_rank(ordered, 50), p90=nearest_rank(ordered, 90), p99=nearest_rank(ordered, 99), max=ordered[-1]
        )
    return stats
