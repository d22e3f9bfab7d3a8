import random

import pytest

from diffusion_dpo.labeling.pairing import (
    Pair,
    agreement,
    candidate_pairs,
    candidate_seed,
    columns,
    make_pairs,
    prompt_rng,
    relabel,
)

SCORES = [0.2, 0.9, 0.5, 0.6]  # candidate 1 best, candidate 0 worst


def test_best_worst_by_hand():
    """Best is candidate 1 (0.9), worst candidate 0 (0.2): one pair, margin 0.7."""
    pairs, dropped = make_pairs(SCORES, "best_worst")
    assert dropped == 0
    assert [(p.winner, p.loser) for p in pairs] == [(1, 0)]
    assert pairs[0].margin == pytest.approx(0.7)


def test_all_every_unordered_pair_once_higher_score_wins():
    """K=4 -> 6 pairs; for {i, j} the higher-scored is the winner:
    {0,1}->(1,0) .7  {0,2}->(2,0) .3  {0,3}->(3,0) .4  {1,2}->(1,2) .4  {1,3}->(1,3) .3  {2,3}->(3,2) .1"""
    pairs, dropped = make_pairs(SCORES, "all")
    assert dropped == 0
    assert [(p.winner, p.loser) for p in pairs] == [(1, 0), (2, 0), (3, 0), (1, 2), (1, 3), (3, 2)]
    assert [round(p.margin, 6) for p in pairs] == [0.7, 0.3, 0.4, 0.4, 0.3, 0.1]
    unordered = {frozenset((p.winner, p.loser)) for p in pairs}
    assert len(unordered) == 6  # each unordered pair once


def test_min_margin_drops_and_counts():
    """min_margin 0.35 keeps margins .7, .4, .4 of the six above and drops .3, .3, .1."""
    pairs, dropped = make_pairs(SCORES, "all", min_margin=0.35)
    assert [(p.winner, p.loser) for p in pairs] == [(1, 0), (3, 0), (1, 2)]
    assert dropped == 3
    # best_worst with a margin the best pair cannot reach: nothing kept, one dropped
    assert make_pairs(SCORES, "best_worst", min_margin=0.8) == ([], 1)
    # a margin exactly at the threshold is kept
    assert make_pairs([0.0, 0.25], "best_worst", min_margin=0.25)[0] == [Pair(1, 0, 0.25)]


def test_exact_ties_are_dropped_even_without_min_margin():
    """All scores equal: best_worst pairs the first with the last (distinct), margin 0 -> dropped."""
    assert candidate_pairs([0.5, 0.5, 0.5], "best_worst") == [Pair(0, 2, 0.0)]
    assert make_pairs([0.5, 0.5, 0.5], "best_worst") == ([], 1)
    pairs, dropped = make_pairs([1.0, 1.0, 0.0], "all")  # {0,1} tie dropped; {0,2}, {1,2} kept
    assert [(p.winner, p.loser) for p in pairs] == [(0, 2), (1, 2)] and dropped == 1


def test_random_is_seeded_distinct_and_oriented():
    seen = set()
    for seed in range(40):
        (p,) = candidate_pairs(SCORES, "random", random.Random(seed))
        assert p.winner != p.loser and SCORES[p.winner] > SCORES[p.loser]
        assert candidate_pairs(SCORES, "random", random.Random(seed)) == [p]  # same rng seed, same pair
        seen.add(frozenset((p.winner, p.loser)))
    assert len(seen) == 6  # 40 draws reach all 6 unordered pairs
    with pytest.raises(ValueError, match="rng"):
        candidate_pairs(SCORES, "random")


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        make_pairs([0.3], "best_worst")
    with pytest.raises(ValueError, match="unknown pairing"):
        make_pairs(SCORES, "best-worst")


def test_columns_and_relabel():
    p = Pair(winner=3, loser=1, margin=0.2)
    assert columns(p, winner_first=True) == (3, 1, 1.0, 0.0)
    assert columns(p, winner_first=False) == (1, 3, 0.0, 1.0)
    assert relabel(0.7, 0.2) == (1.0, 0.0)
    assert relabel(0.2, 0.7) == (0.0, 1.0)
    assert relabel(0.4, 0.4) == (0.5, 0.5)  # equal scores: tie
    assert relabel(0.40, 0.45, min_margin=0.1) == (0.5, 0.5)  # margin .05 < .1: tie
    assert relabel(0.40, 0.55, min_margin=0.1) == (0.0, 1.0)


def test_agreement_by_hand():
    """Five pairs: two agree, one disagrees, one original tie, one new tie -> 2 / 3 compared."""
    original = [(1, 0), (0, 1), (1, 0), (0.5, 0.5), (1, 0)]
    new = [(1, 0), (0, 1), (0, 1), (1, 0), (0.5, 0.5)]
    got = agreement(original, new)
    assert got == {"pairs": 5, "original_ties": 1, "new_ties": 1, "compared": 3, "agree": 2,
                   "agreement": pytest.approx(2 / 3)}
    assert agreement([(0.5, 0.5)], [(1, 0)])["agreement"] is None


def test_seeds_are_deterministic_distinct_and_fit_int64():
    seeds = {candidate_seed(s, p, k) for s in (0, 1) for p in range(50) for k in range(4)}
    assert len(seeds) == 400
    assert all(0 <= x < 2**63 for x in seeds)
    assert candidate_seed(3, 7, 2) == candidate_seed(3, 7, 2)
    assert prompt_rng(0, 5).random() == prompt_rng(0, 5).random() != prompt_rng(0, 6).random()
