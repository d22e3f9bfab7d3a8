"""Stable Diffusion components for training: loading, text and image encoding, SDXL conditioning, LoRA.

    comps = load_components("runwayml/stable-diffusion-v1-5")     # or a local diffusers pipeline folder
    comps.is_sdxl                                                  # True when the pipeline has text_encoder_2
    text = encode_prompts(comps, ["a red dog", ""])                # TextConditioning
    moments = encode_latent_moments(comps.vae, pixel_values)       # VAE posterior parameters, no grad
    latents = sample_latents(comps.vae.config, moments, eps)       # scaled latents the UNet sees
    batch = encode_pair_batch(comps, data_batch)                   # a PreferencePairs batch, encoded
    x = pair_inputs(comps.vae.config, batch, noise)                # UNet inputs under shared noise

The reference model of Diffusion-DPO is the starting UNet, held either as a frozen copy (full fine-tune,
:func:`frozen_copy`) or as the policy UNet with its LoRA adapter switched off (:func:`reference_unet`), so a
LoRA run holds one UNet.
"""

from __future__ import annotations

import copy
import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from diffusion_dpo.denoising import PairInputs
from diffusion_dpo.errors import InputError
from scorers.hub import from_hub, looks_local

Tensor = torch.Tensor

# The attention projections, as the diffusers LoRA examples and the paper's follow-ups adapt them.
DEFAULT_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


@dataclass
class Components:
    """Everything a training step needs from a pipeline. Only ``unet`` is ever trained."""

    unet: Any  # UNet2DConditionModel
    vae: Any  # AutoencoderKL
    text_encoders: list  # [CLIPTextModel] or, for SDXL, [CLIPTextModel, CLIPTextModelWithProjection]
    tokenizers: list
    noise_scheduler: Any  # DDPMScheduler with the pipeline's betas and prediction_type
    is_sdxl: bool

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


@dataclass
class TextConditioning:
    """Text encodings of B captions.

    hidden: [B, L, D] cross-attention states (SDXL: both encoders' penultimate layers concatenated on D).
    pooled: [B, D2] pooled output of the second encoder (SDXL only, else None).
    """

    hidden: Tensor
    pooled: Tensor | None = None


def pipeline_index(pretrained: str, revision: str | None = None) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (component name -> [library, class]), from a folder or the hub.

    A hub id that is neither cached nor fetchable (offline, hub unreachable, no such repo) is an error saying
    so; the components are then fetched by their own loaders.
    """
    from diffusers import DiffusionPipeline

    if not looks_local(pretrained):
        return dict(from_hub(lambda local_only: DiffusionPipeline.load_config(
            pretrained, revision=revision, local_files_only=local_only), "diffusers pipeline",
            f"hub id {pretrained!r}", "model.pretrained"))
    try:
        return dict(DiffusionPipeline.load_config(pretrained, revision=revision))
    except (OSError, ValueError) as e:
        raise InputError(
            f"model.pretrained {pretrained!r}: not a diffusers pipeline (a hub id such as "
            f"runwayml/stable-diffusion-v1-5, or a local folder with model_index.json): {e}"
        ) from None


def _component_class(index: dict[str, Any], name: str, pretrained: str):
    entry = index.get(name)
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]):
        raise InputError(f"model.pretrained {pretrained!r}: model_index.json has no component '{name}'")
    library, class_name = entry
    return getattr(importlib.import_module(library), class_name)


def load_components(pretrained: str, *, revision: str | None = None, variant: str | None = None,
                    vae: str | None = None) -> Components:
    """Load the UNet, VAE, text encoder(s), tokenizer(s) and a DDPM training scheduler, all in fp32 on CPU.

    ``pretrained``: hub id or local diffusers pipeline folder. SDXL is recognised by a ``text_encoder_2``
    component in its ``model_index.json``. ``vae``: an optional separate VAE (hub id or folder holding the
    VAE itself, e.g. ``madebyollin/sdxl-vae-fp16-fix``, which the paper's SDXL run used so fp16 does not
    overflow). The frozen modules are returned with ``requires_grad`` off and in eval mode.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    index = pipeline_index(pretrained, revision)
    is_sdxl = bool(index.get("text_encoder_2")) and index["text_encoder_2"][0] is not None
    names = [("tokenizer", "text_encoder")] + ([("tokenizer_2", "text_encoder_2")] if is_sdxl else [])
    where = dict(revision=revision)
    try:
        tokenizers = [_component_class(index, tok, pretrained).from_pretrained(pretrained, subfolder=tok, **where)
                      for tok, _ in names]
        text_encoders = [
            _component_class(index, enc, pretrained).from_pretrained(pretrained, subfolder=enc, variant=variant,
                                                                     **where)
            for _, enc in names
        ]
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", variant=variant, **where)
        image_vae = (AutoencoderKL.from_pretrained(vae) if vae else
                     AutoencoderKL.from_pretrained(pretrained, subfolder="vae", variant=variant, **where))
        # Training samples timesteps from the DDPM forward process of the pipeline's schedule, whatever
        # sampler the pipeline ships with (the betas and prediction_type are what carry over).
        noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **where)
    except OSError as e:
        raise InputError(f"cannot load the components of {pretrained!r}: {e}") from None
    for module in [image_vae, *text_encoders]:
        module.requires_grad_(False).eval()
    return Components(unet=unet, vae=image_vae, text_encoders=text_encoders, tokenizers=tokenizers,
                      noise_scheduler=noise_scheduler, is_sdxl=is_sdxl)


