"""How sure a number is: intervals, paired tests, Cohen's kappa, win rates, timing spreads.

Host-side (no torch): numpy, and scipy.stats for Student's t and the exact tests the field uses (McNemar's
exact test as a binomial test on the discordant pairs, Wilson score intervals). Proportions
(EM, judge verdicts) get Wilson intervals and McNemar p-values; continuous per-item scores
(F1) get seeded bootstrap intervals (the same inputs give the same intervals on every
machine); timing ratios get t-intervals over the units that vary (probe rounds, epochs).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

DEFAULT_RESAMPLES = 2000
#: Fewer paired items than this: a comparison says "too few items" instead of a p-value.
MIN_PAIRED_ITEMS = 30
#: Fewer units (probe rounds, steady epochs of a run) than this: a timing ratio has no interval.
MIN_TIMING_UNITS = 2
_MAX_RESAMPLE_CELLS = 4_000_000  # resample in chunks so memory stays small for big n


class Interval(NamedTuple):
    """A point estimate with the bounds of its confidence interval (None when undefined)."""

    mean: float
    low: float | None
    high: float | None


@dataclass(frozen=True)
class PairedDifference:
    """Mean of a - b over the same items, its bootstrap interval and a bootstrap p-value."""

    mean_diff: float
    low: float
    high: float
    p_value: float  # two-sided; see paired_bootstrap
    n: int


def _as_values(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{what} needs at least one value; got none.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} got a NaN or infinite value; every value must be a finite number.")
    return array


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level is {level!r}; a confidence level must be between 0 and 1 (e.g. 0.95).")


def _resampled_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of `n_resamples` bootstrap resamples (items drawn with replacement)."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples is {n_resamples!r}; it must be at least 1.")
    rng = np.random.default_rng(seed)
    n = values.size
    chunk = max(1, _MAX_RESAMPLE_CELLS // n)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    return means


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95
) -> Interval:
    """The mean and its percentile-bootstrap interval (e.g. per-item EM of 0/1 values)."""
    _check_level(level)
    array = _as_values(values, "bootstrap_ci")
    means = _resampled_means(array, n_resamples, seed)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(array.mean()), float(low), float(high))


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> PairedDifference:
    """Is method a better than b on the same items? Resamples items, keeping pairs together.

    The p-value is twice the share of resampled mean differences that are zero or on the
    other side of zero from the observed difference, with the usual +1 correction
    ((count + 1) / (n_resamples + 1)) so it is never exactly 0, capped at 1. An observed
    difference of exactly 0 has p = 1.
    """
    _check_level(level)
    first = _as_values(a, "paired_bootstrap")
    second = _as_values(b, "paired_bootstrap")
    if first.size != second.size:
        raise ValueError(
            f"paired_bootstrap got {first.size} and {second.size} values; "
            "a paired comparison needs one value per item from each method."
        )
    diffs = first - second
    observed = float(diffs.mean())
    means = _resampled_means(diffs, n_resamples, seed)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    if observed == 0.0:
        p_value = 1.0
    else:
        other_side = int(np.count_nonzero(means <= 0.0) if observed > 0 else np.count_nonzero(means >= 0.0))
        p_value = min(1.0, 2.0 * (other_side + 1) / (n_resamples + 1))
    return PairedDifference(observed, float(low), float(high), p_value, int(diffs.size))


def cohen_kappa(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> float | None:
    """Agreement of two raters beyond chance, (p_o - p_e) / (1 - p_e); None when undefined.

    Labels are usually binary (the judge's CORRECT vs exact match) but any categories
    work. Kappa is undefined (None) when both raters give one and the same label to
    every item: chance agreement is then 1.
    """
    if len(labels_a) != len(labels_b):
        raise ValueError(
            f"cohen_kappa got {len(labels_a)} and {len(labels_b)} labels; both raters must label the same items."
        )
    n = len(labels_a)
    if n == 0:
        raise ValueError("cohen_kappa needs at least one labelled item; got none.")
    observed = sum(1 for x, y in zip(labels_a, labels_b, strict=True) if x == y) / n
    counts_a, counts_b = Counter(labels_a), Counter(labels_b)
    expected = sum(counts_a[label] * counts_b.get(label, 0) for label in counts_a) / (n * n)
    if math.isclose(expected, 1.0):
        return None
    return (observed - expected) / (1.0 - expected)


@functools.lru_cache(maxsize=256)
def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p for Student's t with `df` degrees of freedom (scipy.stats.t).

    Cached: intervals ask for the same few (level, degrees of freedom) again and again."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p is {p!r}; a probability strictly between 0 and 1 is needed.")
    from scipy.stats import t

    return float(t.ppf(p, df))


def mean_ci_across_seeds(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of one score over several seeds with a Student-t interval; bounds None for one seed."""
    _check_level(level)
    array = _as_values(values, "mean_ci_across_seeds")
    mean = float(array.mean())
    if array.size < 2:
        return Interval(mean, None, None)
    half_width = (
        student_t_quantile(1.0 - (1.0 - level) / 2.0, array.size - 1) * float(array.std(ddof=1)) / math.sqrt(array.size)
    )
    return Interval(mean, mean - half_width, mean + half_width)


@dataclass
class WinRate:
    """Pairwise outcome of answers A and B to the same items, each pair asked in both orders.

    A wins an item only when both orders pick A; disagreeing orders, ties and
    unparseable replies make a tie, which cancels a judge's position bias.
    """

    n: int
    a_wins: int
    b_wins: int
    ties: int
    unparseable: int  # items where at least one order's reply was unparseable (counted in ties)
    first_position_rate: float | None  # share of decisive single asks that picked the first answer
    outcomes: list[str] = field(default_factory=list)  # per item: "A", "B" or "tie"

    @property
    def a_rate(self) -> float:
        return self.a_wins / self.n if self.n else 0.0

    @property
    def b_rate(self) -> float:
        return self.b_wins / self.n if self.n else 0.0

    @property
    def tie_rate(self) -> float:
        return self.ties / self.n if self.n else 0.0

    @property
    def a_score(self) -> float:
        """A's wins plus half its ties, per item (0.5 = even)."""
        return (self.a_wins + 0.5 * self.ties) / self.n if self.n else 0.5


def _triple(item: Any) -> tuple[str, str, str]:
    if isinstance(item, (tuple, list)):
        question, reference, prediction = item
        return question, reference, prediction
    return item.question, item.reference, item.prediction


_SWAPPED = {"A": "B", "B": "A"}


def win_rate(
    compare_fn: Callable[[str, str, str, str], str], items_a: Sequence[Any], items_b: Sequence[Any]
) -> WinRate:
    """Compare two runs' answers item by item, asking A-then-B and B-then-A.

    `compare_fn(question, reference, first, second)` returns "A" (first is better), "B",
    "tie" or "unparseable"; items are (question, reference, prediction) triples or objects
    with those attributes, the two lists in the same item order.
    """
    if len(items_a) != len(items_b):
        raise ValueError(
            f"win_rate got {len(items_a)} and {len(items_b)} answers; both runs must answer the same items."
        )
    a_wins = b_wins = ties = unparseable = 0
    first_picks = decisive = 0
    outcomes = []
    for index, (item_a, item_b) in enumerate(zip(items_a, items_b, strict=True)):
        question, reference, answer_a = _triple(item_a)
        question_b, reference_b, answer_b = _triple(item_b)
        if (question, reference) != (question_b, reference_b):
            raise ValueError(
                f"win_rate item {index}: the runs answered different questions "
                f"({question!r} vs {question_b!r}); align both lists by item first."
            )
        forward = compare_fn(question, reference, answer_a, answer_b)
        backward = compare_fn(question, reference, answer_b, answer_a)
        for reply in (forward, backward):
            if reply in _SWAPPED:
                decisive += 1
                first_picks += reply == "A"
        backward_for_a = _SWAPPED.get(backward, backward)  # restate the B-first reply in A/B terms
        if "unparseable" in (forward, backward):
            unparseable += 1
        if forward == backward_for_a and forward in _SWAPPED:
            outcome = forward
            if outcome == "A":
                a_wins += 1
            else:
                b_wins += 1
        else:
            outcome = "tie"
            ties += 1
        outcomes.append(outcome)
    return WinRate(
        n=len(outcomes),
        a_wins=a_wins,
        b_wins=b_wins,
        ties=ties,
        unparseable=unparseable,
        first_position_rate=first_picks / decisive if decisive else None,
        outcomes=outcomes,
    )


def wilson_interval(successes: int, n: int, level: float = 0.95) -> Interval:
    """A proportion with its Wilson score interval (not zero-width at 0 or 1, unlike the bootstrap).

    Wilson (1927); the interval Newcombe (1998) recommends among seven for a single proportion.
    """
    _check_level(level)
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval got {successes} successes of {n}; need 0 <= successes <= n and n >= 1.")
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=level, method="wilson")
    return Interval(successes / n, float(ci.low), float(ci.high))


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of two binary scores on the same items.

    `a_only`: items a got right and b wrong; `b_only` the reverse. `p_value` is the two-sided
    exact binomial test of a_only against a_only + b_only at 1/2 (the exact conditional
    McNemar test); None when there are fewer than MIN_PAIRED_ITEMS items.
    """

    n: int
    a_only: int
    b_only: int
    p_value: float | None

    @property
    def too_few(self) -> bool:
        return self.p_value is None


def mcnemar_exact(a: Sequence[float], b: Sequence[float], min_items: int = MIN_PAIRED_ITEMS) -> McNemar:
    """Is binary score a (1 = correct) different from b on the same items? Exact McNemar test."""
    if len(a) != len(b):
        raise ValueError(
            f"mcnemar_exact got {len(a)} and {len(b)} scores; a paired test needs one score per item from each."
        )
    if any(v not in (0, 1) for v in (*a, *b)):
        raise ValueError("mcnemar_exact needs binary scores (0 or 1, e.g. exact match or a CORRECT verdict).")
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    if len(a) < min_items:
        return McNemar(len(a), a_only, b_only, None)
    discordant = a_only + b_only
    if discordant == 0:
        return McNemar(len(a), a_only, b_only, 1.0)
    from scipy.stats import binomtest

    return McNemar(len(a), a_only, b_only, float(binomtest(a_only, discordant, 0.5).pvalue))


@dataclass(frozen=True)
class Spread:
    """A timing's spread: median, σ, min and max, for hyperfine's `9.34 s ± 0.40 (8.90 … 12.50)`."""

    median: float
    std: float  # sample standard deviation; 0 for one value
    low: float
    high: float
    n: int
    mean: float

    @property
    def cv(self) -> float | None:
        """Coefficient of variation (σ / mean); None for fewer than 2 values."""
        if self.n < 2 or not self.mean:
            return None
        return self.std / self.mean


def spread(values: Sequence[float]) -> Spread:
    """Median, sample σ, min, max and mean of some timings."""
    array = _as_values(values, "spread")
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return Spread(
        float(np.median(array)), std, float(array.min()), float(array.max()), int(array.size), float(array.mean())
    )


def quantiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    """Quantiles (linear interpolation, numpy's default) of some values."""
    return [float(q) for q in np.quantile(_as_values(values, "quantiles"), qs)]


def ratio_ci(
    a_units: Sequence[Sequence[float] | np.ndarray],
    b_units: Sequence[Sequence[float] | np.ndarray],
    statistic: str = "mean",
    paired: bool = False,
    level: float = 0.95,
    min_units: int = MIN_TIMING_UNITS,
) -> Interval:
    """The ratio of a's to b's per-unit statistic (geometric means over units), with a t-interval over the units.

    Step times come in units: the rounds of a probe, the epochs of a run. What disturbs a timing
    (another process, a CPU that slows down) moves a whole unit, so steps are not independent:
    resampling single steps pooled across units ignores that and covers the true ratio far less
    often than it claims. The interval is therefore built from one statistic per unit, on the
    log scale (a ratio is a difference of logs), with Student's t:

    * ``paired=True`` (probe rounds: each round runs both methods on the same batches, one after
      the other): the per-round log-ratios log(stat(a_r) / stat(b_r)), their standard error, and
      t with rounds - 1 degrees of freedom;
    * ``paired=False`` (two runs, one after the other, epochs as units): the two runs' per-epoch
      log-statistics, a pooled-variance two-sample standard error (both runs' relative noise is
      the machine's), and t with n_a + n_b - 2 degrees of freedom.

    The ratio is exp(mean log stat(a_u) - mean log stat(b_u)): for a probe the geometric mean of
    the rounds' ratios, the interval exp(that ± t · se) around it. A t-interval rather than a
    bootstrap over units: with the probe's default 3 rounds a percentile bootstrap over rounds is
    itself far too narrow (it cannot reach t's heavy tails with 3 values), while the t-interval is
    exact when the per-unit log-ratios are normal. Below `min_units` units per side the bounds are
    None: no interval rather than a made-up one. "mean" gives the ratio of total time per step,
    "median" one that a few disturbed steps do not move.
    """
    _check_level(level)
    if statistic not in ("mean", "median"):
        raise ValueError(f"statistic is {statistic!r}; choose 'mean' or 'median'.")
    reduce = np.mean if statistic == "mean" else np.median
    firsts = [_as_values(unit, "ratio_ci") for unit in a_units]
    seconds = [_as_values(unit, "ratio_ci") for unit in b_units]
    if not firsts or not seconds:
        raise ValueError("ratio_ci needs at least one unit (a round or an epoch) of values on each side; got none.")
    if paired and len(firsts) != len(seconds):
        raise ValueError(
            f"ratio_ci got {len(firsts)} and {len(seconds)} units; "
            "a paired ratio needs one unit (round) from each side."
        )
    unit_a = np.array([float(reduce(unit)) for unit in firsts])
    unit_b = np.array([float(reduce(unit)) for unit in seconds])
    if np.any(unit_a <= 0) or np.any(unit_b <= 0):
        raise ValueError(f"ratio_ci: every unit's {statistic} must be positive (they are times).")
    log_a, log_b = np.log(unit_a), np.log(unit_b)
    centre = float(log_a.mean() - log_b.mean())  # = the mean per-round log-ratio when paired
    if min(log_a.size, log_b.size) < max(2, min_units):
        return Interval(math.exp(centre), None, None)
    if paired:
        diffs = log_a - log_b
        se = float(diffs.std(ddof=1)) / math.sqrt(diffs.size)
        df = diffs.size - 1
    else:
        df = log_a.size + log_b.size - 2
        pooled = (float(((log_a - log_a.mean()) ** 2).sum()) + float(((log_b - log_b.mean()) ** 2).sum())) / df
        se = math.sqrt(pooled * (1.0 / log_a.size + 1.0 / log_b.size))
    half = student_t_quantile(1.0 - (1.0 - level) / 2.0, df) * se
    return Interval(math.exp(centre), math.exp(centre - half), math.exp(centre + half))
