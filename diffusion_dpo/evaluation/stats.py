"""Bootstrap confidence intervals and paired win rates (seeded, vectorised numpy).

Evaluation compares two models on the same (prompt, seed) items. The paired outcome of an item is 1 when the
tuned model scores higher, 0 when lower and 0.5 on a tie, so two identical models have a win rate of exactly
0.5. Intervals are percentile bootstrap intervals. With ``groups`` (the prompt of each item) whole groups are
resampled (a cluster bootstrap): images of one prompt under different seeds are not independent, and
resampling them one by one would make the interval too narrow.

    lo, hi = bootstrap_ci(scores, "mean", groups=prompt_ids, seed=0)
    rate = win_rate(tuned, base); lo, hi = win_rate_ci(tuned, base, groups=prompt_ids)
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Statistic = Literal["mean", "median"]
# Bootstrap replicates are drawn in blocks so that one block holds at most this many numbers (~32 MB).
_BLOCK_ELEMENTS = 4_000_000


def paired_outcomes(tuned, base) -> np.ndarray:
    """Per item 1.0 if tuned > base, 0.5 if equal, 0.0 if lower. ``tuned``, ``base``: shape [N]."""
    tuned, base = _as_1d(tuned, "tuned"), _as_1d(base, "base")
    if tuned.shape != base.shape:
        raise ValueError(f"paired scores differ in length: tuned {tuned.shape[0]}, base {base.shape[0]}")
    return (tuned > base).astype(np.float64) + 0.5 * (tuned == base)


def win_rate(tuned, base) -> float:
    """Share of items where tuned scores higher than base, ties counted half."""
    return float(paired_outcomes(tuned, base).mean())


def win_rate_ci(tuned, base, *, groups=None, n_boot: int = 2000, confidence: float = 0.95,
                seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`win_rate` (resampling whole ``groups`` when given)."""
    return bootstrap_ci(paired_outcomes(tuned, base), "mean", groups=groups, n_boot=n_boot,
                        confidence=confidence, seed=seed)


def bootstrap_ci(values, statistic: Statistic = "mean", *, groups=None, n_boot: int = 2000,
                 confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of the mean or median of ``values`` (shape [N]).

    Each replicate draws, with replacement, as many groups as there are (each item its own group when
    ``groups`` is None) and takes the statistic over all items of the drawn groups. Same inputs and seed,
    same interval.
    """
    values = _as_1d(values, "values")
    if values.size == 0:
        raise ValueError("bootstrap of an empty set of values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    table = _group_table(values, groups)  # [G, K], NaN-padded
    if statistic not in ("mean", "median"):
        raise ValueError(f"statistic must be 'mean' or 'median', got {statistic!r}")
    n_groups, width = table.shape
    # A mean only needs each group's sum and size; a median needs the items themselves.
    sums, counts = np.nansum(table, axis=1), np.sum(~np.isnan(table), axis=1)
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // (n_groups * (width if statistic == "median" else 1)))
    replicates = []
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        draw = rng.integers(0, n_groups, size=(b, n_groups))
        if statistic == "mean":
            replicates.append(sums[draw].sum(axis=1) / counts[draw].sum(axis=1))
        else:
            replicates.append(np.nanmedian(table[draw].reshape(b, -1), axis=1))
    stats = np.concatenate(replicates)
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def summarize(values, *, groups=None, n_boot: int = 2000, seed: int = 0) -> dict[str, float | list[float]]:
    """``mean``, ``median`` and their 95% intervals ``mean_ci``, ``median_ci`` as [low, high]."""
    values = _as_1d(values, "values")
    return {
        "mean": float(values.mean()),
        "mean_ci": list(bootstrap_ci(values, "mean", groups=groups, n_boot=n_boot, seed=seed)),
        "median": float(np.median(values)),
        "median_ci": list(bootstrap_ci(values, "median", groups=groups, n_boot=n_boot, seed=seed)),
    }


def _as_1d(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _group_table(values: np.ndarray, groups) -> np.ndarray:
    """[G, K] table of the values of each group (rows in order of first appearance), NaN-padded to the
    largest group, so a replicate is one fancy-indexing gather and a nan-reduction."""
    if groups is None:
        return values[:, None]
    groups = np.asarray(groups)
    if groups.shape != values.shape:
        raise ValueError(f"groups has shape {groups.shape}, values {values.shape}")
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order_of_first = np.argsort(np.argsort(first))  # group id -> row by first appearance
    rows = order_of_first[inverse.reshape(-1)]
    counts = np.bincount(rows)
    # Position of each item inside its group: rank among earlier items of the same group.
    sort = np.argsort(rows, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.empty_like(rows)
    position[sort] = np.arange(rows.size) - np.repeat(starts, counts)
    table = np.full((counts.size, counts.max()), np.nan)
    table[rows, position] = values
    return table
