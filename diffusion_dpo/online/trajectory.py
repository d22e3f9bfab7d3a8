"""Sampling a trajectory of stochastic denoising steps with the log-probability of every transition, and
recomputing a recorded transition's log-probability under new model outputs (the PPO/GRPO ratio).

The denoiser is a callable ``predict(latents [B, ...], step_index: int) -> model_output [B, ...]``: the
model family's forward at the schedule's ``timesteps[step_index]``, classifier-free guidance already
applied by the caller. The schedule is a :class:`~diffusion_dpo.online.transitions.DDIMSchedule` or a
:class:`~diffusion_dpo.online.transitions.FlowSDESchedule`.

Exactness: the sampler computes each log-prob with the same code path :func:`transition_logprob` uses, so
on the first inner step (weights unchanged, same model outputs) the ratio exp(new - old) is exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from diffusion_dpo.errors import InputError
from diffusion_dpo.online.transitions import draw_transition, gaussian_logprob

Tensor = torch.Tensor


class Schedule(Protocol):
    num_steps: int

    def mean_std(self, x: Tensor, model_output: Tensor, step_index: Tensor) -> tuple[Tensor, Tensor]: ...

    def step_stds(self) -> Tensor: ...


@dataclass
class Trajectory:
    """latents: [B, T + 1, ...] fp32, latents[:, 0] the starting noise and latents[:, i + 1] the result of
    step i; logprobs: [B, T] fp32, log p(latents[:, i + 1] | latents[:, i]) under the sampling policy."""

    latents: Tensor
    logprobs: Tensor

    @property
    def final(self) -> Tensor:
        """The last latents [B, ...] (what the VAE decodes)."""
        return self.latents[:, -1]


@torch.no_grad()
def sample_trajectory(predict: Callable[[Tensor, int], Tensor], schedule: Schedule, latents: Tensor,
                      generators: list[torch.Generator], *, reduction: str = "mean") -> Trajectory:
    """Run the schedule's T stochastic steps from ``latents`` [B, ...] (the starting noise).

    ``generators``: one CPU generator per sample, seeded by the caller (as ``sampling.generate`` does), which
    draws that sample's step noise. ``reduction``: "mean" (DDPO's and Flow-GRPO's) or "sum" over the latent
    elements of each transition's log-prob. Returns a :class:`Trajectory`; runs without gradients.
    """
    if len(generators) != latents.shape[0]:
        raise InputError(f"{len(generators)} generators for {latents.shape[0]} starting latents; expected "
                         "one per sample")
    x = latents.float()
    batch = x.shape[0]
    states, logprobs = [x], []
    stochastic = schedule.step_stds() > 0
    for i in range(schedule.num_steps):
        index = torch.full((batch,), i, dtype=torch.long)
        model_output = predict(x, i)
        if model_output.shape != x.shape:
            raise InputError(f"predict returned shape {tuple(model_output.shape)} at step {i}; expected the "
                             f"latents' shape {tuple(x.shape)}")
        mean, std = schedule.mean_std(x, model_output, index)
        x = draw_transition(mean, std, generators)
        # A deterministic step (outside the noise window) has no density; 0 stands for "not a policy action"
        # and such a step is never trained.
        logprobs.append(gaussian_logprob(x, mean, std, reduction) if stochastic[i] else torch.zeros(batch, device=x.device))
        states.append(x)
    return Trajectory(torch.stack(states, dim=1), torch.stack(logprobs, dim=1))


@dataclass
class TransitionLogprob:
    """logprob: [B]; mean: [B, ...] (the transition's mean, for the KL to the reference); std: [B, 1, ...]."""

    logprob: Tensor
    mean: Tensor
    std: Tensor


def transition_logprob(schedule: Schedule, latents: Tensor, next_latents: Tensor, model_output: Tensor,
                       step_index: Tensor, *, reduction: str = "mean") -> TransitionLogprob:
    """log p(next_latents | latents) [B] of recorded transitions under new model outputs.

    latents, next_latents, model_output: [B, ...] (e.g. ``traj.latents[b, i]``, ``traj.latents[b, i + 1]`` and
    the current model's output at ``latents``); step_index: long [B], each row's step i. Gradients flow to
    ``model_output``. Use the same ``reduction`` as the sampler.
    """
    step_index = torch.as_tensor(step_index, dtype=torch.long)
    if step_index.shape != (latents.shape[0],):
        raise InputError(f"step_index has shape {tuple(step_index.shape)}; expected [{latents.shape[0]}], "
                         "one step per row")
    if int(step_index.min()) < 0 or int(step_index.max()) >= schedule.num_steps:
        raise InputError(f"step_index {step_index.tolist()} out of range for a schedule of "
                         f"{schedule.num_steps} steps")
    mean, std = schedule.mean_std(latents.float(), model_output, step_index.cpu())
    return TransitionLogprob(gaussian_logprob(next_latents, mean, std, reduction), mean, std)


def gather_steps(trajectory: Trajectory, steps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The recorded transitions at ``steps`` (long [B, K], e.g. from ``choose_steps``), flattened to rows:
    (latents [B * K, ...], next_latents [B * K, ...], old_logprobs [B * K]), row b * K + k being sample b's
    step steps[b, k]; ``steps.flatten()`` gives the matching step_index for :func:`transition_logprob`."""
    b, k = steps.shape
    rows = torch.arange(b).repeat_interleave(k)
    cols = steps.flatten().to(torch.long)
    lat = trajectory.latents
    return lat[rows, cols], lat[rows, cols + 1], trajectory.logprobs[rows, cols]
