"""Wan (Wan-AI): a rectified-flow video transformer over (1, 2, 2) patches of a causal video VAE's latents
[C, F, h, w], conditioned on UMT5-XXL. Wan 2.1 T2V (1.3B, 14B) has one transformer; Wan 2.2 T2V A14B two
experts of the same class, ``transformer`` for timesteps >= boundary_ratio * 1000 (high noise) and
``transformer_2`` below it (low noise); Wan 2.2 TI2V-5B one transformer that takes its timestep per token.

Text conditioning as ``WanPipeline._get_t5_prompt_embeds`` builds it: each caption cleaned (HTML entities
unescaped twice, ftfy's fixes when ftfy is installed, whitespace collapsed and stripped), tokenized to
max_sequence_length (512) with its attention mask, UMT5's last hidden state, and every state past the
caption's own tokens set to zero. The transformer reads all L states (the zeros included), as the pipeline
passes them, so there is no mask to carry.

Latents: AutoencoderKLWan encodes a video [3, F, H, W] as [C, (F - 1) / t + 1, H / s, W / s] (t, s: its
config's scale_factor_temporal and scale_factor_spatial; F = 4k + 1 for Wan's t = 4), normalised per channel
by latents_mean / latents_std (``models.sample_latents``). Preference data are images, which the VAE encodes
as one-frame videos; training reads their latents [C, h, w] as [C, 1, h, w]. Online sampling draws
``num_frames``-frame videos [C, F', h, w]. The transformer takes the timestep 1000 sigma and predicts the
velocity (noise minus data). Guidance is classifier-free, u + w (c - u), against the empty negative prompt
(the pipeline's default), with no unconditional pass at w <= 1.

Sampling: the Wan checkpoints ship UniPCMultistepScheduler over flow sigmas (``use_flow_sigmas``, shifted by
``flow_shift``). Training and online sampling use the flow-matching Euler scheduler with the same shift
(``training_scheduler``), and the online sampler visits UniPC's timesteps (``sampling_sigmas``); its steps are
Euler (ODE) or Flow-GRPO SDE steps, not UniPC's predictor-corrector, so a pipeline that ships UniPC samples
other videos from the same seed at few steps. A pipeline that ships FlowMatchEulerDiscreteScheduler (the
tiny one, Wan's own training setup) is sampled exactly as the pipeline samples it.

Two experts (Wan 2.2 A14B): the trained denoiser is ``transformer``, the high-noise expert; the frozen
``transformer_2`` is loaded alongside it, and :meth:`WanFamily.forward` routes every row whose timestep is
below the boundary to it, as the pipeline switches experts (guidance_scale_2 is the pipeline's default, the
same scale). Rows routed to the frozen expert carry no gradient.
"""

from __future__ import annotations

import html
import re
from typing import Any, Callable

import torch

from diffusion_dpo.errors import InputError
from diffusion_dpo.families.base import Family, save_peft_layout_lora

Tensor = torch.Tensor

NEGATIVE_PROMPT = ""  # WanPipeline.encode_prompt's negative prompt when none is given


def clean_prompt(text: str) -> str:
    """WanPipeline's prompt cleaning: ftfy's fix_text (when ftfy is installed), HTML entities unescaped
    twice, runs of whitespace made one space, and the ends stripped."""
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def video_factors(vae_config) -> tuple[int, int]:
    """(temporal, spatial): how many frames and px one latent frame and pixel span (AutoencoderKLWan's
    scale_factor_temporal and scale_factor_spatial, the values WanPipeline reads; 4 and 8 for Wan 2.1)."""
    return int(vae_config.get("scale_factor_temporal") or 4), int(vae_config.get("scale_factor_spatial") or 8)


def latent_frames(vae_config, num_frames: int) -> int:
    """F' = (F - 1) // t + 1 latent frames of an F-frame video; F must be t k + 1 (WanPipeline rounds any
    other count down to one; here it is an error, so the tuned and the evaluated videos are the same length)."""
    t, _ = video_factors(vae_config)
    if num_frames < 1 or (num_frames - 1) % t:
        raise InputError(f"num_frames {num_frames}: Wan's VAE takes {t} k + 1 frames (1, {t + 1}, "
                         f"{2 * t + 1}, ...)")
    return (num_frames - 1) // t + 1


