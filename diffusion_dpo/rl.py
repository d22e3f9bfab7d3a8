"""RL math both online sides share (diffusion GRPO and LLM PPO): KL estimators and masked normalisation.

References
    [k1-k3]   Schulman, "Approximating KL Divergence", 2020 (http://joschu.net/blog/kl-approx.html).

Pure functions on tensors; ``mask`` is 1.0 on entries that count and 0.0 on padding, which never leaks into
the real entries.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

KL_ESTIMATORS = ("k1", "k3")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy.

    With log r = ref_logprobs - logprobs ([k1-k3]):
        k1 = -log r                  unbiased, can be negative per token
        k3 = (r - 1) - log r         unbiased, never negative, low variance when policy ~ reference
    Both have expectation KL(p || ref) under x ~ p (the tests check it exactly on a categorical).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"KL estimator {estimator!r} is not one of {KL_ESTIMATORS}")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise the masked entries of x to mean 0 (if shift_mean) and variance 1 (population variance).

    Worked example: x = (1, 2, 3, pad) -> mean 2, variance 2/3 -> (-1.224745, 0, 1.224745, 0).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask
