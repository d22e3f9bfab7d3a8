"""The ``model.*`` and ``sampling.*`` config sections of the commands that generate images with a diffusers
pipeline (label, evaluate); :func:`diffusion_dpo.sampling.load_pipeline` takes their values."""

from __future__ import annotations

from dataclasses import dataclass

from diffusion_dpo.config import at_least_one, option


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
    scheduler: str | None = option(None, "diffusers scheduler class to sample with (e.g. "
                                   "DPMSolverMultistepScheduler); null: the checkpoint's own")
