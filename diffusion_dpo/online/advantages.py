"""Advantages of online reward tuning: each image's reward normalised within its prompt's group.

GRPO (Shao et al., "DeepSeekMath", 2024, sec. 4.1.2, outcome supervision) and Flow-GRPO (Liu et al. 2025,
eq. 4) set A_i = (r_i - mean(group)) / std(group) over the G images of one prompt, so the model competes
with itself on each prompt instead of learning which prompts score high; DDPO's per-prompt stat tracker
(Black et al. 2023, sec. 5) does the same. ``scope="batch"`` normalises over the whole batch instead.

``scope="group_batch_std"`` is what flow_grpo's code runs (its PerPromptStatTracker with global_std=True):
A_i = (r_i - mean(group)) / (std(batch) + 1e-4). A group whose images score almost alike then gets small
advantages instead of ones blown up to unit size by dividing by its own tiny std, so near-ties stop
steering the update as strongly as real differences do.

The per-group and batch normalisations are :func:`diffusion_dpo.rl.masked_whiten` (population std, eps
inside the square root: (r - mean) / sqrt(var + eps)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from diffusion_dpo.errors import InputError
from diffusion_dpo.rl import masked_whiten

Tensor = torch.Tensor

SCOPES = ("group", "batch", "group_batch_std")
BATCH_STD_EPS = 1e-4  # flow_grpo's: added to the batch std, outside the square root


@dataclass
class Advantages:
    """values: [N] fp32; zero_spread_groups: how many groups had all rewards equal (their advantages are 0:
    such a group says nothing about which of its images is better); groups: how many groups there were."""

    values: Tensor
    zero_spread_groups: int
    groups: int


def group_advantages(rewards: Tensor, group_keys: Sequence[Hashable], *, scope: str = "group",
                     eps: float = 1e-8, batch_std: float | None = None) -> Advantages:
    """Normalise ``rewards`` [N] within groups of equal ``group_keys`` (N keys, e.g. the prompts or prompt
    indices), or over the whole batch with ``scope="batch"`` (the keys are then ignored).

        A_i = (r_i - mean_g) / sqrt(var_g + eps)     (population variance of the group g of image i)

    A group whose rewards are all equal (including a group of one) gets advantage exactly 0 and is counted
    in ``zero_spread_groups``. Worked example (used by the tests): rewards (1, 2, 3, 5, 5), keys
    (a, a, a, b, b): group a has mean 2, var 2/3 -> (-1.224745, 0, 1.224745); group b has zero spread ->
    (0, 0), zero_spread_groups = 1.

    ``scope="group_batch_std"``: A_i = (r_i - mean_g) / (batch_std + 1e-4), with ``batch_std`` the population
    std of every process's rewards (given by a caller that gathered them; None: the std of ``rewards``).
    Same example: batch mean 3.2, population variance 12.8/5 = 2.56, std 1.6 -> group a: (-1, 0, 1) / 1.6001 =
    (-0.624961, 0, 0.624961),
    group b (0, 0) and still counted as zero spread.
    """
    if scope not in SCOPES:
        raise InputError(f"advantage scope {scope!r} is not one of {SCOPES}")
    if rewards.ndim != 1:
        raise InputError(f"rewards must be [N], got shape {tuple(rewards.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise InputError(f"rewards at positions {bad} are not finite")
    rewards = rewards.float()
    if scope == "batch":
        groups = [torch.arange(len(rewards))]
    else:  # group, group_batch_std
        if len(group_keys) != len(rewards):
            raise InputError(f"{len(group_keys)} group keys for {len(rewards)} rewards; expected one per "
                             "reward")
        members: dict[Hashable, list[int]] = {}
        for i, key in enumerate(group_keys):
            members.setdefault(key, []).append(i)
        groups = [torch.tensor(idx) for idx in members.values()]
    if scope == "group_batch_std" and batch_std is None:
        batch_std = float(rewards.std(unbiased=False)) if len(rewards) > 1 else 0.0
    values = torch.zeros_like(rewards)
    zero_spread = 0
    for idx in groups:
        r = rewards[idx]
        if bool((r == r[0]).all()):
            zero_spread += 1  # left at exactly 0, not at rounding noise of (r - mean)
            continue
        if scope == "group_batch_std":
            values[idx] = (r - r.mean()) / (batch_std + BATCH_STD_EPS)
        else:
            values[idx] = masked_whiten(r, torch.ones_like(r), eps=eps)
    return Advantages(values, zero_spread, len(groups))


def weighted_advantages(per_reward: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """sum_k w_k A_k [N]: several rewards each normalised on its own (``per_reward``: name -> advantages [N])
    before weighting, so a reward on a large scale (PickScore ~20) does not drown one on a small scale (an OCR
    accuracy in [0, 1]) as it does in the advantages of the weighted sum. Example: a (100, 200) and b (0.3,
    0.1) with weights 1 and 1 in one group: the weighted sum (100.3, 200.1) gives (-1, 1); normalised each,
    a gives (-1, 1) and b (1, -1), so the sum is (0, 0): the two rewards disagree equally."""
    missing = sorted(set(per_reward) - set(weights))
    if missing:
        raise InputError(f"no weight for reward(s) {', '.join(missing)}")
    return sum(weights[k] * values for k, values in per_reward.items())


def tied_groups(rewards: list[Tensor], group_size: int) -> int:
    """How many groups of ``group_size`` consecutive images have equal values in every one of ``rewards``
    ([N] each): the groups that say nothing about which image is better under any of them."""
    tied = torch.stack([(r.view(-1, group_size) == r.view(-1, group_size)[:, :1]).all(dim=1) for r in rewards])
    return int(tied.all(dim=0).sum())
