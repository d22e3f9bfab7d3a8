"""Stochastic denoising transitions p(x_next | x) and their log-probabilities, for online reward tuning.

Every transition of the samplers below is a diagonal Gaussian N(mean, std^2) whose mean depends on the
model output and whose std depends only on the schedule, so the policy's log-probability of a recorded
transition can be recomputed under new weights (the importance ratio of PPO/GRPO).

References
    [DDIM]      Song et al., "Denoising Diffusion Implicit Models", 2021, eq. 12 (the generalised step) and
                eq. 16 (sigma_t(eta)).
    [DDPO]      Black et al., "Training Diffusion Models with Reinforcement Learning", 2023, sec. 4.2/4.3
                (each DDIM step with eta > 0 as a Gaussian policy action; the log-prob is averaged over the
                latent elements in its reference code).
    [Flow-GRPO] Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL", 2025, eq. 9 (the SDE
                with the marginals of the flow ODE) and its Euler-Maruyama step.
    [CPS]       Wang & Yu, "Coefficients-Preserving Sampling for Reinforcement Learning with Flow Matching",
                2025: a step that re-noises the predicted x0 with exactly the noise level the next sigma
                needs, so no excess noise is left in the images (flow_grpo's sde_type "cps").
    [MixGRPO] / [Flow-GRPO-Fast]: noise only on a window of the steps (the rest deterministic), and only
                the window trained; see ``window`` below and :mod:`diffusion_dpo.online.windows`.

Schedules are plain tensors, so nothing here depends on a model family: a schedule says, for each of the
T steps, what the step does with (x, model_output); ``step_index`` is a long tensor [B] (one step per
sample, so K different steps per sample can be recomputed in one batch). Shapes: x, model_output [B, ...].

``window`` (bool [T], or None for every step) marks the steps that inject noise; outside it a step is the
schedule's deterministic one (DDIM with eta 0, the flow Euler step), whose std is 0 and which has no
log-probability: ``step_stds() > 0`` says which steps can be trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffusion_dpo.errors import InputError

Tensor = torch.Tensor

REDUCTIONS = ("mean", "sum")
SDES = ("flow_grpo", "cps")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _window_scale(window: Tensor | None, num_steps: int) -> Tensor:
    """1.0 on the steps that inject noise, 0.0 on the others: [T] fp32."""
    if window is None:
        return torch.ones(num_steps)
    if window.shape != (num_steps,) or window.dtype != torch.bool:
        raise InputError(f"window must be a bool tensor [T = {num_steps}], got {window.dtype} "
                         f"{tuple(window.shape)}")
    return window.float()


def _per_sample(values: Tensor, index: Tensor, like: Tensor) -> Tensor:
    """values[index] as [B, 1, ..., 1] so it broadcasts against ``like`` [B, ...], in fp32."""
    picked = values.to(like.device)[index.to(like.device)].float()
    return picked.view(-1, *([1] * (like.ndim - 1)))


def gaussian_logprob(x: Tensor, mean: Tensor, std: Tensor, reduction: str = "mean") -> Tensor:
    """log N(x; mean, std^2) of a diagonal Gaussian, reduced over every axis but the first.

    x, mean: [B, ...]; std: broadcastable to x, > 0. Per element
        log p = -(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)
    ``reduction`` "mean" (DDPO's and Flow-GRPO's choice: the log-prob per latent element, so the PPO clip
    range does not depend on the image size) or "sum" (the exact joint log-density). Returns [B] in fp32.
    """
    if reduction not in REDUCTIONS:
        raise InputError(f"log-prob reduction {reduction!r} is not one of {REDUCTIONS}")
    std = std.float()
    if not bool((std > 0).all()):
        raise InputError("a transition has std 0 (eta = 0, noise_level = 0 or a final alpha-bar of 1): its "
                         "log-probability is undefined; use eta > 0 / noise_level > 0")
    per_element = (-((x.float() - mean.float()) ** 2) / (2 * std**2) - torch.log(std)
                   - 0.5 * math.log(2 * math.pi))
    per_element = per_element.expand(x.shape)
    dims = tuple(range(1, x.ndim))
    return per_element.mean(dim=dims) if reduction == "mean" else per_element.sum(dim=dims)


# ------------------------------------------------------------------------------------------------ DDIM


@dataclass
class DDIMSchedule:
    """T DDIM steps of a DDPM-trained (epsilon- or v-prediction) model, noisiest first.

    alpha_bars: [T], cumulative alpha of the step's timestep; alpha_bars_prev: [T], that of the timestep
    the step lands on (the scheduler's "final alpha cumprod" after the last step); timesteps: long [T], the
    model's timestep of each step (for the caller's ``predict``); eta: the [DDIM] eq. 16 stochasticity,
    1.0 in DDPO (0 is the deterministic sampler, which has no log-probability).
    """

    alpha_bars: Tensor
    alpha_bars_prev: Tensor
    timesteps: Tensor
    eta: float = 1.0
    prediction_type: str = "epsilon"
    window: Tensor | None = None

    def __post_init__(self):
        _window_scale(self.window, len(self.timesteps))
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"DDIM prediction_type {self.prediction_type!r} is not one of "
                             f"{PREDICTION_TYPES}")
        if self.eta < 0:
            raise InputError(f"DDIM eta must be >= 0, got {self.eta}")
        n = len(self.timesteps)
        if self.alpha_bars.shape != (n,) or self.alpha_bars_prev.shape != (n,):
            raise InputError(f"DDIM schedule: alpha_bars {tuple(self.alpha_bars.shape)} and alpha_bars_prev "
                             f"{tuple(self.alpha_bars_prev.shape)} must both be [T] with T = {n} timesteps")
        for name, a in (("alpha_bars", self.alpha_bars), ("alpha_bars_prev", self.alpha_bars_prev)):
            if not bool(((a > 0) & (a <= 1)).all()):
                raise InputError(f"DDIM schedule: {name} must lie in (0, 1], got {a.tolist()}")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @classmethod
    def from_scheduler(cls, scheduler, num_inference_steps: int, eta: float = 1.0) -> DDIMSchedule:
        """The schedule a diffusers ``DDIMScheduler`` runs after ``set_timesteps(num_inference_steps)``
        (same timesteps, same previous timestep t - num_train_timesteps // num_inference_steps)."""
        scheduler.set_timesteps(num_inference_steps)
        timesteps = scheduler.timesteps.long().cpu()
        abar = scheduler.alphas_cumprod.float().cpu()
        prev_t = timesteps - scheduler.config.num_train_timesteps // num_inference_steps
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
        abar_prev = torch.where(prev_t >= 0, abar[prev_t.clamp(min=0)], final)
        return cls(abar[timesteps], abar_prev, timesteps, eta, scheduler.config.prediction_type)

    def mean_std(self, x: Tensor, model_output: Tensor, step_index: Tensor) -> tuple[Tensor, Tensor]:
        """Mean [B, ...] and std [B, 1, ...] of p(x_prev | x_t) for each sample's step, in fp32."""
        alpha_bar = _per_sample(self.alpha_bars, step_index, x)
        alpha_bar_prev = _per_sample(self.alpha_bars_prev, step_index, x)
        eta = self.eta * _per_sample(_window_scale(self.window, self.num_steps), step_index, x)
        return ddim_transition(x, model_output, alpha_bar, alpha_bar_prev, eta, self.prediction_type)

    def noised(self, x0: Tensor, noise: Tensor, step_index: Tensor) -> Tensor:
        """The forward process at each sample's step: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a = _per_sample(self.alpha_bars, step_index, x0)
        return torch.sqrt(a) * x0.float() + torch.sqrt(1 - a) * noise.float()

    def predicted_x0(self, x: Tensor, model_output: Tensor, step_index: Tensor) -> Tensor:
        """The x0 a prediction implies at x (linear in it): (x - sqrt(1 - abar) eps) / sqrt(abar), or
        sqrt(abar) x - sqrt(1 - abar) v for v-prediction."""
        a = _per_sample(self.alpha_bars, step_index, x)
        if self.prediction_type == "epsilon":
            return (x.float() - torch.sqrt(1 - a) * model_output.float()) / torch.sqrt(a)
        return torch.sqrt(a) * x.float() - torch.sqrt(1 - a) * model_output.float()

    def step_stds(self) -> Tensor:
        """The std of each step's Gaussian [T] (0: a deterministic step)."""
        a, a_prev = self.alpha_bars.float(), self.alpha_bars_prev.float()
        variance = ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0)
        return self.eta * _window_scale(self.window, self.num_steps) * torch.sqrt(variance)


