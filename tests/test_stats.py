"""Bootstrap intervals, paired differences, Cohen's kappa, t intervals and win rates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vqabench.judges import JudgeItem
from vqabench.judges.exact import ExactJudge
from vqabench.stats import (
    bootstrap_ci,
    cohen_kappa,
    mcnemar_exact,
    mean_ci_across_seeds,
    paired_bootstrap,
    ratio_ci,
    spread,
    student_t_quantile,
    wilson_interval,
    win_rate,
)


def test_bootstrap_intervals_cover_a_known_mean_in_a_seeded_simulation():
    rng = np.random.default_rng(1234)
    true_mean = 0.3
    covered = 0
    for trial in range(100):
        sample = (rng.random(200) < true_mean).astype(float)  # per-item EM of a 30% model
        mean, low, high = bootstrap_ci(sample, n_resamples=1000, seed=trial)
        assert low <= mean <= high
        covered += low <= true_mean <= high
    assert 90 <= covered <= 100


def test_bootstrap_is_reproducible_and_shrinks_with_more_items():
    rng = np.random.default_rng(7)
    small, large = rng.random(50), rng.random(5000)
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci(small, seed=3) != bootstrap_ci(small, seed=4)

    def width(ci):
        return ci.high - ci.low

    assert width(bootstrap_ci(large)) < width(bootstrap_ci(small)) / 5
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_ci([])


def test_paired_bootstrap_sees_a_small_consistent_gain_that_unpaired_intervals_miss():
    rng = np.random.default_rng(0)
    difficulty = rng.random(300)  # items differ a lot, methods differ a little
    sft = difficulty
    orpo = difficulty + 0.03 + rng.normal(0, 0.02, 300)
    result = paired_bootstrap(orpo, sft, seed=0)
    assert result.mean_diff == pytest.approx(float(np.mean(orpo - sft)))
    assert 0 < result.low < result.mean_diff < result.high
    assert result.p_value < 0.01 and result.n == 300
    _, _, sft_high = bootstrap_ci(sft)
    _, orpo_low, _ = bootstrap_ci(orpo)
    assert orpo_low < sft_high  # the separate intervals overlap
    flipped = paired_bootstrap(sft, orpo, seed=0)
    assert flipped.mean_diff == pytest.approx(-result.mean_diff)
    assert flipped.p_value == result.p_value


def test_paired_bootstrap_finds_nothing_between_equal_methods():
    rng = np.random.default_rng(5)
    a, b = (rng.random(400) < 0.5).astype(float), (rng.random(400) < 0.5).astype(float)
    result = paired_bootstrap(a, b, seed=1)
    assert result.low < 0 < result.high and result.p_value > 0.05
    assert paired_bootstrap([1.0, 0.0], [1.0, 0.0]).p_value == 1.0
    with pytest.raises(ValueError, match="one value per item"):
        paired_bootstrap([1.0, 0.0], [1.0])


def test_cohen_kappa_on_a_hand_computed_table():
    # judge\EM    correct  incorrect
    # correct        20        5
    # incorrect      10       15
    # p_o = 35/50 = 0.7; p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5 = 0.4
    judge = [1] * 20 + [1] * 5 + [0] * 10 + [0] * 15
    em = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
    assert cohen_kappa(judge, em) == pytest.approx(0.4)
    assert cohen_kappa([True, False, True], [True, False, True]) == pytest.approx(1.0)
    assert cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert cohen_kappa([1, 1, 1], [1, 1, 1]) is None  # chance agreement is 1: undefined


def test_student_t_quantiles_match_published_tables():
    for df, expected in [(1, 12.7062047), (2, 4.30265273), (4, 2.77644511), (10, 2.22813885), (30, 2.04227246)]:
        assert student_t_quantile(0.975, df) == pytest.approx(expected, rel=1e-7)
    assert student_t_quantile(0.025, 4) == pytest.approx(-2.77644511, rel=1e-7)
    assert student_t_quantile(0.95, 1000) == pytest.approx(1.64637934, rel=1e-6)


def test_mean_ci_across_seeds_is_a_t_interval():
    mean, low, high = mean_ci_across_seeds([1.0, 2.0, 3.0])
    half = 4.30265273 * 1.0 / math.sqrt(3)
    assert mean == 2.0
    assert (low, high) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    assert mean_ci_across_seeds([0.4]) == (0.4, None, None)


def items(answers):
    return [JudgeItem(f"question {i}", "red", answer) for i, answer in enumerate(answers)]


def test_win_rate_cancels_a_judge_that_always_prefers_the_first_answer():
    def always_first(question, reference, first, second):
        return "A"

    result = win_rate(always_first, items(["red", "blue"]), items(["blue", "red"]))
    assert (result.a_wins, result.b_wins, result.ties) == (0, 0, 2)
    assert result.first_position_rate == 1.0 and result.a_score == 0.5


def test_win_rate_keeps_real_preferences_and_ties_position_biased_guesses():
    def biased(question, reference, first, second):
        first_right, second_right = first == reference, second == reference
        if first_right != second_right:
            return "A" if first_right else "B"
        return "A"  # when it cannot tell, it picks the first answer shown

    a = items(["red", "red", "blue", "green"])
    b = items(["blue", "red", "red", "blue"])
    result = win_rate(biased, a, b)
    assert result.outcomes == ["A", "tie", "B", "tie"]
    assert (result.a_wins, result.b_wins, result.ties, result.n) == (1, 1, 2, 4)
    assert result.a_rate == 0.25 and result.tie_rate == 0.5


def test_win_rate_counts_unparseable_replies_as_ties_and_checks_alignment():
    def confused(question, reference, first, second):
        return "unparseable"

    result = win_rate(confused, items(["red"]), items(["blue"]))
    assert (result.ties, result.unparseable, result.first_position_rate) == (1, 1, None)
    with pytest.raises(ValueError, match="item 0"):
        win_rate(confused, items(["red"]), [JudgeItem("another question", "red", "red")])


def test_win_rate_with_a_real_judge_compare():
    result = win_rate(ExactJudge().compare, items(["red", "blue", "red"]), items(["blue", "red", "red"]))
    assert result.outcomes == ["A", "B", "tie"]


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_intervals_match_newcombe_1998(successes, n, low, high):
    # Newcombe RG (1998), "Two-sided confidence intervals for the single proportion: comparison
    # of seven methods", Statistics in Medicine 17:857-872: method 3 (Wilson score, no continuity
    # correction) on the paper's four worked examples, to the four decimals printed there.
    interval = wilson_interval(successes, n)
    assert interval.mean == pytest.approx(successes / n)
    assert interval.low == pytest.approx(low, abs=5e-5)
    assert interval.high == pytest.approx(high, abs=5e-5)


def test_wilson_interval_is_not_zero_width_at_zero_or_one():
    assert wilson_interval(40, 40).low < 0.95 < wilson_interval(40, 40).high == pytest.approx(1.0)
    assert wilson_interval(0, 40).high > 0.05
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)


def test_mcnemar_exact_matches_fagerland_2013_example():
    # Fagerland MW, Lydersen S, Laake P (2013), "The McNemar test for binary matched-pairs data:
    # mid-p and asymptotic are better than exact conditional", BMC Medical Research Methodology
    # 13:91, worked example (airway hyper-responsiveness before/after stem cell transplantation,
    # n = 21 children, discordant pairs 1 and 7): exact conditional p = 0.070 (= 18/256).
    before = [1] * 1 + [0] * 7 + [1] * 1 + [0] * 12
    after = [0] * 1 + [1] * 7 + [1] * 1 + [0] * 12
    result = mcnemar_exact(before, after, min_items=1)
    assert (result.n, result.a_only, result.b_only) == (21, 1, 7)
    assert result.p_value == pytest.approx(18 / 256)
    assert round(result.p_value, 3) == 0.070


def test_mcnemar_gives_the_sign_test_value_where_the_bootstrap_overstates():
    # The review's case: 5 items, all better. The exact sign test gives 2 * 0.5**5 = 0.0625;
    # the paired bootstrap said p = 0.001.
    better, worse = [1] * 5, [0] * 5
    assert mcnemar_exact(better, worse, min_items=1).p_value == pytest.approx(0.0625)
    assert paired_bootstrap(better, worse).p_value < 0.01


def test_mcnemar_says_too_few_items_below_30_pairs_and_counts_only_discordant_pairs():
    assert mcnemar_exact([1] * 29, [0] * 29).too_few
    same = mcnemar_exact([1, 0] * 20, [1, 0] * 20)
    assert not same.too_few and same.p_value == 1.0
    with pytest.raises(ValueError, match="binary"):
        mcnemar_exact([0.5] * 40, [1] * 40)


def test_spread_reports_median_sigma_range_and_cv():
    s = spread([10.0, 12.0, 11.0, 30.0])
    assert (s.median, s.low, s.high, s.n) == (11.5, 10.0, 30.0, 4)
    assert s.std == pytest.approx(float(np.std([10, 12, 11, 30], ddof=1)))
    assert s.cv == pytest.approx(s.std / 15.75)
    assert spread([3.0]).cv is None


TRUE_RATIO = 1.3


def _probe_rounds(rng: np.random.Generator, noise: float, rounds: int = 3, steps: int = 20):
    """A probe's interleaved rounds: a machine-wide factor per round that hits both methods, and
    `noise`: a slowdown of each method's block of steps in a round (it runs at its own moment)."""
    common = rng.normal(0.0, 0.05, (rounds, 1))
    a = (
        TRUE_RATIO
        * 40.0
        * np.exp(common + rng.normal(0.0, noise, (rounds, 1)) + rng.normal(0.0, 0.05, (rounds, steps)))
    )
    b = 40.0 * np.exp(common + rng.normal(0.0, noise, (rounds, 1)) + rng.normal(0.0, 0.05, (rounds, steps)))
    return list(a), list(b)