class WanFamily(Family):
    name = "wan"
    pipeline_class = "WanPipeline"
    denoiser_name = "transformer"
    denoiser_class = "WanTransformer3DModel"
    text_components = (("tokenizer", "text_encoder"),)
    flow = True
    dpo_beta = 100.0  # as the other flow families (Family.dpo_beta)
    max_sequence_length = 512  # WanPipeline.__call__'s default
    online_guidance_scale = 5.0  # WanPipeline's default guidance_scale
    unguided_scale = 1.0  # the pipeline guides only at guidance_scale > 1; at 1 u + w (c - u) = c
    # label / evaluate's side when none is given: WanPipeline's default height (its default width is 832,
    # which it generates at when neither is given)
    native_resolution = 480
    video = True

    def __init__(self):
        self.low_noise: Any = None  # Wan 2.2's frozen transformer_2
        self.boundary: float | None = None  # boundary_ratio * num_train_timesteps
        self.unipc_sigmas = False  # the pipeline ships UniPC over flow sigmas

    # ------------------------------------------------------------------------------------------ loading
    def load(self, pretrained: str, load: Callable[..., Any], vae: str | None = None) -> dict[str, Any]:
        """As Family.load, a separate ``vae`` being an AutoencoderKLWan. A two-expert pipeline (Wan 2.2
        A14B: transformer_2 and boundary_ratio in model_index.json) also loads transformer_2, frozen."""
        from diffusers import AutoencoderKLWan, DiffusionPipeline

        comps = super().load(pretrained, load, None)
        if vae:
            comps["vae"] = AutoencoderKLWan.from_pretrained(vae).requires_grad_(False).eval()
        index = DiffusionPipeline.load_config(pretrained)  # model_index.json, read (and cached) by detect
        ratio = index.get("boundary_ratio")
        has_second = bool((index.get("transformer_2") or [None, None])[1])
        if ratio is not None and has_second:
            self.low_noise = load("transformer_2", weights=True).requires_grad_(False).eval()
            self.boundary = float(ratio) * comps["noise_scheduler"].config.num_train_timesteps
        return comps

    def training_scheduler(self, pretrained: str, load: Callable[..., Any]):
        """The pipeline's FlowMatchEulerDiscreteScheduler, or for one that ships UniPCMultistepScheduler over
        flow sigmas (the Wan checkpoints) a FlowMatchEulerDiscreteScheduler with its flow_shift and
        num_train_timesteps; the online sampler then visits UniPC's sigmas (``sampling_sigmas``)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        shipped = load("scheduler", weights=False)
        if isinstance(shipped, FlowMatchEulerDiscreteScheduler):
            return shipped
        config = shipped.config
        if not config.get("use_flow_sigmas"):
            raise InputError(f"model.pretrained {pretrained!r}: Wan scheduler {type(shipped).__name__} does not "
                             "sample flow sigmas (expected FlowMatchEulerDiscreteScheduler, or UniPC with "
                             "use_flow_sigmas)")
        self.unipc_sigmas = True
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.num_train_timesteps,
                                               shift=float(config.get("flow_shift", 1.0)))

    def save_lora(self, denoiser, folder) -> None:
        """The adapter in peft's key layout, which WanLoraLoaderMixin reads whole (``save_peft_layout_lora``)."""
        save_peft_layout_lora(self.pipeline_class, denoiser, folder)

    # ------------------------------------------------------------------------------------- conditioning
    def text_length(self, tokenizer) -> int:
        """L: the caption tokens kept, min(512, the tokenizer's model_max_length)."""
        return min(self.max_sequence_length, tokenizer.model_max_length)

    @torch.no_grad()
    def encode_text(self, comps, captions: list[str]) -> dict[str, Tensor]:
        """{"hidden": [B, L, D]}: UMT5's last hidden state of each cleaned caption, zero past its tokens."""
        tokenizer, encoder = comps.tokenizers[0], comps.text_encoders[0]
        tokens = tokenizer([clean_prompt(c) for c in captions], padding="max_length",
                           max_length=self.text_length(tokenizer), truncation=True, add_special_tokens=True,
                           return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(encoder.device)
        hidden = encoder(tokens.input_ids.to(encoder.device), mask).last_hidden_state
        return {"hidden": hidden * mask[..., None].to(hidden.dtype)}

    def encode_empty_prompt(self, comps) -> dict[str, Tensor]:
        return self.encode_text(comps, [NEGATIVE_PROMPT])

    def call_options(self, pipe) -> dict:
        """{"max_sequence_length": L}: the caption length training encodes with."""
        return {"max_sequence_length": self.text_length(pipe.tokenizer)}

    def pipeline_images(self, pipe, **kwargs) -> list:
        """Images from WanPipeline: one-frame videos (``num_frames=1``), each video's frame, as the family
        trains on images (one-frame latents). Longer videos are what grpo samples (``sampling.num_frames``)."""
        return [video[0] for video in pipe(num_frames=1, **kwargs).frames]

    def guide(self, uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
        """u + w (c - u) at w > 1; the conditional prediction alone at w <= 1, as the pipeline."""
        return cond if scale <= 1 else uncond + scale * (cond - uncond)

    # --------------------------------------------------------------------------------------- the video
    def latent_shape(self, vae_config, side: int, num_frames: int = 1) -> tuple[int, ...]:
        """(C, F', h, w): the latent of a ``num_frames``-frame ``side`` px square video."""
        from diffusion_dpo.vae_layout import latent_channels

        _, s = video_factors(vae_config)
        return (latent_channels(vae_config), latent_frames(vae_config, num_frames), side // s, side // s)

    def default_resolution(self, vae_config) -> int:
        """The pipeline's default height, 480 px (its width is 832; online sampling is square)."""
        return 480

    def sampling_sigmas(self, num_inference_steps: int):
        """UniPC's flow sigmas linspace(1, 1/1000, T + 1)[:-1] (shifted by the scheduler) when the pipeline
        ships UniPC; None (the Euler scheduler's own spacing) when it ships FlowMatchEulerDiscreteScheduler."""
        if not self.unipc_sigmas:
            return None
        import numpy as np

        return np.linspace(1.0, 1 / 1000, num_inference_steps + 1)[:-1]

    # ------------------------------------------------------------------------------------- the denoiser
    def forward(self, denoiser, noisy: Tensor, timestep: Tensor, text: dict[str, Tensor],
                image: dict[str, Tensor]) -> Tensor:
        """The velocity for latents [N, C, F, h, w] (or images [N, C, h, w], read as one frame) at timesteps
        [N] (1000 sigma, what the transformer takes). Rows below a two-expert pipeline's boundary go to the
        frozen low-noise expert, as the pipeline switches experts."""
        x = noisy if noisy.ndim == 5 else noisy.unsqueeze(2)
        hidden = text["hidden"]
        if self.low_noise is None:
            out = _call(denoiser, x, timestep, hidden)
        else:
            low = timestep < self.boundary
            out = torch.empty_like(x)
            if bool((~low).any()):
                out[~low] = _call(denoiser, x[~low], timestep[~low], hidden[~low]).to(x.dtype)
            if bool(low.any()):
                expert = self.low_noise.to(x.device)
                out[low] = _call(expert, x[low], timestep[low], hidden[low]).to(x.dtype)
        out = out.to(noisy.dtype)
        return out if noisy.ndim == 5 else out.squeeze(2)


def _call(transformer, x: Tensor, timestep: Tensor, hidden: Tensor) -> Tensor:
    """The transformer's output (a DDP wrapper's too: no module attributes read here)."""
    return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=hidden, return_dict=False)[0]