def ddim_transition(x: Tensor, model_output: Tensor, alpha_bar: Tensor, alpha_bar_prev: Tensor,
                    eta: float | Tensor, prediction_type: str = "epsilon") -> tuple[Tensor, Tensor]:
    """The [DDIM] eq. 12 step as a Gaussian: (mean, std) of x_{t-1} given x_t.

    x, model_output: [B, ...]; alpha_bar, alpha_bar_prev: abar_t and abar_{t-1}, broadcastable to x.
        x0_hat  = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)                  (epsilon-prediction)
        for v-prediction: x0_hat = sqrt(abar_t) x - sqrt(1 - abar_t) v,
                      eps    = sqrt(abar_t) v + sqrt(1 - abar_t) x
        std     = eta * sqrt((1 - abar_{t-1}) / (1 - abar_t)) * sqrt(1 - abar_t / abar_{t-1})  ([DDIM] eq. 16)
        mean    = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - std^2) eps
    With eta = 0 this is the deterministic DDIM step (std 0). No clipping of x0_hat (Stable Diffusion's
    schedulers do not clip). Returns (mean [B, ...], std broadcastable) in fp32.
    """
    x, out = x.float(), model_output.float()
    a, a_prev = alpha_bar.float(), alpha_bar_prev.float()
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
    elif prediction_type == "v_prediction":
        x0 = torch.sqrt(a) * x - torch.sqrt(1 - a) * out
        eps = torch.sqrt(a) * out + torch.sqrt(1 - a) * x
    else:
        raise InputError(f"DDIM prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    std = eta * torch.sqrt(variance.clamp(min=0))
    mean = torch.sqrt(a_prev) * x0 + torch.sqrt((1 - a_prev - std**2).clamp(min=0)) * eps
    return mean, std


def ddim_logprob(x_prev: Tensor, x: Tensor, model_output: Tensor, alpha_bar: Tensor, alpha_bar_prev: Tensor,
                 eta: float, prediction_type: str = "epsilon", reduction: str = "mean") -> Tensor:
    """log p(x_prev | x_t) [B] of one [DDIM] step with eta > 0 ([DDPO] sec. 4.3): :func:`ddim_transition`'s
    Gaussian evaluated at the recorded x_prev, reduced as in :func:`gaussian_logprob`."""
    mean, std = ddim_transition(x, model_output, alpha_bar, alpha_bar_prev, eta, prediction_type)
    return gaussian_logprob(x_prev, mean, std, reduction)


# ----------------------------------------------------------------------------------------- flow matching


@dataclass
class FlowSDESchedule:
    """T Euler-Maruyama steps of the [Flow-GRPO] SDE for a flow-matching model (x = (1 - s) x0 + s noise,
    the model predicts v = noise - x0, as SD3 and FLUX do).

    sigmas: [T + 1], strictly decreasing from at most 1 to 0 (the last is the clean end); timesteps: [T],
    the model's timestep of each step (for the caller's ``predict``; SD3 uses 1000 * sigma); noise_level:
    the ``a`` of sigma_t = a sqrt(t / (1 - t)) ([Flow-GRPO] below eq. 9; 0.7 in its SD3 setting).
    """

    sigmas: Tensor
    timesteps: Tensor
    noise_level: float = 0.7
    sde: str = "flow_grpo"  # or "cps" ([CPS]: std sigma_next sin(a pi / 2), noise_level being a)
    window: Tensor | None = None

    def __post_init__(self):
        if self.sde not in SDES:
            raise InputError(f"flow SDE {self.sde!r} is not one of {SDES}")
        _window_scale(self.window, len(self.timesteps))
        s = self.sigmas
        if s.ndim != 1 or len(s) < 2 or len(self.timesteps) != len(s) - 1:
            raise InputError(f"flow schedule: sigmas must be [T + 1] and timesteps [T], got "
                             f"{tuple(s.shape)} and {tuple(self.timesteps.shape)}")
        if not (bool((s[1:] < s[:-1]).all()) and float(s[0]) <= 1 and float(s[-1]) == 0):
            raise InputError(f"flow schedule: sigmas must decrease strictly from at most 1 to exactly 0, got "
                             f"{s.tolist()}")
        if self.noise_level < 0:
            raise InputError(f"flow SDE noise_level must be >= 0, got {self.noise_level}")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @classmethod
    def from_scheduler(cls, scheduler, num_inference_steps: int, noise_level: float = 0.7) -> FlowSDESchedule:
        """The sigmas and timesteps of a diffusers ``FlowMatchEulerDiscreteScheduler`` after
        ``set_timesteps(num_inference_steps)`` (its sigmas already end with the terminal 0)."""
        scheduler.set_timesteps(num_inference_steps)
        return cls(scheduler.sigmas.float().cpu(), scheduler.timesteps.float().cpu(), noise_level)

    def sde_sigmas(self) -> Tensor:
        """sigma_t = a sqrt(t / (1 - t)) of each step [T]. At t = 1 this is infinite; like Flow-GRPO's
        reference code we evaluate 1 - t there with the schedule's second sigma instead (a finite, large
        noise on the first step, which is almost pure noise anyway)."""
        t = self.sigmas[:-1].float()
        denominator_t = torch.where(t == 1, self.sigmas[1].float(), t)
        return self.noise_level * torch.sqrt(t / (1 - denominator_t))

    def sde_sigma(self, x: Tensor, step_index: Tensor) -> Tensor:
        """sigma_t of each sample's step, broadcastable to ``x`` (the transition's std without sqrt(|dt|));
        only the [Flow-GRPO] SDE has one."""
        if self.sde != "flow_grpo":
            raise InputError(f"the {self.sde} step has no sigma_t of the Flow-GRPO SDE")
        return _per_sample(self.sde_sigmas() * _window_scale(self.window, self.num_steps), step_index, x)

    def noised(self, x0: Tensor, noise: Tensor, step_index: Tensor) -> Tensor:
        """The forward process at each sample's step: (1 - t) x0 + t noise."""
        t = _per_sample(self.sigmas[:-1], step_index, x0)
        return (1 - t) * x0.float() + t * noise.float()

    def predicted_x0(self, x: Tensor, model_output: Tensor, step_index: Tensor) -> Tensor:
        """The x0 a velocity implies at x (linear in it): x - t v."""
        return x.float() - _per_sample(self.sigmas[:-1], step_index, x) * model_output.float()

    def step_stds(self) -> Tensor:
        """The std of each step's Gaussian [T] (0: a deterministic step, e.g. outside the window, or CPS's
        last step onto sigma 0)."""
        scale = _window_scale(self.window, self.num_steps)
        if self.sde == "cps":
            return scale * self.sigmas[1:].float() * math.sin(self.noise_level * math.pi / 2)
        return scale * self.sde_sigmas() * torch.sqrt(self.sigmas[:-1].float() - self.sigmas[1:].float())

    def mean_std(self, x: Tensor, model_output: Tensor, step_index: Tensor) -> tuple[Tensor, Tensor]:
        """Mean [B, ...] and std [B, 1, ...] of p(x_{t+dt} | x_t) for each sample's step, in fp32."""
        t, t_next = _per_sample(self.sigmas[:-1], step_index, x), _per_sample(self.sigmas[1:], step_index, x)
        scale = _per_sample(_window_scale(self.window, self.num_steps), step_index, x)
        if self.sde == "cps":
            return cps_transition(x, model_output, t, t_next, scale * self.noise_level)
        return flow_sde_transition(x, model_output, t, t_next, scale * _per_sample(self.sde_sigmas(), step_index, x))


def flow_sde_transition(x: Tensor, velocity: Tensor, t: Tensor, t_next: Tensor, sde_sigma: Tensor
                        ) -> tuple[Tensor, Tensor]:
    """One Euler-Maruyama step of the [Flow-GRPO] eq. 9 SDE, as a Gaussian: (mean, std) of x_{t+dt}.

    x, velocity: [B, ...]; t, t_next, sde_sigma: broadcastable to x; dt = t_next - t < 0 (towards data).
        mean = x + [v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt
        std  = sigma_t sqrt(|dt|)
    The extra drift is the score term: for x = (1 - t) x0 + t noise, grad log p_t(x) = -(x + (1 - t) v) / t,
    so the SDE keeps the marginals of the ODE dx = v dt. With sigma_t = 0 it is the plain Euler step
    x + v dt (diffusers' FlowMatchEulerDiscreteScheduler). Returns (mean, std) in fp32.
    """
    x, v = x.float(), velocity.float()
    t, dt, sde_sigma = t.float(), (t_next - t).float(), sde_sigma.float()
    mean = x + (v + sde_sigma**2 / (2 * t) * (x + (1 - t) * v)) * dt
    return mean, sde_sigma * torch.sqrt(-dt)


def cps_transition(x: Tensor, velocity: Tensor, t: Tensor, t_next: Tensor, noise_level: Tensor | float
                   ) -> tuple[Tensor, Tensor]:
    """One [CPS] step as a Gaussian: (mean, std) of x at t_next, from x at t and the predicted velocity.

        x0_hat = x - t v,   noise_hat = x + (1 - t) v         (the flow's x = (1 - t) x0 + t noise, v = noise - x0)
        std    = t_next sin(a pi / 2)
        mean   = (1 - t_next) x0_hat + sqrt(t_next^2 - std^2) noise_hat
    so the sample is (1 - t_next) x0_hat + t_next * (unit-variance noise) exactly: the noise mixes the
    predicted noise with fresh noise without changing its level. a = 0 gives the Euler step x + v (t_next - t);
    t_next = 0 gives std 0 (the last step is deterministic). Returns (mean, std) in fp32. Unlike flow_grpo's
    code, which keeps only -(x - mean)^2 as the log-prob, the caller evaluates the full Gaussian, so the PPO
    ratio has the same meaning as under the other SDE.
    """
    x, v = x.float(), velocity.float()
    t, t_next = t.float(), t_next.float()
    std = t_next * torch.sin(torch.as_tensor(noise_level, dtype=torch.float32) * math.pi / 2)
    x0, noise = x - t * v, x + (1 - t) * v
    mean = (1 - t_next) * x0 + torch.sqrt((t_next**2 - std**2).clamp(min=0)) * noise
    return mean, std


def flow_sde_logprob(x_next: Tensor, x: Tensor, velocity: Tensor, t: Tensor, t_next: Tensor,
                     sde_sigma: Tensor, reduction: str = "mean") -> Tensor:
    """log p(x_{t+dt} | x_t) [B] of one [Flow-GRPO] SDE step: :func:`flow_sde_transition`'s Gaussian evaluated
    at the recorded x_{t+dt}, reduced as in :func:`gaussian_logprob`."""
    mean, std = flow_sde_transition(x, velocity, t, t_next, sde_sigma)
    return gaussian_logprob(x_next, mean, std, reduction)


def draw_transition(mean: Tensor, std: Tensor, generators: list[torch.Generator]) -> Tensor:
    """x_next = mean + std * z, with z [B, ...] drawn on the CPU from each sample's own generator (so a
    sample's trajectory depends only on its seed, not on its batch or device), in fp32."""
    if len(generators) != mean.shape[0]:
        raise InputError(f"{len(generators)} generators for a batch of {mean.shape[0]}; expected one per "
                         "sample")
    z = torch.stack([torch.randn(mean.shape[1:], generator=g, dtype=torch.float32) for g in generators])
    return mean.float() + std.float() * z.to(mean.device)
