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

The paper derives it for flow matching; the derivation needs only that the training loss is a squared error
of a prediction that enters linearly, which holds for the DDPM families' epsilon and v predictions too
(x0(u) is then the DDIM x0 estimate), so the same loss runs there through their x0 map.
"""

from __future__ import annotations

from typing import Callable

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


def _weighted_x0_error(x0_hat: Tensor, x0: Tensor) -> Tensor:
    """mean ||x0_hat - x0||^2 / w over the latent elements [N], with the adaptive weight w (no gradient)."""
    dims = tuple(range(1, x0.ndim))
    error = x0_hat.float() - x0.float()
    with torch.no_grad():
        weight = error.double().abs().mean(dim=dims, keepdim=True).clamp(min=ADAPTIVE_WEIGHT_FLOOR).float()
    return (error**2 / weight).mean(dim=dims)


def nft_loss(output: Tensor, old_output: Tensor, x0: Tensor, to_x0: Callable[[Tensor], Tensor], r: Tensor, *,
             beta: float, adv_clip_max: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-image DiffusionNFT losses [N] and metrics.

    output: the current model's prediction at the noised latents [N, ...] (with gradient); old_output: the
    sampling policy's at the same point (no gradient is taken through it); x0: the sampled clean latents;
    to_x0: the x0 a prediction implies at those noised latents, linear in the prediction (flow: x_t - t u;
    DDPM: the DDIM x0 of an epsilon or v prediction; the schedule's ``predicted_x0``), so the implicit
    policies' x0 are the same mixtures of the two x0; r: optimality [N] from :func:`optimality`; beta: the
    implicit policies' strength (the reference configs: 1.0; 0.1 for OCR).

    Worked example (beta 1, c 5, one element, x0 = 0, to_x0(u) = 1 - u, i.e. t = 1, x_t = 1): v = 0.5,
    v_old = 1 -> v+ = 0.5, v- = 1.5; x0(v+) = 0.5, x0(v-) = -0.5, both weights 0.5, so each error term is
    0.25 / 0.5 = 0.5 and L = (r 0.5 + (1 - r) 0.5) * 5 = 2.5 for any r.
    """
    if beta <= 0:
        raise InputError(f"NFT beta must be positive, got {beta}")
    old = old_output.detach().float()
    out = output.float()
    positive_loss = _weighted_x0_error(to_x0(beta * out + (1 - beta) * old), x0)
    negative_loss = _weighted_x0_error(to_x0((1 + beta) * old - beta * out), x0)
    r = r.float().to(positive_loss.device)
    losses = (r * positive_loss + (1 - r) * negative_loss) / beta * adv_clip_max
    drift = ((out.detach() - old) ** 2).mean(dim=tuple(range(1, x0.ndim)))
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
