"""The noise processes of training: how clean latents x0 and noise eps (both [N, C, h, w]) become the
denoiser's input at a per-image time, and what it is trained to predict. Schedulers' arithmetic, apart from
any model family (a family picks its process: ``Family.noise_process``).

    DDPMNoise  t integer in [0, T): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; target eps, v or x0
               as the scheduler's prediction_type says (Ho et al. 2020; Salimans & Ho 2022)
    FlowNoise  sigma in (0, 1): x_t = (1 - sigma) x0 + sigma eps; target v = eps - x0 (rectified flow,
               Esser et al. 2024, eq. 2-3); the model sees the timestep 1000 sigma

The per-image error is the squared error of prediction against target reduced over the latent elements
(mean, as Diffusion-DPO, or sum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from diffusion_dpo.config import option
from diffusion_dpo.errors import InputError

Tensor = torch.Tensor


def uniform_timestep(num_train_timesteps: int) -> Callable[[torch.Generator], Tensor]:
    """DDPM's time draw for T timesteps: long [1], uniform in [0, T)."""
    return lambda g: torch.randint(0, num_train_timesteps, (1,), generator=g)


@dataclass
class NoiseConfig:
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = option(
        "uniform", "flow-matching families: how u in (0, 1) is drawn before the shift (Esser et al. 2024, sec. "
        "3.1): uniform, logit_normal (sigmoid of a normal) or mode (mode_scale); DDPM families (SD1.x/2.x, "
        "SDXL) draw t uniformly from [0, T) and accept only uniform")
    logit_mean: float = option(0.0, "logit_normal: mean of the normal before the sigmoid")
    logit_std: float = option(1.0, "logit_normal: std of the normal before the sigmoid", lambda v: v > 0,
                              "a positive number")
    mode_scale: float = option(1.29, "mode: the scale s of u -> 1 - u - s (cos^2(pi u / 2) - 1 + u)")
    shift: float | None = option(None, "flow-matching families: sigma = shift u / (1 + (shift - 1) u); null: "
                                 "the scheduler's shift (1 when it shifts by resolution, as FLUX's does)",
                                 lambda v: v is None or v > 0, "null or a positive number")
    reduction: Literal["mean", "sum"] = option("mean", "how a per-image denoising error reduces over the "
                                               "latent elements: mean (Diffusion-DPO's, and beta's scale) or sum")


def reduce_error(prediction: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Squared error over every axis but the first, in fp32: [N, ...] -> [N] (mean or sum)."""
    diff = prediction.float() - target.float()
    square = diff.pow(2)
    dims = tuple(range(1, diff.ndim))
    return square.mean(dim=dims) if reduction == "mean" else square.sum(dim=dims)


class DDPMNoise:
    """The DDPM forward process of a diffusers scheduler (its betas and prediction_type)."""

    def __init__(self, scheduler, reduction: str = "mean"):
        self.scheduler, self.reduction = scheduler, reduction
        self.num_train_timesteps = scheduler.config.num_train_timesteps

    def draw_time(self, generator: torch.Generator) -> Tensor:
        """One timestep, long [1], uniform in [0, T)."""
        return uniform_timestep(self.num_train_timesteps)(generator)

    def noisy(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return self.scheduler.add_noise(x0, eps, t)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return eps
        if kind == "v_prediction":
            return self.scheduler.get_velocity(x0, eps, t)
        if kind == "sample":
            return x0
        raise InputError(f"scheduler prediction_type {kind!r} is not one of ['epsilon', 'sample', 'v_prediction']")

    def model_timestep(self, t: Tensor) -> Tensor:
        return t


def shifted_sigma(u: Tensor, shift: float) -> Tensor:
    """sigma = shift u / (1 + (shift - 1) u): the time shift of SD3 (Esser et al. 2024, eq. 23 with
    shift = sqrt(m / n)), the same map FlowMatchEulerDiscreteScheduler applies to its sigmas."""
    return shift * u / (1 + (shift - 1) * u)


class FlowNoise:
    """Rectified flow: sigma per image from the configured density and shift; target eps - x0."""

    def __init__(self, cfg: NoiseConfig, shift: float, num_train_timesteps: int = 1000):
        self.cfg, self.shift, self.reduction = cfg, shift, cfg.reduction
        self.num_train_timesteps = num_train_timesteps

    def draw_time(self, generator: torch.Generator) -> Tensor:
        """One sigma, float [1]: u from diffusers' SD3 density (uniform, logit-normal or mode), shifted."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        c = self.cfg
        u = compute_density_for_timestep_sampling(c.timestep_sampling, 1, logit_mean=c.logit_mean,
                                                  logit_std=c.logit_std, mode_scale=c.mode_scale,
                                                  generator=generator)
        return shifted_sigma(u, self.shift)

    def _sigma(self, t: Tensor, like: Tensor) -> Tensor:
        return t.to(like).view(-1, *([1] * (like.ndim - 1)))

    def noisy(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        sigma = self._sigma(t, x0)
        return (1 - sigma) * x0 + sigma * eps

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return eps - x0

    def model_timestep(self, t: Tensor) -> Tensor:
        return t.float() * self.num_train_timesteps
