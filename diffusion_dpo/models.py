"""Diffusion components for training, whatever the model family: loading, image encoding, pair batches, LoRA.

    comps = load_components("stable-diffusion-v1-5/stable-diffusion-v1-5")  # or a local diffusers pipeline folder
    comps.family                                                   # SDFamily, SDXLFamily, SD3Family, FluxFamily
    text = encode_prompts(comps, ["a red dog", ""])                # {name: [B, ...]} the denoiser reads
    moments = encode_latent_moments(comps.vae, pixel_values)       # VAE posterior parameters, no grad
    latents = sample_latents(comps.vae.config, moments, eps)       # scaled latents the denoiser sees
    batch = encode_pair_batch(comps, data_batch)                   # a PreferencePairs batch, encoded
    x = pair_inputs(comps.vae.config, batch, noise)                # denoiser inputs under shared noise

What differs between families (components, text encoding, conditioning, noise process, denoiser call, LoRA
targets, final/ format) lives in ``diffusion_dpo.families``. The reference model of Diffusion-DPO is the
starting denoiser, held either as a frozen copy (full fine-tune, :func:`frozen_copy`) or as the policy with
its LoRA adapter switched off (:func:`reference_unet`), so a LoRA run holds one denoiser.
"""

from __future__ import annotations

import copy
import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from diffusion_dpo import vae_layout
from diffusion_dpo.denoising import PairInputs
from diffusion_dpo.errors import InputError
from diffusion_dpo.families import DEFAULT_LORA_TARGETS, SDFamily, SDXLFamily, detect_index, pipeline_index

Tensor = torch.Tensor

# The attention projections, as the diffusers LoRA examples and the paper's follow-ups adapt them.


class Components:
    """Everything a training step needs from a pipeline. Only ``denoiser`` is ever trained.

    denoiser: UNet2DConditionModel or a transformer; vae: AutoencoderKL; text_encoders / tokenizers in the
    family's order; noise_scheduler: DDPMScheduler (DDPM families) or the pipeline's flow-matching scheduler;
    family: the :class:`~diffusion_dpo.families.base.Family`; pipeline_config: the pipeline's own settings
    from model_index.json (e.g. SDXL's force_zeros_for_empty_prompt). ``unet=`` and ``is_sdxl=`` construct an
    SD or SDXL set as callers from before the families did (``comps.unet`` is the denoiser).
    """

    def __init__(self, denoiser=None, vae=None, text_encoders=(), tokenizers=(), noise_scheduler=None,
                 family=None, *, unet=None, is_sdxl: bool = False):
        self.denoiser = denoiser if denoiser is not None else unet
        self.vae, self.noise_scheduler = vae, noise_scheduler
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.family = family if family is not None else (SDXLFamily() if is_sdxl else SDFamily())
        self.pipeline_config: dict[str, Any] = {}

    @property
    def unet(self):
        return self.denoiser

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.get("prediction_type") or "flow"


def _component_class(index: dict[str, Any], name: str, pretrained: str):
    entry = index.get(name)
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]):
        raise InputError(f"model.pretrained {pretrained!r}: model_index.json has no component '{name}'")
    library, class_name = entry
    return getattr(importlib.import_module(library), class_name)


def load_components(pretrained: str, *, revision: str | None = None, variant: str | None = None,
                    vae: str | None = None, expert: str | None = None) -> Components:
    """Load the family's denoiser, VAE, text encoder(s), tokenizer(s) and training scheduler, in fp32 on CPU.

    ``pretrained``: hub id or local diffusers pipeline folder; its family is detected from model_index.json.
    ``vae``: an optional separate VAE (hub id or folder holding the VAE itself, e.g.
    ``madebyollin/sdxl-vae-fp16-fix``, which the paper's SDXL run used so fp16 does not overflow). The
    frozen modules are returned with ``requires_grad`` off and in eval mode. ``expert``: model.expert, the
    denoiser that trains in a two-expert pipeline (``Family.choose_expert``).
    """
    index = pipeline_index(pretrained, revision)
    family = detect_index(index, pretrained)
    family.choose_expert(expert, index, pretrained)

    def load(name: str, weights: bool = True, cls=None):
        """The component ``name`` (the class model_index.json names, or ``cls``) from its subfolder."""
        component_class = cls or _component_class(index, name, pretrained)
        kwargs = {"variant": variant} if weights else {}
        return component_class.from_pretrained(pretrained, subfolder=name, revision=revision, **kwargs)

    try:
        comps = Components(**family.load(pretrained, load, vae))
    except OSError as e:
        raise InputError(f"cannot load the components of {pretrained!r}: {e}") from None
    comps.pipeline_config = {k: v for k, v in index.items() if not isinstance(v, (list, tuple))}
    return comps


def move(module, device: torch.device | str, dtype: torch.dtype = torch.float32):
    """``module.to(device, dtype)``, not passing an unchanged fp32 dtype (diffusers warns about any cast)."""
    module.to(device)
    if dtype != torch.float32:
        module.to(dtype=dtype)
    return module


