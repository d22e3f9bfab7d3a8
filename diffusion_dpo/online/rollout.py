"""Rollouts of online reward tuning, for any model family: sample a group of G images per prompt with the
current denoiser and classifier-free guidance, recording every stochastic transition, decode them and score
them once each.

    schedule = sampling_schedule(comps, num_inference_steps=20, eta=1.0, noise_level=0.7, latent_hw=(16, 16))
    cond = Conditioning.of(comps, prompts, guidance_scale=4.0, size=(32, 32))   # per prompt, repeated G times
    predict = guided_predict(comps.family, denoiser, schedule, cond)
    roll = rollout(predict, schedule, comps.vae, seeds, latent_shape)            # trajectory + images [N, 3, H, W]

The same :func:`guided_predict` serves sampling and the recomputation of a recorded transition's log-prob
during the update, so guidance is applied identically in both (the PPO ratio compares like with like).
DDPM families (SD1.x/2.x, SDXL) sample with DDIM at eta > 0, flow-matching families (SD3, FLUX.1) with the
Flow-GRPO SDE (``online.transitions``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from diffusion_dpo.errors import InputError
from diffusion_dpo.online.trajectory import Trajectory, sample_trajectory
from diffusion_dpo.online.transitions import DDIMSchedule, FlowSDESchedule

Tensor = torch.Tensor


def sampling_schedule(comps, *, num_inference_steps: int, eta: float, noise_level: float,
                      latent_hw: tuple[int, int], sde: str = "flow_grpo"):
    """The stochastic sampler of ``comps.family``: a :class:`DDIMSchedule` (eta) built from the pipeline's
    noise schedule for DDPM families, or a :class:`FlowSDESchedule` (noise_level) from its flow-matching
    scheduler. ``latent_hw``: the denoiser latent's (h, w), which sets FLUX's resolution-dependent shift. The
    timesteps are those the family's diffusers pipeline samples with (FluxPipeline: sigmas linspace(1, 1/T, T) shifted by
    mu of the packed sequence length h/2 * w/2), so the tuned sampler is the one evaluate and label use.
    ``sde``: the flow step, flow_grpo's SDE or cps (DDPM families have only DDIM)."""
    from diffusers import DDIMScheduler

    if not comps.family.flow:
        if sde != "flow_grpo":
            raise InputError(f"config key 'sampling.sde': {sde} is a flow-matching step; {comps.family.name} "
                             "samples with DDIM (eta); use flow_grpo")
        scheduler = DDIMScheduler.from_config(comps.noise_scheduler.config)
        return DDIMSchedule.from_scheduler(scheduler, num_inference_steps, eta)
    scheduler = copy.deepcopy(comps.noise_scheduler)
    mu = comps.family.sampling_mu(scheduler.config, latent_hw, num_inference_steps)
    options = {} if mu is None else {"mu": mu}
    sigmas = comps.family.sampling_sigmas(num_inference_steps)
    if sigmas is None:
        scheduler.set_timesteps(num_inference_steps, **options)
    else:
        scheduler.set_timesteps(sigmas=sigmas, **options)
    return FlowSDESchedule(scheduler.sigmas.float().cpu(), scheduler.timesteps.float().cpu(), noise_level, sde)


@dataclass
class Conditioning:
    """What the denoiser reads for N images: text {name: [N, ...]} (each image's prompt), uncond {name:
    [N, ...]} (the family's empty prompt, for guidance), image {name: [N, ...]} (SDXL's time ids), and the scale."""

    text: dict[str, Tensor]
    uncond: dict[str, Tensor]
    image: dict[str, Tensor]
    guidance_scale: float

    @classmethod
    @torch.no_grad()
    def of(cls, comps, prompts: list[str], *, guidance_scale: float, size: tuple[int, int],
           repeat: int = 1) -> Conditioning:
        """Encode ``prompts`` once and repeat each ``repeat`` times (a group of G images per prompt, in
        order: prompt 0's G images first). ``size``: (H, W) in px, the images' size and SDXL's original
        size with no crop. A family whose pipeline embeds its guidance (FLUX.1) gets ``guidance_scale`` as
        text["guidance"] and no classifier-free pass, as its pipeline samples."""
        family = comps.family
        text = family.encode_text(comps, list(prompts))
        empty = comps.family.encode_empty_prompt(comps)
        n = len(prompts) * repeat
        text = {k: v.repeat_interleave(repeat, dim=0) for k, v in text.items()}
        uncond = {k: v.expand(n, *v.shape[1:]) for k, v in empty.items()}
        sizes = torch.tensor(size, dtype=torch.float32).expand(n, 1, 2)
        image = comps.family.image_conditioning(
            {"original_sizes": sizes, "crop_top_lefts": torch.zeros(n, 1, 2)}, size)
        device = next(iter(text.values())).device
        image = {k: v[:, 0].to(device) for k, v in image.items()}  # one image each, not a pair
        if family.guidance_embedded:
            text["guidance"] = torch.full((n,), float(guidance_scale), device=device)
            return cls(text, uncond, image, family.unguided_scale)
        return cls(text, uncond, image, guidance_scale)

    def rows(self, index: Tensor) -> Conditioning:
        """The conditioning of images ``index`` (long [M]), e.g. each trained transition's image."""
        pick = lambda d: {k: v[index.to(v.device)] for k, v in d.items()}  # noqa: E731
        return Conditioning(pick(self.text), pick(self.uncond), pick(self.image), self.guidance_scale)


