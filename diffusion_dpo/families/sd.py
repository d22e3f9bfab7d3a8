"""Stable Diffusion 1.x/2.x and SDXL: a UNet trained with the DDPM forward process.

SD1.x/2.x condition the UNet's cross-attention on the CLIP text encoder's last hidden state. SDXL
concatenates both encoders' penultimate hidden states, and adds the second encoder's pooled (projected)
output and six micro-conditioning numbers per image to the time embedding (Podell et al. 2023, sec. 2.2).
"""

from __future__ import annotations

from typing import Any

import torch

from diffusion_dpo.denoising import unet_forward
from diffusion_dpo.families.base import Family, tokenize

Tensor = torch.Tensor


class SDFamily(Family):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    denoiser_name = "unet"
    denoiser_class = "UNet2DConditionModel"
    text_components = (("tokenizer", "text_encoder"),)

    @classmethod
    def matches(cls, index: dict[str, Any]) -> bool:
        # Any UNet pipeline with one text encoder (img2img, inpainting and custom SD pipelines included).
        return bool(index.get("unet")) and not (index.get("text_encoder_2") or [None])[0]

    def shard_blocks(self, unet) -> list:
        """The UNet's down blocks, mid block and up blocks: the resolution stages, each a few resnets with
        their attention (its ``_no_split_modules`` names pieces smaller than a stage)."""
        return [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]

    @torch.no_grad()
    def encode_text(self, comps, captions: list[str]) -> dict[str, Tensor]:
        """{"hidden": [B, L, D]}: the last hidden state, as StableDiffusionPipeline conditions on."""
        tokenizer, encoder = comps.tokenizers[0], comps.text_encoders[0]
        return {"hidden": encoder(tokenize(tokenizer, captions, tokenizer.model_max_length, encoder.device))[0]}

    def forward(self, denoiser, noisy: Tensor, timestep: Tensor, text: dict[str, Tensor],
                image: dict[str, Tensor]) -> Tensor:
        return unet_forward(denoiser, noisy, timestep, text, image)


def sdxl_time_ids(original_sizes: Tensor, crop_top_lefts: Tensor, target_size: tuple[int, int]) -> Tensor:
    """SDXL micro-conditioning per image: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    original_sizes, crop_top_lefts: [..., 2] (h, w) and (top, left) of each image before/at cropping.
    Returns float [..., 6], the ``time_ids`` that SDXL's UNet embeds (Podell et al. 2023, sec. 2.2).
    """
    target = torch.tensor(target_size, dtype=torch.float32).expand(*original_sizes.shape[:-1], 2)
    return torch.cat([original_sizes.float(), crop_top_lefts.float(), target], dim=-1)


class SDXLFamily(SDFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_components = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))

    @classmethod
    def matches(cls, index: dict[str, Any]) -> bool:
        return bool(index.get("unet")) and bool((index.get("text_encoder_2") or [None])[0])

    @torch.no_grad()
    def encode_text(self, comps, captions: list[str]) -> dict[str, Tensor]:
        """{"hidden": [B, L, D1 + D2], "pooled": [B, D2]}: each encoder's penultimate hidden state,
        concatenated on features, and the second's pooled output, as StableDiffusionXLPipeline.encode_prompt."""
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(comps.tokenizers, comps.text_encoders):
            out = encoder(tokenize(tokenizer, captions, tokenizer.model_max_length, encoder.device),
                          output_hidden_states=True)
            hidden_states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's pooled output is the one SDXL's add_embedding takes
        return {"hidden": torch.cat(hidden_states, dim=-1), "pooled": pooled}

    def encode_empty_prompt(self, comps) -> dict[str, Tensor]:
        """Zeros when the pipeline's force_zeros_for_empty_prompt is on (its default, and SDXL base's
        setting): StableDiffusionXLPipeline then guides against zero embeddings, not the encoded ""."""
        empty = self.encode_text(comps, [""])
        if comps.pipeline_config.get("force_zeros_for_empty_prompt", True):
            return {k: torch.zeros_like(v) for k, v in empty.items()}
        return empty

    def image_conditioning(self, batch: dict[str, Any], size: tuple[int, int]) -> dict[str, Tensor]:
        """{"time_ids": [B, 2, 6]}: each image's own original size and crop, and (H, W) as target."""
        return {"time_ids": sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], size)}
