import numpy as np
import pytest
import torch

from diffusion_dpo.evaluation.stats import (
    _group_table,
    bootstrap_ci,
    paired_outcomes,
    summarize,
    win_rate,
    win_rate_ci,
)


def test_win_rate_counts_ties_half():
    """tuned [2, 2, 5, 0] vs base [1, 2, 3, 4]: win, tie, win, loss -> (1 + 0.5 + 1 + 0) / 4 = 0.625."""
    assert paired_outcomes([2, 2, 5, 0], [1, 2, 3, 4]).tolist() == [1.0, 0.5, 1.0, 0.0]
    assert win_rate([2, 2, 5, 0], [1, 2, 3, 4]) == 0.625
    assert win_rate(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])) == 0.5


def test_identical_scores_give_exactly_half_with_a_point_interval():
    scores = np.random.default_rng(0).normal(size=50)
    assert win_rate(scores, scores) == 0.5
    assert win_rate_ci(scores, scores, groups=np.arange(50) // 5) == (0.5, 0.5)


def test_bootstrap_of_two_values_by_hand():
    """Resampling [0, 1] gives means 0, 0.5, 1 with probability 1/4, 1/2, 1/4 (and the same medians), so the
    2.5% and 97.5% quantiles of the replicates are 0 and 1."""
    assert bootstrap_ci([0.0, 1.0], "mean", n_boot=4000) == (0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], "median", n_boot=4000) == (0.0, 1.0)


def test_bootstrap_median_of_three_values_by_hand():
    """Resampling [1, 2, 3]: median 1 needs at least two 1s, probability (3*2 + 1)/27 = 26%, likewise 3, so
    both tails (2.5%) sit on the extreme values: the interval is [1, 3]."""
    assert bootstrap_ci([1.0, 2.0, 3.0], "median", n_boot=2000) == (1.0, 3.0)


def test_constant_values_give_a_point_interval():
    assert bootstrap_ci([0.7] * 9, "mean") == pytest.approx((0.7, 0.7))
    assert bootstrap_ci([0.7] * 9, "median") == (0.7, 0.7)


def test_interval_matches_normal_theory_and_shrinks_with_more_prompts():
    """For n iid N(0, 1) draws the 95% interval of the mean is about 2 * 1.96 / sqrt(n) wide: 0.196 for
    n = 400, 0.098 for n = 1600 (a quarter of the prompts -> twice the width)."""
    rng = np.random.default_rng(1)
    widths = {}
    for n in (400, 1600):
        lo, hi = bootstrap_ci(rng.normal(size=n), "mean", seed=3)
        widths[n] = hi - lo
        assert widths[n] == pytest.approx(2 * 1.96 / np.sqrt(n), rel=0.12)
    assert widths[1600] / widths[400] == pytest.approx(0.5, abs=0.08)
    # The win-rate interval shrinks the same way: outcomes are Bernoulli(0.6).
    small = win_rate_ci(rng.normal(0.25, 1, 100), np.zeros(100), seed=0)
    large = win_rate_ci(rng.normal(0.25, 1, 2500), np.zeros(2500), seed=0)
    assert (large[1] - large[0]) < 0.3 * (small[1] - small[0])


def test_cluster_bootstrap_resamples_whole_groups():
    """Two prompts with 20 seeds each, all 0 for one prompt and all 1 for the other: resampling prompts gives
    means 0, 0.5 or 1 (interval [0, 1]); resampling the 40 images one by one would give about
    0.5 +- 1.96 * sqrt(0.25 / 40) = [0.345, 0.655]."""
    values = np.array([0.0] * 20 + [1.0] * 20)
    groups = np.array([7] * 20 + [3] * 20)
    assert bootstrap_ci(values, "mean", groups=groups) == (0.0, 1.0)
    lo, hi = bootstrap_ci(values, "mean")
    assert lo == pytest.approx(0.345, abs=0.04) and hi == pytest.approx(0.655, abs=0.04)


def test_group_table_pads_unequal_groups():
    table = _group_table(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), ["b", "a", "b", "c", "a"])
    expected = np.array([[1.0, 3.0], [2.0, 5.0], [4.0, np.nan]])
    np.testing.assert_array_equal(table, expected)


def test_seeded_and_reproducible():
    x = np.random.default_rng(0).normal(size=60)
    assert bootstrap_ci(x, seed=5) == bootstrap_ci(x, seed=5)
    assert bootstrap_ci(x, seed=5) != bootstrap_ci(x, seed=6)
    # The block size does not change the draws' meaning: a large n_boot still gives a sane interval.
    lo, hi = bootstrap_ci(x, n_boot=5000)
    assert lo < x.mean() < hi


def test_summarize_values():
    s = summarize([1.0, 2.0, 3.0, 10.0])
    assert s["mean"] == 4.0 and s["median"] == 2.5
    assert s["mean_ci"][0] <= 4.0 <= s["mean_ci"][1]
    assert 1.0 <= s["median_ci"][0] <= 2.5 <= s["median_ci"][1] <= 10.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="differ in length"):
        win_rate([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="statistic"):
        bootstrap_ci([1.0], "mode")
