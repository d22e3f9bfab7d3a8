"""DiffusionNFT: online reward tuning on the forward process (Zheng et al., "DiffusionNFT: Online Diffusion
Reinforcement with Forward Process", NVlabs 2025). Pure functions: tensors in, unreduced tensors out.

No log-probabilities and no reverse-process likelihood: images come from any sampler (the ODE by default),
each gets an optimality probability r in [0, 1] from its reward, and the model is trained with the ordinary
flow-matching objective on freshly noised copies of those images, contrasting two implicit policies built
from the current velocity v and the sampling ("old") policy's v_old (paper eq. 8-10):

    positive   v+ = beta v + (1 - beta) v_old
    negative   v- = (1 + beta) v_old - beta v

The loss pulls v+ towards the clean target for good images and v- for bad ones,

    L = [r ||x0(v+) - x0||^2 / w+ + (1 - r) ||x0(v-) - x0||^2 / w-] / beta * c

with x0(u) = x_t - t u the x0 a velocity predicts at x_t = (1 - t) x0 + t noise, and the adaptive weights
w = mean |x0(u) - x0| (no gradient, at least 1e-5) of the reference code (its "adaptive weighting"; the
paper's Appendix on loss weighting). r = 1/2 + clip(A, -c, c) / (2c) from the group-normalised advantage A
with c = adv_clip_max (5), and the reference code multiplies the loss by c (kept, so its learning rate
3e-4 carries over). Minimising it moves v so that v+ (and so v itself) heads to where the good images lie
and away from the bad ones; the old policy trails the current one (see :func:`old_policy_decay`).
"""

from __future__ import annotations

import torch

from diffusion_dpo.errors import InputError

Tensor = torch.Tensor

ADAPTIVE_WEIGHT_FLOOR = 1e-5  # the reference code's clip of the adaptive weight


def optimality(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """r = 1/2 + clip(A, -c, c) / (2c) in [0, 1] per image [N] fp32. Example: c = 5, A = (-10, -2.5, 0, 5)
    -> (0, 0.25, 0.5, 1)."""
    if adv_clip_max <= 0:
        raise InputError(f"adv_clip_max must be positive, got {adv_clip_max}")
    return (advantages.float().clamp(-adv_clip_max, adv_clip_max) / adv_clip_max / 2 + 0.5).clamp(0, 1)


def _weighted_x0_error(velocity: Tensor, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
    """mean ||x0(u) - x0||^2 / w over the latent elements [N], with the adaptive weight w (no gradient)."""
    dims = tuple(range(1, x0.ndim))
    error = xt.float() - t * velocity.float() - x0.float()
    with torch.no_grad():
        weight = error.double().abs().mean(dim=dims, keepdim=True).clamp(min=ADAPTIVE_WEIGHT_FLOOR).float()
    return (error**2 / weight).mean(dim=dims)


def nft_loss(velocity: Tensor, old_velocity: Tensor, x0: Tensor, xt: Tensor, t: Tensor, r: Tensor, *,
             beta: float, adv_clip_max: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-image DiffusionNFT losses [N] and metrics.

    velocity: the current model's prediction at (xt, t) [N, ...] (with gradient); old_velocity: the sampling
    policy's at the same point (no gradient is taken through it); x0: the sampled clean latents; xt: x0 noised
    to t; t: [N] or broadcastable, the flow time (sigma) in (0, 1]; r: optimality [N] from :func:`optimality`;
    beta: the implicit policies' strength (the reference configs: 1.0; 0.1 for OCR).

    Worked example (beta 1, c 5, one element, x0 = 0, t = 1, xt = 1): v = 0.5, v_old = 1 -> v+ = 0.5,
    v- = 1.5; x0(v+) = 0.5, x0(v-) = -0.5, both weights 0.5, so each error term is 0.25 / 0.5 = 0.5 and
    L = (r 0.5 + (1 - r) 0.5) * 5 = 2.5 for any r.
    """
    if beta <= 0:
        raise InputError(f"NFT beta must be positive, got {beta}")
    t = torch.as_tensor(t, dtype=torch.float32, device=x0.device)
    t = t.view(-1, *([1] * (x0.ndim - 1))) if t.ndim == 1 else t
    old = old_velocity.detach().float()
    v = velocity.float()
    positive = beta * v + (1 - beta) * old
    negative = (1 + beta) * old - beta * v
    positive_loss = _weighted_x0_error(positive, x0, xt, t)
    negative_loss = _weighted_x0_error(negative, x0, xt, t)
    r = r.float().to(positive_loss.device)
    losses = (r * positive_loss + (1 - r) * negative_loss) / beta * adv_clip_max
    drift = ((v.detach() - old) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    return losses, {"nft_positive_loss": positive_loss.detach(), "nft_negative_loss": negative_loss.detach(),
                    "optimality": r, "old_deviation": drift}


def velocity_kl(velocity: Tensor, ref_velocity: Tensor) -> Tensor:
    """The reference code's KL surrogate to the base model: mean (v - v_ref)^2 over the latent elements [N]."""
    return ((velocity.float() - ref_velocity.detach().float()) ** 2).mean(dim=tuple(range(1, velocity.ndim)))


def old_policy_decay(step: int, *, rate: float, maximum: float, after: int = 0) -> float:
    """How much of the old (sampling) policy survives each update: old <- d old + (1 - d) current.

    d = 0 for the first ``after`` steps, then min((step - after) rate, maximum). The reference configs:
    rate 0.001, maximum 0.5, after 0 (their default: nearly on-policy at first, half-lagging later) and
    rate 0.0075, maximum 0.999, after 75 (OCR). d = 0 throughout makes the sampler the current policy.
    Example: rate 0.001, maximum 0.5: step 0 -> 0, step 100 -> 0.1, step 1000 -> 0.5.
    """
    if step < after:
        return 0.0
    return min((step - after) * rate, maximum)
