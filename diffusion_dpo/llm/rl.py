"""RL math for PPO on language models: pure functions on [B, T] tensors of response tokens (the KL estimators
and masked normalisation they share with diffusion GRPO live in :mod:`diffusion_dpo.rl`).

References
    [GAE]     Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
              2016, eq. 16 (the advantage as a (gamma * lambda)-discounted sum of TD residuals).
    [Ziegler] Ziegler et al., "Fine-Tuning Language Models from Human Preferences", 2019, sec. 2.2
              (per-token KL penalty, the adaptive KL coefficient as a proportional controller).

Conventions: ``mask`` is 1.0 on real response tokens (up to and including the first EOS) and 0.0 after; every
function leaves masked positions at 0 and never lets them leak into the real ones.
"""

from __future__ import annotations

import torch

from diffusion_dpo.rl import KL_ESTIMATORS, kl_penalty, masked_mean, masked_whiten

Tensor = torch.Tensor

__all__ = ["KL_ESTIMATORS", "AdaptiveKLController", "FixedKLController", "gae", "kl_penalty", "masked_mean",
           "masked_whiten", "response_mask"]


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation ([GAE] eq. 16) over each row's response tokens.

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last real token is 0: the episode ends)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V                                  (the value targets)

    rewards, values, mask: [B, T]. Worked example (used by the tests), gamma 1, lam 0.5, one row:
        rewards (0, 0, 1), values (0.5, 0.5, 0.5)
        t=2: delta = 1 - 0.5 = 0.5                  A = 0.5
        t=1: delta = 0 + 0.5 - 0.5 = 0              A = 0 + 0.5 * 0.5 = 0.25
        t=0: delta = 0                              A = 0.5 * 0.25 = 0.125
        returns (0.625, 0.75, 1.0)

    Returns (advantages [B, T], returns [B, T]), zero where mask is 0.
    """
    rewards = rewards * mask
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def response_mask(responses: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """Which sampled tokens belong to the response: everything up to and including the first EOS.

    responses: [B, T] sampled token ids. Returns (mask [B, T] float, has_eos [B] bool).
    Example: eos 9, row (4, 9, 5) -> mask (1, 1, 0), has_eos True; row (4, 5, 6) -> (1, 1, 1), False.
    """
    is_eos = responses == eos_token_id
    # eos positions strictly before t: cumsum of is_eos, shifted right by one
    seen_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (seen_before == 0).float(), is_eos.any(dim=1)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, coef: float):
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        return None


class AdaptiveKLController:
    """[Ziegler] sec. 2.2: a proportional controller that steers the observed KL towards a target.

        e       = clip(KL / target - 1, -0.2, 0.2)
        beta   <- beta * (1 + e * n_steps / horizon)

    with n_steps the number of rollouts (episodes) behind the observed KL. Worked example (used by the tests):
    beta 0.1, target 6, horizon 10000, n_steps 1000: KL 9 -> e = clip(0.5) = 0.2 -> beta 0.1 * 1.02 = 0.102;
    KL 6.6 -> e = 0.1 -> beta 0.101; KL 3 -> e = -0.2 -> beta 0.098.
    """

    def __init__(self, coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
