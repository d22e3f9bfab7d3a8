"""Per-sample denoising errors, the quantity Diffusion-DPO compares between policy and reference.

For clean latents x0, noise eps and a time, the denoiser sees the noised latent of its family's noise
process (``families.base``: DDPM for SD1.x/2.x/SDXL, rectified flow for SD3/FLUX) and predicts that
process's target; the error of one image is the squared error reduced over (C, H, W), in fp32.

In Diffusion-DPO the winner and the loser of a pair are noised with the **same** eps and time (Wallace et
al. 2023, eq. 14), so their errors differ only because of the images. :func:`pair_errors` does that for a
batch of pairs; :func:`draw_pair_noise` makes the shared randomness from per-pair seeds, so a pair's noise
depends only on (seed, step, its position in the step's global batch), which makes resumed and accumulated runs exact.

    process = family.noise_process(comps.noise_scheduler, NoiseConfig())
    noise = draw_pair_noise(pair_seeds(seed, 0, 0, B), latent_shape, process.draw_time)
    x = models.pair_inputs(comps.vae.config, batch, noise)
    mse_w, mse_l = pair_errors(policy, x, process, family.forward)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from diffusion_dpo.noise import DDPMNoise, reduce_error, uniform_timestep

Tensor = torch.Tensor


def unet_forward(unet, noisy: Tensor, timestep: Tensor, text: dict[str, Tensor], image: dict[str, Tensor]) -> Tensor:
    """A conditional UNet's prediction: cross-attention on text["hidden"] [N, L, D]; with SDXL's per-image
    ``image["time_ids"]`` [N, 6], the added conditions take ``text["pooled"]`` [N, D2] as text_embeds."""
    added = {"text_embeds": text["pooled"], "time_ids": image["time_ids"]} if "time_ids" in image else None
    return unet(noisy, timestep, text["hidden"], added_cond_kwargs=added).sample


def as_process(noise):
    """A noise process; a bare diffusers scheduler means its DDPM process with mean reduction."""
    return noise if hasattr(noise, "draw_time") else DDPMNoise(noise)


def denoising_errors(model, latents: Tensor, noise: Tensor, times: Tensor, process, text: dict[str, Tensor],
                     image: dict[str, Tensor] | None = None, forward: Callable = unet_forward) -> Tensor:
    """Per-image denoising error of ``model`` on N images.

    latents, noise: [N, C, h, w] (scaled VAE latents and standard normal noise); times: [N] (DDPM: long
    timesteps; flow: sigma); text, image: conditioning tensors [N, ...] that ``forward`` reads. Returns the
    fp32 error [N] between the prediction and the process's target. Run it under ``torch.autocast`` when
    the weights are in half precision; gradients flow unless under no_grad.
    """
    process = as_process(process)
    latents = latents.float()
    noise = noise.to(latents)
    times = times.to(latents.device)
    noisy = process.noisy(latents, noise, times)
    target = process.target(latents, noise, times)
    prediction = forward(model, noisy, process.model_timestep(times), text, image or {})
    return reduce_error(prediction, target, process.reduction)


def _both_images(value: Tensor, n_pairs: int) -> Tensor:
    """Per-pair [B, ...] conditioning repeated for winner and loser; per-image [2B, ...] kept as is."""
    if value.shape[0] == 2 * n_pairs:
        return value
    if value.shape[0] == n_pairs:
        return torch.cat([value, value])
    raise ValueError(f"conditioning has leading size {value.shape[0]}, expected {n_pairs} or {2 * n_pairs}")


@dataclass
class PairInputs:
    """The denoiser inputs of B pairs under shared noise.

    latents_w, latents_l, noise: [B, C, h, w]; timesteps: [B] (one per pair, shared by its two images);
    text: per-pair conditioning {name: [B, ...]} (the caption's); image: per-image conditioning
    {name: [2B, ...]}, the B winners first (SDXL's time ids differ when the images' sizes or crops do).
    """

    latents_w: Tensor
    latents_l: Tensor
    noise: Tensor
    timesteps: Tensor
    text: dict[str, Tensor]
    image: dict[str, Tensor] = field(default_factory=dict)


def pair_errors(model, x: PairInputs, process, forward: Callable = unet_forward) -> tuple[Tensor, Tensor]:
    """Errors of winner and loser of B pairs under the same noise and time per pair, in one batch of 2B.
    ``process``: a noise process (or a DDPM scheduler). Returns (mse_w [B], mse_l [B]) in fp32."""
    n = x.latents_w.shape[0]
    errors = denoising_errors(model, torch.cat([x.latents_w, x.latents_l]), torch.cat([x.noise, x.noise]),
                              torch.cat([x.timesteps, x.timesteps]), process,
                              {k: _both_images(v, n) for k, v in x.text.items()},
                              {k: _both_images(v, n) for k, v in x.image.items()}, forward)
    return errors[:n], errors[n:]


def winner_errors(model, x: PairInputs, process, forward: Callable = unet_forward) -> Tensor:
    """Denoising errors of the winners alone [B] (the SFT baseline trains on these): one pass of B."""
    n = x.latents_w.shape[0]
    return denoising_errors(model, x.latents_w, x.noise, x.timesteps, process,
                            {k: v[:n] for k, v in x.text.items()}, {k: v[:n] for k, v in x.image.items()}, forward)


# ---------------------------------------------------------------------------------------- shared noise

@dataclass
class PairNoise:
    """The randomness of B pairs: one timestep and one noise per pair (shared by winner and loser), and
    the standard normal draws that sample each image's latent from its VAE posterior."""

    timesteps: Tensor  # [B]: long DDPM timesteps, or flow sigmas
    noise: Tensor  # [B, C, h, w]
    latent_eps: Tensor  # [B, 2, C, h, w], index 0 winner


def pair_seeds(seed: int, step: int, rank: int, n_pairs: int, offset: int = 0, world: int = 1) -> list[int]:
    """One 63-bit seed per pair from (run seed, optimizer step, the pair's position in the step's global batch).

    ``offset`` is the position of the first pair within this process's part of the step (micro-batch index x
    batch size), so a step of 2 accumulated micro-batches of 1 pair draws exactly what one batch of 2 pairs
    draws. With ``world`` processes, pair i of process ``rank`` is the global pair ``(offset + i) x world +
    rank``: PreferencePairs deals the epoch's order out in turn (process r takes every world-th pair from r),
    so that is the pair's position in the one-process run at a ``world`` times larger batch, which therefore
    draws the same noise for it. One process (rank 0) draws what it always drew.
    """
    # The third entry once held the rank; kept 0 so that one process's seeds stay bit-identical.
    return [int(np.random.SeedSequence([seed, step, 0, (offset + i) * world + rank])
                .generate_state(2, np.uint64)[0] >> 1) for i in range(n_pairs)]


def draw_pair_noise(seeds: list[int], latent_shape: tuple[int, int, int],
                    draw_time: int | Callable[[torch.Generator], Tensor],
                    device: torch.device | str = "cpu") -> PairNoise:
    """Draw each pair's time, noise and latent draws from a CPU generator seeded with that pair's seed, so
    the values are the same on any device and batch size. ``draw_time``: a noise process's ``draw_time``
    (generator -> [1]), or an int T for DDPM timesteps uniform in [0, T)."""
    if isinstance(draw_time, int):
        draw_time = uniform_timestep(draw_time)
    timesteps, noise, eps = [], [], []
    for s in seeds:
        g = torch.Generator("cpu").manual_seed(s)
        timesteps.append(draw_time(g))
        noise.append(torch.randn(latent_shape, generator=g))
        eps.append(torch.randn((2, *latent_shape), generator=g))
    return PairNoise(torch.cat(timesteps).to(device), torch.stack(noise).to(device), torch.stack(eps).to(device))


