"""Advantages of online reward tuning: each image's reward normalised within its prompt's group.

GRPO (Shao et al., "DeepSeekMath", 2024, sec. 4.1.2, outcome supervision) and Flow-GRPO (Liu et al. 2025,
eq. 4) set A_i = (r_i - mean(group)) / std(group) over the G images of one prompt, so the model competes
with itself on each prompt instead of learning which prompts score high; DDPO's per-prompt stat tracker
(Black et al. 2023, sec. 5) does the same. ``scope="batch"`` normalises over the whole batch instead.

The normalisation is the LLM PPO's :func:`diffusion_dpo.llm.rl.masked_whiten` (population std, eps inside
the square root: (r - mean) / sqrt(var + eps)), applied per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from diffusion_dpo.errors import InputError
from diffusion_dpo.llm.rl import masked_whiten

Tensor = torch.Tensor

SCOPES = ("group", "batch")


@dataclass
class Advantages:
    """values: [N] fp32; zero_spread_groups: how many groups had all rewards equal (their advantages are 0:
    such a group says nothing about which of its images is better); groups: how many groups there were."""

    values: Tensor
    zero_spread_groups: int
    groups: int


def group_advantages(rewards: Tensor, group_keys: Sequence[Hashable], *, scope: str = "group",
                     eps: float = 1e-8) -> Advantages:
    """Normalise ``rewards`` [N] within groups of equal ``group_keys`` (N keys, e.g. the prompts or prompt
    indices), or over the whole batch with ``scope="batch"`` (the keys are then ignored).

        A_i = (r_i - mean_g) / sqrt(var_g + eps)     (population variance of the group g of image i)

    A group whose rewards are all equal (including a group of one) gets advantage exactly 0 and is counted
    in ``zero_spread_groups``. Worked example (used by the tests): rewards (1, 2, 3, 5, 5), keys
    (a, a, a, b, b): group a has mean 2, var 2/3 -> (-1.224745, 0, 1.224745); group b has zero spread ->
    (0, 0), zero_spread_groups = 1.
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
    else:
        if len(group_keys) != len(rewards):
            raise InputError(f"{len(group_keys)} group keys for {len(rewards)} rewards; expected one per "
                             "reward")
        members: dict[Hashable, list[int]] = {}
        for i, key in enumerate(group_keys):
            members.setdefault(key, []).append(i)
        groups = [torch.tensor(idx) for idx in members.values()]
    values = torch.zeros_like(rewards)
    zero_spread = 0
    for idx in groups:
        r = rewards[idx]
        if bool((r == r[0]).all()):
            zero_spread += 1  # left at exactly 0, not at rounding noise of (r - mean)
            continue
        values[idx] = masked_whiten(r, torch.ones_like(r), eps=eps)
    return Advantages(values, zero_spread, len(groups))