def freeze_to(components: Components, device: torch.device, dtype: torch.dtype) -> None:
    """Move the frozen modules (VAE, text encoders, a family's own: Wan 2.2's frozen expert) to ``device`` in
    the compute ``dtype``."""
    for module in [components.vae, *components.text_encoders, *components.family.frozen_modules()]:
        move(module, device, dtype)


# --------------------------------------------------------------------------------------------- encoding

def encode_prompts(components: Components, captions: list[str]) -> dict[str, Tensor]:
    """Encode B captions with the frozen text encoder(s) as the family conditions on: {name: [B, ...]}."""
    return components.family.encode_text(components, list(captions))


@torch.no_grad()
def encode_latent_moments(vae, pixel_values: Tensor) -> Tensor:
    """VAE posterior parameters (mean and log-variance stacked on channels) of images in [-1, 1].

    pixel_values: [N, 3, H, W]. Returns [N, 2C, H/f, W/f] in the VAE's dtype (a VAE whose config names
    ``latents_patch_size`` p: each half patchified, [N, 2 p^2 C, H/pf, W/pf]; a video VAE's one frame,
    ``vae_layout.encode_moments``). Caching these (rather than one sample) keeps a pre-computed run sampling a
    fresh latent each step, as an online run does.
    """
    moments = vae_layout.encode_moments(vae, pixel_values)
    if vae.config.get("latents_patch_size"):  # FLUX.2: the denoiser's latent is the 2x2-patchified one
        from diffusion_dpo.families.flux2 import patchify

        mean, logvar = moments.chunk(2, dim=1)
        moments = torch.cat([patchify(mean), patchify(logvar)], dim=1)
    return moments


def sample_latents(vae_config, moments: Tensor, eps: Tensor) -> Tensor:
    """A scaled latent sample z = (mean + std * eps - shift) * scaling_factor, in fp32; a VAE whose config
    holds per-channel ``latents_mean`` / ``latents_std`` (FLUX.2's batch-norm statistics, the video VAEs' of
    Qwen-Image and Wan) normalises per channel instead: z = (sample - latents_mean[c]) / latents_std[c].

    vae_config: the VAE's ``config``; moments: [N, 2C, h, w] from :func:`encode_latent_moments`;
    eps: [N, C, h, w] standard normal draws.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    dist = DiagonalGaussianDistribution(moments.float())
    sample = dist.mean + dist.std * eps.to(dist.mean.device)
    if _per_channel(vae_config):
        mean, std = _channel_stats(vae_config, sample)
        return (sample - mean) / std
    shift = vae_config.get("shift_factor") or 0.0
    return (sample - shift) * vae_config.scaling_factor


def unscale_latents(vae_config, latents: Tensor) -> Tensor:
    """The inverse of :func:`sample_latents`' scaling: what the VAE decoder takes, [N, C', h', w'] (a video
    family's [N, C, F', h, w] too; FLUX.2:
    de-normalised and unpatchified back to the VAE's own C channels at twice the side)."""
    if vae_config.get("latents_patch_size"):
        from diffusion_dpo.families.flux2 import unpatchify

        mean, std = _channel_stats(vae_config, latents)
        return unpatchify(latents * std + mean)
    if _per_channel(vae_config):
        mean, std = _channel_stats(vae_config, latents)
        return latents * std + mean
    return latents / vae_config.scaling_factor + (vae_config.get("shift_factor") or 0.0)


def _per_channel(vae_config) -> bool:
    """Whether the VAE's latents are normalised per channel (FLUX.2's patchified latents, a video VAE's)
    rather than by one scaling_factor and shift_factor."""
    return bool(vae_config.get("latents_patch_size")) or vae_layout.is_video(vae_config)


def _channel_stats(vae_config, like: Tensor) -> tuple[Tensor, Tensor]:
    """``latents_mean`` and ``latents_std`` as [1, C, 1, 1] (a video's [1, C, 1, 1, 1]) on ``like``'s device
    and dtype."""
    to, shape = dict(device=like.device, dtype=like.dtype), (1, -1, *([1] * (like.ndim - 2)))
    return (torch.tensor(vae_config.latents_mean, **to).view(shape),
            torch.tensor(vae_config.latents_std, **to).view(shape))


@dataclass
class PairBatch:
    """B encoded pairs, what a training step consumes (online from images, or from the latent cache).

    moments: [B, 2, 2C, h, w] VAE posterior parameters, index 0 winner; text: the caption's conditioning
    {name: [B, ...]}; image: per-image conditioning {name: [B, 2, ...]} (SDXL's time_ids [B, 2, 6]);
    is_tie: bool [B]; row_indices: long [B] (the data's row ids).
    """

    moments: Tensor
    text: dict[str, Tensor]
    image: dict[str, Tensor]
    is_tie: Tensor
    row_indices: Tensor

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(self.moments.to(device), {k: v.to(device) for k, v in self.text.items()},
                         {k: v.to(device) for k, v in self.image.items()}, self.is_tie.to(device), self.row_indices)


