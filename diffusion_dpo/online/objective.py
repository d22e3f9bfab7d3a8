"""The online objective per denoising transition: PPO's clipped importance-ratio loss, its metrics, and
the KL penalty to the reference model. Pure functions: tensors in, unreduced tensors out.

References
    [PPO]       Schulman et al., "Proximal Policy Optimization Algorithms", 2017, eq. 7.
    [DDPO]      Black et al., "Training Diffusion Models with Reinforcement Learning", 2023, sec. 4.3 (the
                clipped ratio per denoising step; clip range 1e-4 in its reference code, because a step's
                mean log-prob moves a lot for a small change of the weights).
    [Flow-GRPO] Liu et al., "Flow-GRPO", 2025, eq. 6 (the GRPO objective over steps with a KL term) and the
                closed-form KL of two Gaussian transitions with the same std.
    [k1-k3]     Schulman, "Approximating KL Divergence", 2020.

Shapes: the transitions being trained are [B, K] (K chosen steps of B samples) or flattened rows [B * K];
advantages come per sample [B] (every step of an image shares its image's advantage) or per transition.
"""

from __future__ import annotations

import torch

from diffusion_dpo.errors import InputError
from diffusion_dpo.losses import ppo_policy_loss
from diffusion_dpo.online.transitions import REDUCTIONS
from diffusion_dpo.rl import kl_penalty

Tensor = torch.Tensor


def _per_transition(advantages: Tensor, like: Tensor) -> Tensor:
    if advantages.shape == like.shape:
        return advantages
    if advantages.ndim == 1 and like.ndim >= 1 and advantages.shape[0] == like.shape[0]:
        return advantages.view(-1, *([1] * (like.ndim - 1))).expand_as(like)
    raise InputError(f"advantages of shape {tuple(advantages.shape)} do not fit log-probs of shape "
                     f"{tuple(like.shape)}; expected the same shape or one advantage per sample [B]")


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, *,
                        clip_range: float) -> tuple[Tensor, Tensor]:
    """[PPO] eq. 7 per transition, as [DDPO] and [Flow-GRPO] use it; logprobs, old_logprobs: [B, K] or [N].

        ratio = exp(logprobs - old_logprobs)
        loss  = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))

    (``diffusion_dpo.losses.ppo_policy_loss``; see its worked example). ``advantages``: same shape, or [B]
    broadcast over each sample's K steps. Returns (losses, clipped) of the log-probs' shape, clipped being
    1.0 where the clipped term was the larger one.
    """
    advantages = _per_transition(advantages, logprobs)
    return ppo_policy_loss(logprobs, old_logprobs, advantages, clip_range=clip_range)


def policy_metrics(logprobs: Tensor, old_logprobs: Tensor, clipped: Tensor) -> dict[str, Tensor]:
    """Scalars (detached) that tell how far the inner PPO steps moved the policy from the sampling one:

        clip_fraction   mean of ``clipped`` (the share of transitions whose gradient the clip removed)
        approx_kl       mean of 0.5 (logprobs - old_logprobs)^2 ([DDPO]'s reference-code statistic)
        kl_k3           mean of the k3 estimate of KL(old || new) on transitions sampled from old ([k1-k3])

    Worked example (used by the tests): log-prob changes (0, ln 2): approx_kl = 0.5 * (0 + 0.480453) / 2 =
    0.120113; k3 with log r = (0, ln 2): ((1 - 1) - 0 + (2 - 1) - ln 2) / 2 = 0.153426.
    """
    logprobs, old_logprobs = logprobs.detach().float(), old_logprobs.detach().float()
    return {
        "clip_fraction": clipped.detach().float().mean(),
        "approx_kl": (0.5 * (logprobs - old_logprobs) ** 2).mean(),
        "kl_k3": kl_penalty(old_logprobs, logprobs, "k3").mean(),
    }


def gaussian_mean_kl(mean: Tensor, ref_mean: Tensor, std: Tensor, reduction: str = "mean") -> Tensor:
    """KL(N(mean, std^2) || N(ref_mean, std^2)) of the policy's and the reference's transition from the same
    x_t ([Flow-GRPO]): two Gaussians with the same std differ only in their means, so per latent element

        KL = (mean - ref_mean)^2 / (2 std^2)

    exactly (no sampling estimate). mean, ref_mean: [N, ...]; std: broadcastable (the transition's std, e.g.
    ``TransitionLogprob.std``). ``reduction`` over the latent elements as for the log-probs ("mean", DDPO's
    and Flow-GRPO's, or "sum"). Flow-GRPO's code divides by sigma_t^2 rather than the step variance
    sigma_t^2 |dt|; passing ``std = sigma_t`` reproduces that scale. Returns [N] fp32, 0 where the means
    agree.
    """
    if reduction not in REDUCTIONS:
        raise InputError(f"KL reduction {reduction!r} is not one of {REDUCTIONS}")
    per_element = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)
    dims = tuple(range(1, per_element.ndim))
    return per_element.mean(dim=dims) if reduction == "mean" else per_element.sum(dim=dims)


KL_CONVENTIONS = ("paper", "flow_grpo_code")


def transition_kl(schedule, x: Tensor, mean: Tensor, ref_output: Tensor, step_index: Tensor, *,
                  reduction: str = "mean", convention: str = "paper") -> Tensor:
    """The per-transition KL to the reference [N] that the GRPO loss weighs by kl_coef: the reference's
    transition mean from its ``ref_output`` at the same x_t [N, ...], against the policy's ``mean``.

    ``convention`` chooses the variance the squared mean difference is divided by:
        paper           the transition's own variance, sigma_t^2 |dt| ([Flow-GRPO] eq. 6 with its SDE step):
                        the exact KL between the two Gaussian steps
        flow_grpo_code  sigma_t^2, as flow_grpo's training script divides (its KL is |dt| times the exact one,
                        so its kl_coef 0.04 is 1/|dt| times weaker than the same coefficient here: 3.7-25x on
                        SD3.5's steps 0-8 at T = 10, shift 3, and 112x on the last)
    Only the flow SDE has the second; a DDIM schedule (SD1.x/2.x, SDXL) takes ``paper``.
    """
    if convention not in KL_CONVENTIONS:
        raise InputError(f"config key 'online.kl_convention': expected one of {KL_CONVENTIONS}, got "
                         f"{convention!r}")
    ref_mean, std = schedule.mean_std(x.float(), ref_output, step_index.cpu())
    if convention == "flow_grpo_code":
        if not hasattr(schedule, "sde_sigma"):
            raise InputError("config key 'online.kl_convention': flow_grpo_code divides by the flow SDE's "
                             "sigma_t, which a DDIM sampler (SD1.x/2.x, SDXL) does not have; use paper")
        std = schedule.sde_sigma(x, step_index.cpu())
    return gaussian_mean_kl(mean, ref_mean, std, reduction)


def grpo_transition_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, kl: Tensor, *,
                         clip_range: float, kl_coef: float) -> tuple[Tensor, Tensor]:
    """The loss of each transition being trained ([Flow-GRPO] eq. 6, negated): clipped policy loss plus
    ``kl_coef`` times the KL to the reference (``kl`` of the log-probs' shape, from :func:`gaussian_mean_kl`).
    Returns (losses, clipped) of the log-probs' shape; the caller averages over transitions."""
    if kl.shape != logprobs.shape:
        raise InputError(f"KL of shape {tuple(kl.shape)} does not fit log-probs of shape "
                         f"{tuple(logprobs.shape)}")
    losses, clipped = clipped_policy_loss(logprobs, old_logprobs, advantages, clip_range=clip_range)
    return losses + kl_coef * kl, clipped