def move(module, device: torch.device | str, dtype: torch.dtype = torch.float32):
    """``module.to(device, dtype)``, not passing an unchanged fp32 dtype (diffusers warns about any cast)."""
    module.to(device)
    if dtype != torch.float32:
        module.to(dtype=dtype)
    return module


def freeze_to(components: Components, device: torch.device, dtype: torch.dtype) -> None:
    """Move the frozen modules (VAE, text encoders) to ``device`` in the compute ``dtype``."""
    for module in [components.vae, *components.text_encoders]:
        move(module, device, dtype)


# --------------------------------------------------------------------------------------------- encoding

@torch.no_grad()
def encode_prompts(components: Components, captions: list[str]) -> TextConditioning:
    """Encode B captions with the frozen text encoder(s).

    SD1.x/2.x: the encoder's last hidden state [B, L, D], as StableDiffusionPipeline conditions on.
    SDXL: each encoder's penultimate hidden state, concatenated on the feature axis ([B, L, D1 + D2]), and
    the second encoder's pooled (projected) output [B, D2], as StableDiffusionXLPipeline.encode_prompt does.
    """
    hidden_states, pooled = [], None
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders):
        ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(encoder.device)
        if components.is_sdxl:
            out = encoder(ids, output_hidden_states=True)
            hidden_states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's pooled output is the one SDXL's add_embedding takes
        else:
            hidden_states.append(encoder(ids)[0])
    return TextConditioning(hidden=torch.cat(hidden_states, dim=-1), pooled=pooled)


def sdxl_time_ids(original_sizes: Tensor, crop_top_lefts: Tensor, target_size: tuple[int, int]) -> Tensor:
    """SDXL micro-conditioning per image: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    original_sizes, crop_top_lefts: [..., 2] (h, w) and (top, left) of each image before/at cropping.
    Returns float [..., 6], the ``time_ids`` that SDXL's UNet embeds (Podell et al. 2023, sec. 2.2).
    """
    target = torch.tensor(target_size, dtype=torch.float32).expand(*original_sizes.shape[:-1], 2)
    return torch.cat([original_sizes.float(), crop_top_lefts.float(), target], dim=-1)


@torch.no_grad()
def encode_latent_moments(vae, pixel_values: Tensor) -> Tensor:
    """VAE posterior parameters (mean and log-variance stacked on channels) of images in [-1, 1].

    pixel_values: [N, 3, H, W]. Returns [N, 2C, H/f, W/f] in the VAE's dtype. Caching these (rather than one
    sample) keeps a pre-computed run sampling a fresh latent each step, as an online run does.
    """
    return vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist.parameters