@torch.no_grad()
def encode_pair_batch(components: Components, batch: dict[str, Any]) -> PairBatch:
    """Encode a data batch (``PreferencePairs.batches``: pixel_values [B, 2, 3, H, W] in [-1, 1], winner
    first, or videos [B, 2, 3, F, H, W] for a family that trains on them; captions; original_sizes and crop_top_lefts [B, 2, 2]; is_tie; row_indices) with the frozen VAE
    and text encoder(s), and the family's per-image conditioning at target size (H, W)."""
    pixels = batch["pixel_values"]
    n = pixels.shape[0]
    if pixels.ndim == 6:  # videos [B, 2, 3, F, H, W]
        check_video_pairs(components, pixels.shape[3], batch["row_indices"])
    moments = encode_latent_moments(components.vae, pixels.flatten(0, 1)).unflatten(0, (n, 2))
    text = encode_prompts(components, batch["captions"])
    image = components.family.image_conditioning(batch, tuple(pixels.shape[-2:]))
    return PairBatch(moments, text, image, batch["is_tie"], batch["row_indices"])


def check_video_pairs(components: Components, frames: int, rows: Tensor) -> None:
    """Video pairs need a family that trains on videos and t k + 1 frames for its VAE's temporal factor t;
    otherwise an InputError naming the data rows."""
    family, config = components.family, components.vae.config
    where = f"data rows {rows.tolist()}"
    if not family.trains_videos:
        raise InputError(f"{where} hold {frames}-frame videos, but the {family.name} family trains on images; "
                         "give images, or a video family's pipeline (wan)")
    t = vae_layout.temporal_factor(config)
    if (frames - 1) % t:
        raise InputError(f"{where} hold {frames}-frame videos; the VAE takes {t} k + 1 frames (1, {t + 1}, "
                         f"{2 * t + 1}, ...)")


def pair_inputs(vae_config, batch: PairBatch, noise) -> PairInputs:
    """The denoiser inputs of a pair batch under its shared noise (a ``denoising.PairNoise``): latents
    sampled from each image's posterior with ``noise.latent_eps``; per-image conditioning winners first."""
    n = batch.moments.shape[0]
    latents = sample_latents(vae_config, batch.moments.flatten(0, 1), noise.latent_eps.flatten(0, 1))
    latents = latents.unflatten(0, (n, 2))
    image = {k: torch.cat([v[:, 0], v[:, 1]]).to(batch.moments.device) for k, v in batch.image.items()}
    return PairInputs(latents[:, 0], latents[:, 1], noise.noise, noise.timesteps, batch.text, image)


# ------------------------------------------------------------------------------------------------- LoRA

def attach_lora(unet, rank: int, alpha: float | None = None, targets: list[str] | None = None) -> None:
    """Add a trainable LoRA adapter (peft) to the denoiser's ``targets`` and freeze everything else.

    The adapter's B matrices start at zero ("gaussian" init), so the adapted denoiser equals the base at
    step 0 and the first Diffusion-DPO loss is ln 2. ``alpha`` None means alpha = rank (scale 1).
    """
    from peft import LoraConfig

    if rank < 1:
        raise InputError(f"model.lora_rank must be >= 1 to attach LoRA, got {rank}")
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank),
                        init_lora_weights="gaussian", target_modules=list(targets or DEFAULT_LORA_TARGETS))
    try:
        unet.add_adapter(config)
    except ValueError as e:
        raise InputError(f"model.lora_targets {targets!r} do not name modules of this denoiser: {e}") from None


def has_lora(unet) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False))


def frozen_copy(unet, dtype: torch.dtype):
    """The reference of a full fine-tune: a copy of the starting UNet in the compute dtype, eval, no grad."""
    reference = move(copy.deepcopy(unet), unet.device, dtype)
    return reference.eval().requires_grad_(False)


@contextmanager
def reference_unet(policy, frozen=None) -> Iterator[Any]:
    """Yield the reference UNet: ``frozen`` if given (full fine-tune), else ``policy`` (the unwrapped
    module, not a DDP wrapper) with its LoRA adapter disabled until the block exits. Call it under no_grad.
    """
    if frozen is not None:
        yield frozen
        return
    policy.disable_adapters()
    try:
        yield policy
    finally:
        policy.enable_adapters()  # also turns requires_grad back on for the adapter weights


def trainable_parameters(unet) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def save_lora(unet, path, is_sdxl: bool) -> None:
    """Write an SD or SDXL UNet's adapter to ``path/pytorch_lora_weights.safetensors`` for
    ``pipe.load_lora_weights(path)`` (other families: ``family.save_lora``)."""
    (SDXLFamily() if is_sdxl else SDFamily()).save_lora(unet, path)