def _run_epochs(rng: np.random.Generator, noise: float, epochs: int = 3, steps: int = 50):
    """Two runs one after the other, `noise` a slowdown per epoch; the steps' relative spread is 10%."""
    a = TRUE_RATIO * 50.0 * np.exp(rng.normal(0.0, noise, (epochs, 1)) + rng.normal(0.0, 0.1, (epochs, steps)))
    b = 50.0 * np.exp(rng.normal(0.0, noise, (epochs, 1)) + rng.normal(0.0, 0.1, (epochs, steps)))
    return list(a), list(b)


@pytest.mark.parametrize("noise", [0.0, 0.02, 0.05])
def test_timing_ratio_intervals_hold_their_95_percent_when_rounds_and_epochs_vary(noise):
    """Seeded simulation: 1,000 probes (3 rounds of 20 steps, median) and 1,000 pairs of runs (3
    steady epochs of 50 steps, mean) per noise level. Monte Carlo error of a coverage near 0.95:
    sqrt(0.95 * 0.05 / 1000) = 0.007, so 0.93 is about 3 standard errors below the nominal 95%.
    The old step bootstrap, pooled over rounds and epochs, covers 0.55 (probe) and 0.43 (runs) at 5%."""
    rng = np.random.default_rng(2024)
    experiments = 1000
    probe = run = 0
    for _ in range(experiments):
        a, b = _probe_rounds(rng, noise)
        interval = ratio_ci(a, b, "median", paired=True)
        probe += interval.low <= TRUE_RATIO <= interval.high
        a, b = _run_epochs(rng, noise)
        interval = ratio_ci(a, b, "mean")
        run += interval.low <= TRUE_RATIO <= interval.high
    assert probe / experiments >= 0.93 and run / experiments >= 0.93, (probe / experiments, run / experiments)