def sample_latents(vae_config, moments: Tensor, eps: Tensor) -> Tensor:
    """A scaled latent sample z = (mean + std * eps - shift) * scaling_factor, in fp32.

    vae_config: the VAE's ``config``; moments: [N, 2C, h, w] from :func:`encode_latent_moments`;
    eps: [N, C, h, w] standard normal draws.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    dist = DiagonalGaussianDistribution(moments.float())
    shift = vae_config.get("shift_factor") or 0.0
    return (dist.mean + dist.std * eps.to(dist.mean.device) - shift) * vae_config.scaling_factor


@dataclass
class PairBatch:
    """B encoded pairs, what a training step consumes (online from images, or from the latent cache).

    moments: [B, 2, 2C, h, w] VAE posterior parameters, index 0 winner; hidden: [B, L, D] caption states;
    pooled: [B, D2] (SDXL) or None; time_ids: [B, 2, 6] (SDXL, per image) or None; is_tie: bool [B];
    row_indices: long [B] (the data's row ids).
    """

    moments: Tensor
    hidden: Tensor
    pooled: Tensor | None
    time_ids: Tensor | None
    is_tie: Tensor
    row_indices: Tensor

    def to(self, device: torch.device | str) -> "PairBatch":
        def move(t):
            return None if t is None else t.to(device)

        return PairBatch(move(self.moments), move(self.hidden), move(self.pooled), move(self.time_ids),
                         move(self.is_tie), self.row_indices)


@torch.no_grad()
def encode_pair_batch(components: Components, batch: dict[str, Any]) -> PairBatch:
    """Encode a data batch (``PreferencePairs.batches``: pixel_values [B, 2, 3, H, W] in [-1, 1], winner
    first; captions; original_sizes and crop_top_lefts [B, 2, 2]; is_tie; row_indices) with the frozen VAE
    and text encoder(s). SDXL's time ids use each image's own original size and crop, and (H, W) as target.
    """
    pixels = batch["pixel_values"]
    n = pixels.shape[0]
    moments = encode_latent_moments(components.vae, pixels.flatten(0, 1)).unflatten(0, (n, 2))
    text = encode_prompts(components, batch["captions"])
    time_ids = None
    if components.is_sdxl:
        time_ids = sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], tuple(pixels.shape[-2:]))
    return PairBatch(moments, text.hidden, text.pooled, time_ids, batch["is_tie"], batch["row_indices"])


def pair_inputs(vae_config, batch: PairBatch, noise) -> PairInputs:
    """The UNet inputs of a pair batch under its shared noise (a ``denoising.PairNoise``): latents sampled
    from each image's posterior with ``noise.latent_eps``; SDXL's added conditions with the pooled text
    embedding per pair and the time ids per image, winners first."""
    n = batch.moments.shape[0]
    latents = sample_latents(vae_config, batch.moments.flatten(0, 1), noise.latent_eps.flatten(0, 1))
    latents = latents.unflatten(0, (n, 2))
    added = None
    if batch.time_ids is not None:
        time_ids = torch.cat([batch.time_ids[:, 0], batch.time_ids[:, 1]]).to(batch.hidden.device)
        added = {"text_embeds": batch.pooled, "time_ids": time_ids}
    return PairInputs(latents[:, 0], latents[:, 1], batch.hidden, noise.noise, noise.timesteps, added)


# ------------------------------------------------------------------------------------------------- LoRA

def attach_lora(unet, rank: int, alpha: float | None = None, targets: list[str] | None = None) -> None:
    """Add a trainable LoRA adapter (peft) to the UNet's ``targets`` and freeze everything else.

    The adapter's B matrices start at zero ("gaussian" init), so the adapted UNet equals the base UNet at
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
        raise InputError(f"model.lora_targets {targets!r} do not name modules of this UNet: {e}") from None


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


def lora_state_dict(unet) -> dict[str, Tensor]:
    """The adapter weights in the key layout ``pipe.load_lora_weights`` reads."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet, path, is_sdxl: bool) -> None:
    """Write ``path/pytorch_lora_weights.safetensors`` so ``pipe.load_lora_weights(path)`` works."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline
    pipeline_class.save_lora_weights(str(path), unet_lora_layers=lora_state_dict(unet))
