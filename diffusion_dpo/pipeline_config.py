"""The ``model.*`` and ``sampling.*`` config sections of the commands that generate images with a diffusers
pipeline (label, evaluate); :func:`diffusion_dpo.sampling.load_pipeline` takes their values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from diffusion_dpo.config import at_least_one, non_negative, option


@dataclass
class PipelineSection:
    """``model.*`` of every command that generates images (label, evaluate): a base checkpoint, optionally
    with tuned weights on it."""

    pretrained: str = option("stable-diffusion-v1-5/stable-diffusion-v1-5",
                             "the base checkpoint: a hub id or a local diffusers pipeline folder")
    denoiser: str | None = option(None, "tuned weights: a denoiser folder (UNet, or SD3/FLUX transformer; a full "
                                  "fine-tune's final/) replacing the base's; null: the base's")
    lora: str | None = option(None, "tuned weights: LoRA weights (a LoRA run's final/ or a .safetensors file) "
                              "fused into the denoiser; null: none")


@dataclass
class SamplingSection:
    """``sampling.*`` of every command that generates images with a pipeline's own sampler."""

    num_inference_steps: int = option(50, "denoising steps per image", at_least_one, "at least 1")
    guidance_scale: float = option(7.5, "classifier-free guidance scale (1 = no guidance); FLUX.1-dev: its "
                                   "embedded guidance value (3.5 is FLUX-dev's default)")
    height: int | None = option(None, "image height in px; null: the checkpoint's native size (512 SD1.5, "
                                "1024 SDXL, SD3 and FLUX)")
    width: int | None = option(None, "image width in px; null: the checkpoint's native size")
    num_frames: int = option(1, "video families (Wan): frames per video, t k + 1 for the VAE's temporal factor "
                             "t (Wan: 1, 5, 9, ..., 81); evaluate scores every frame and averages, and saves "
                             "each video as an animated WebP beside a PNG of its first, middle and last "
                             "frames. 1: images (label takes only 1: its pairs train on images)",
                             at_least_one, "at least 1")
    scheduler: str | None = option(None, "diffusers scheduler class to sample with (e.g. "
                                   "DPMSolverMultistepScheduler); null: the checkpoint's own")


@dataclass
class ModelConfig:
    pretrained: str = option("stable-diffusion-v1-5/stable-diffusion-v1-5", "the pipeline to tune: a hub id or a "
                             "local diffusers folder (its family, SD1.x/2.x, SDXL, SD3 or FLUX.1, read from "
                             "model_index.json); 'tiny' / 'tiny-sdxl' / 'tiny-sd3' / 'tiny-flux': build a tiny random pipeline into "
                             "<output_dir>/tiny/ (offline)")
    revision: Optional[str] = option(None, "hub revision (branch, tag or commit) of model.pretrained")
    variant: Optional[str] = option(None, "weight-file variant to load, e.g. 'fp16' (null: the full files)")
    vae: Optional[str] = option(None, "a separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix "
                                "as the paper's SDXL run; null: the pipeline's own")
    lora_rank: int = option(0, "0: full fine-tune of the denoiser (UNet or transformer); r > 0: train a rank-r "
                            "LoRA adapter instead",
                            non_negative, "0 (full fine-tune) or a positive LoRA rank")
    lora_alpha: Optional[float] = option(None, "LoRA alpha (scale alpha/rank); null: equal to lora_rank",
                                         lambda v: v is None or v > 0, "null or a positive number")
    lora_targets: Optional[list[str]] = option(None, "module names LoRA adapts; null: the family's (the "
                                               "attention projections to_q, to_k, to_v, to_out.0)",
                                               lambda v: v is None or bool(v), "null or at least one name")
    expert: Optional[str] = option(None, "a two-expert pipeline (Wan 2.2 A14B): the expert that trains, "
                                   "transformer (high noise: timesteps >= boundary_ratio x 1000) or transformer_2 "
                                   "(low noise); the other stays frozen and denoises its own timesteps, as the "
                                   "pipeline switches them. null: the pipeline's one denoiser (an error for two)",
                                   lambda v: v in (None, "transformer", "transformer_2"),
                                   "null, transformer or transformer_2")
    gradient_checkpointing: bool = option(False, "recompute denoiser activations in backward (less memory, "
                                          "~30% slower; the paper's code turns it on for SDXL)")