def test_a_timing_ratio_has_no_interval_below_two_units_and_pairs_need_equal_rounds():
    rng = np.random.default_rng(3)
    one = ratio_ci([rng.normal(60, 2, 40)], [rng.normal(50, 2, 40)])
    assert one.low is None and one.high is None and one.mean == pytest.approx(1.2, abs=0.02)
    with pytest.raises(ValueError, match="paired ratio needs one unit"):
        ratio_ci([[1.0], [2.0]], [[1.0]], paired=True)
    with pytest.raises(ValueError, match="statistic"):
        ratio_ci([[1.0]], [[1.0]], "mode")


def test_a_ratio_interval_covers_one_for_the_same_work_and_not_for_more():
    rng = np.random.default_rng(0)
    a, b = list(rng.normal(50, 5, (4, 50))), list(rng.normal(50, 5, (4, 50)))
    same = ratio_ci(a, b)
    assert same.low < 1.0 < same.high
    slower = ratio_ci([x * 1.3 for x in a], b)
    assert slower.low > 1.2 and slower.mean == pytest.approx(1.3 * np.mean(a) / np.mean(b), rel=1e-3)


def test_a_median_ratio_is_not_moved_by_a_few_disturbed_steps():
    rng = np.random.default_rng(1)
    a, b = rng.normal(60, 2, (3, 20)), rng.normal(50, 2, (3, 20))
    a[0, :4] = 400.0  # four steps of one round that another process slowed down
    median = ratio_ci(list(a), list(b), "median", paired=True)
    assert median.low < 1.2 < median.high and median.high - median.low < 0.15
    assert ratio_ci(list(a), list(b), "mean", paired=True).mean > 1.4
