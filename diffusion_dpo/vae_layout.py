"""How a VAE's tensors are laid out, read from its config alone (what a precomputed run keeps after freeing
the VAE): image VAEs (AutoencoderKL, AutoencoderKLFlux2) take [N, 3, H, W] and give [N, C, h, w]; the video
VAEs (AutoencoderKLQwenImage, AutoencoderKLWan; their configs name ``temperal_downsample``) take
[N, 3, F, H, W] and give [N, C, F', h, w], an image being one frame (F = F' = 1), and normalise their
latents per channel with ``latents_mean`` / ``latents_std``.

    encode_moments(vae, pixels)        # [N, 2C, h, w] posterior parameters, whatever the layout
                                       # (videos [N, 3, F, H, W]: [N, 2C, F', h, w])
    decode_pixels(vae, z)              # [N, 3, H, W] in [-1, 1] from VAE latents [N, C, h, w]
    latent_channels(config), spatial_factor(config), temporal_factor(config)
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def is_video(vae_config) -> bool:
    """Whether the VAE takes and gives 5-D [N, C, F, H, W] tensors (Qwen-Image's and Wan's VAE)."""
    return "temperal_downsample" in vae_config  # the diffusers spelling of both video VAEs' config key


def latent_channels(vae_config) -> int:
    return vae_config["z_dim"] if is_video(vae_config) else vae_config["latent_channels"]


def spatial_factor(vae_config) -> int:
    """How many px one latent pixel spans: 2 per downsampling stage (the video VAEs: one per entry of
    ``temperal_downsample``, whether or not it also halves time)."""
    if is_video(vae_config):
        return 2 ** len(vae_config["temperal_downsample"])
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def temporal_factor(vae_config) -> int:
    """How many frames one latent frame spans after the first (a video of t k + 1 frames has k + 1 latent
    frames): the config's ``scale_factor_temporal``, else 2 per entry of ``temperal_downsample`` that is
    true; 1 for an image VAE."""
    if not is_video(vae_config):
        return 1
    return int(vae_config.get("scale_factor_temporal") or 2 ** sum(map(bool, vae_config["temperal_downsample"])))


def encode_moments(vae, pixel_values: Tensor) -> Tensor:
    """The VAE posterior's parameters (mean and log-variance stacked on channels) [N, 2C, h, w] of images
    [N, 3, H, W] in [-1, 1], in the VAE's dtype; a video VAE encodes each image as a one-frame video, and
    videos [N, 3, F, H, W] whole, to [N, 2C, F', h, w]."""
    pixels = pixel_values.to(device=vae.device, dtype=vae.dtype)
    if pixels.ndim == 5:
        return vae.encode(pixels).latent_dist.parameters
    if is_video(vae.config):
        return vae.encode(pixels.unsqueeze(2)).latent_dist.parameters.squeeze(2)
    return vae.encode(pixels).latent_dist.parameters


def decode_pixels(vae, z: Tensor) -> Tensor:
    """Images [N, 3, H, W] (the decoder's range, [-1, 1]) from the VAE's own latents [N, C, h, w]; a video
    VAE's videos [N, 3, F, H, W] from latents [N, C, F', h, w]."""
    z = z.to(device=vae.device, dtype=vae.dtype)
    if z.ndim == 5:
        return vae.decode(z).sample
    if is_video(vae.config):
        return vae.decode(z.unsqueeze(2)).sample[:, :, 0]
    return vae.decode(z).sample