def guided_predict(family, denoiser, schedule, cond: Conditioning, *,
                   detach_uncond: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
    """``predict(x [N, ...], step_index long [N]) -> model output [N, ...]`` at each row's step, with
    the family's classifier-free guidance (``Family.guide``: u + w (c - u), Ho & Salimans 2022) in one batch
    of 2N unless w is the family's ``unguided_scale``.
    ``detach_uncond``: u carries no gradient, so an update moves the weights through c alone (flow_grpo)."""

    def predict(x: Tensor, step_index: Tensor) -> Tensor:
        t = schedule.timesteps[step_index.cpu()].to(x.device)
        if cond.guidance_scale == family.unguided_scale:
            return family.forward(denoiser, x, t, cond.text, cond.image)
        text = {k: torch.cat([cond.uncond[k], v]) for k, v in cond.text.items()}
        image = {k: torch.cat([v, v]) for k, v in cond.image.items()}
        out = family.forward(denoiser, torch.cat([x, x]), torch.cat([t, t]), text, image)
        uncond, conditional = out.float().chunk(2)
        if detach_uncond:
            uncond = uncond.detach()
        return family.guide(uncond, conditional, cond.guidance_scale)

    return predict


@torch.no_grad()
def decode(vae, latents: Tensor) -> Tensor:
    """Images [N, 3, H, W] in [0, 1] (fp32) from denoiser latents [N, C, h, w]: the inverse of
    ``models.sample_latents``' scaling and shift (``models.unscale_latents``), then the VAE decoder (a video
    VAE's on one frame, ``vae_layout.decode_pixels``); videos [N, 3, F, H, W] from a video family's latents
    [N, C, F', h, w]."""
    from diffusion_dpo.models import unscale_latents
    from diffusion_dpo.vae_layout import decode_pixels

    z = unscale_latents(vae.config, latents)
    return (decode_pixels(vae, z).float() / 2 + 0.5).clamp(0, 1)


def image_seed_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


@dataclass
class Rollout:
    """trajectory: latents [N, T + 1, ...] and log-probs [N, T]; images [N, 3, H, W] in [0, 1] (videos:
    [N, 3, F, H, W])."""

    trajectory: Trajectory
    images: Tensor


def rollout(predict: Callable[[Tensor, Tensor], Tensor], schedule, vae, seeds: list[int],
            latent_shape: tuple[int, ...], device, start_seeds: list[int] | None = None) -> Rollout:
    """Sample N = len(seeds) images: image i's starting noise and every step's noise come from one CPU
    generator seeded with ``seeds[i]`` (its images depend only on its seed and the weights); with
    ``start_seeds`` (N seeds, equal ones giving equal noise) the starting noise comes from a generator of
    ``start_seeds[i]`` instead and ``seeds[i]`` gives only the steps' noise. ``predict``: :func:`guided_predict`
    of the current policy. Runs without gradients; call it under the run's autocast."""
    if len(latent_shape) not in (3, 4):
        raise InputError(f"latent_shape must be (C, h, w) or a video's (C, F, h, w), got {latent_shape}")
    if start_seeds is not None and len(start_seeds) != len(seeds):
        raise InputError(f"{len(start_seeds)} start seeds for {len(seeds)} images; expected one per image")
    generators = image_seed_generators(seeds)
    starts = generators if start_seeds is None else image_seed_generators(start_seeds)
    start = torch.stack([torch.randn(latent_shape, generator=g) for g in starts]).to(device)
    n = len(seeds)
    trajectory = sample_trajectory(lambda x, i: predict(x, torch.full((n,), i, dtype=torch.long)), schedule,
                                   start, generators)
    return Rollout(trajectory, decode(vae, trajectory.final))
