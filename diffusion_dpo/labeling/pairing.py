"""Turning the scores of K candidates for one prompt into preference pairs: pure functions, no models.

    pairs, dropped = make_pairs([0.2, 0.9, 0.5], "best_worst", min_margin=0.1)
    # -> [Pair(winner=1, loser=0, margin=0.7)], 0

Strategies (K = number of candidates):

- ``best_worst``: one pair per prompt, the highest-scored candidate against the lowest-scored one (the
  setting of the Diffusion-DPO paper's AI-feedback experiment).
- ``all``: every unordered pair of candidates once, the higher-scored one as winner: K(K-1)/2 pairs.
- ``random``: one pair per prompt, two distinct candidates drawn with ``rng``; the higher-scored wins.

A pair is kept when its margin (winner score - loser score) is at least ``min_margin`` and above zero:
an exact tie says nothing about preference, so it is dropped even with ``min_margin=0``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

STRATEGIES = ("best_worst", "all", "random")


@dataclass(frozen=True)
class Pair:
    """Candidate indices of the winner and the loser, and ``margin = score[winner] - score[loser] >= 0``."""

    winner: int
    loser: int
    margin: float


def _ordered(scores: Sequence[float], i: int, j: int) -> Pair:
    """The pair {i, j} with the higher-scored candidate as winner (``i`` on a tie)."""
    if scores[j] > scores[i]:
        i, j = j, i
    return Pair(winner=i, loser=j, margin=float(scores[i]) - float(scores[j]))


def candidate_pairs(scores: Sequence[float], strategy: str, rng: random.Random | None = None) -> list[Pair]:
    """All pairs a strategy proposes for one prompt, before the margin filter.

    ``best_worst`` breaks ties by index: the first of the best candidates against the last of the worst,
    so the two are distinct even when every score is equal (the pair then has margin 0).
    """
    k = len(scores)
    if k < 2:
        raise ValueError(f"need at least 2 candidates to form a pair, got {k}")
    if strategy == "best_worst":
        best = max(range(k), key=lambda i: (scores[i], -i))
        worst = min(range(k), key=lambda i: (scores[i], -i))
        return [Pair(winner=best, loser=worst, margin=float(scores[best]) - float(scores[worst]))]
    if strategy == "all":
        return [_ordered(scores, i, j) for i in range(k) for j in range(i + 1, k)]
    if strategy == "random":
        if rng is None:
            raise ValueError("the 'random' strategy needs an rng")
        i, j = rng.sample(range(k), 2)
        return [_ordered(scores, i, j)]
    raise ValueError(f"unknown pairing strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


def make_pairs(scores: Sequence[float], strategy: str = "best_worst", min_margin: float = 0.0,
               rng: random.Random | None = None) -> tuple[list[Pair], int]:
    """The pairs of one prompt that pass the margin filter, and how many were dropped by it."""
    proposed = candidate_pairs(scores, strategy, rng)
    kept = [p for p in proposed if p.margin > 0 and p.margin >= min_margin]
    return kept, len(proposed) - len(kept)


def prompt_rng(seed: int, prompt_index: int) -> random.Random:
    """The generator of one prompt's random choices (random pairing, winner column), from (seed, prompt)."""
    state = np.random.SeedSequence([seed, prompt_index, 0x5EED]).generate_state(2, dtype=np.uint32)
    return random.Random(int(state[0]) << 32 | int(state[1]))


def candidate_seed(seed: int, prompt_index: int, candidate_index: int) -> int:
    """The sampling seed of candidate ``candidate_index`` of prompt ``prompt_index`` (a 63-bit int).

    Mixed through numpy's SeedSequence so that nearby (seed, prompt, candidate) triples give unrelated
    noise and two runs with different ``seed`` share no candidate.
    """
    state = np.random.SeedSequence([seed, prompt_index, candidate_index]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def columns(pair: Pair, winner_first: bool) -> tuple[int, int, float, float]:
    """(candidate in column 0, candidate in column 1, label_0, label_1) for a kept pair."""
    if winner_first:
        return pair.winner, pair.loser, 1.0, 0.0
    return pair.loser, pair.winner, 0.0, 1.0


def relabel(score_0: float, score_1: float, min_margin: float = 0.0) -> tuple[float, float]:
    """(label_0, label_1) by the scorer's preference: 0.5/0.5 when ``|score_0 - score_1| < min_margin``
    or the scores are equal, else 1 for the higher-scored column."""
    margin = abs(score_0 - score_1)
    if margin == 0 or margin < min_margin:
        return 0.5, 0.5
    return (1.0, 0.0) if score_0 > score_1 else (0.0, 1.0)


def agreement(original: Sequence[tuple[float, float]], new: Sequence[tuple[float, float]]) -> dict:
    """How often two labelings of the same pairs name the same winner; ties on either side are excluded.

    Returns counts ``pairs``, ``original_ties``, ``new_ties``, ``compared`` (pairs with a winner on both
    sides), ``agree`` and ``agreement = agree / compared`` (None when nothing was compared).
    """
    if len(original) != len(new):
        raise ValueError(f"{len(original)} original labels but {len(new)} new ones")
    counts = {"pairs": len(new), "original_ties": 0, "new_ties": 0, "compared": 0, "agree": 0}
    for (o0, o1), (n0, n1) in zip(original, new):
        original_tie, new_tie = o0 == o1, n0 == n1
        counts["original_ties"] += original_tie
        counts["new_ties"] += new_tie
        if original_tie or new_tie:
            continue
        counts["compared"] += 1
        counts["agree"] += (o0 > o1) == (n0 > n1)
    counts["agreement"] = counts["agree"] / counts["compared"] if counts["compared"] else None
    return counts
