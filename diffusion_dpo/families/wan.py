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
as one-frame videos (training reads their latents [C, h, w] as [C, 1, h, w]), or videos of t k + 1 frames
(``data.videos``), encoded whole to [C, F', h, w]. Online sampling draws
``num_frames``-frame videos [C, F', h, w]. The transformer takes the timestep 1000 sigma and predicts the
velocity (noise minus data). Guidance is classifier-free, u + w (c - u), against the empty negative prompt
(the pipeline's default), with no unconditional pass at w <= 1.

Sampling: the Wan checkpoints ship UniPCMultistepScheduler over flow sigmas (``use_flow_sigmas``, shifted by
``flow_shift``). Training and online sampling use the flow-matching Euler scheduler with the same shift
(``training_scheduler``), and the online sampler visits UniPC's timesteps (``sampling_sigmas``); its steps are
Euler (ODE) or Flow-GRPO SDE steps, not UniPC's predictor-corrector, so a pipeline that ships UniPC samples
other videos from the same seed at few steps. A pipeline that ships FlowMatchEulerDiscreteScheduler (the
tiny one, Wan's own training setup) is sampled exactly as the pipeline samples it.

Two experts (Wan 2.2 A14B): ``model.expert`` names the one that trains, ``transformer`` (high noise,
timesteps >= boundary_ratio x 1000) or ``transformer_2`` (low noise); null is an error for such a pipeline.
The other is loaded frozen, and :meth:`WanFamily.forward` routes each row to the expert the pipeline would
use at its timestep (guidance_scale_2 is the pipeline's default, the same scale). Rows routed to the frozen
expert carry no gradient, so with timesteps drawn over the whole range only the trained expert's share
teaches (``noise.*`` shapes the draw). A tuned transformer_2 is marked in final/ (``EXPERT_FILE``), so
evaluate and label load it (or its LoRA, ``load_into_transformer_2``) into transformer_2.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any, Callable

import torch

from diffusion_dpo.errors import InputError
from diffusion_dpo.families.base import Family, save_peft_layout_lora

Tensor = torch.Tensor

NEGATIVE_PROMPT = ""  # WanPipeline.encode_prompt's negative prompt when none is given
EXPERTS = ("transformer", "transformer_2")  # Wan 2.2 A14B's high-noise and low-noise experts
EXPERT_FILE = "wan_expert.json"  # in a final/ whose weights are transformer_2's: {"expert": "transformer_2"}


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
    trains_videos = True  # video pairs: pixels [3, F, H, W] -> latents [C, F', h, w] (data.videos)
    # label / evaluate's side when none is given: WanPipeline's default height (its default width is 832,
    # which it generates at when neither is given)
    native_resolution = 480

    def __init__(self):
        self.frozen_expert: Any = None  # Wan 2.2: the expert that does not train
        self.boundary_ratio: float | None = None
        self.boundary: float | None = None  # boundary_ratio * num_train_timesteps
        self.unipc_sigmas = False  # the pipeline ships UniPC over flow sigmas

    # ------------------------------------------------------------------------------------------ loading
    def choose_expert(self, expert: str | None, index: dict[str, Any], pretrained: str) -> None:
        """A two-expert pipeline (transformer_2 and boundary_ratio in model_index.json) trains the expert
        ``expert`` names and needs one; a one-transformer pipeline takes null."""
        two = index.get("boundary_ratio") is not None and bool((index.get("transformer_2") or [None, None])[1])
        if two and expert is None:
            raise InputError(f"config key 'model.expert': {pretrained!r} has two experts (Wan 2.2: transformer "
                             "for timesteps >= boundary_ratio x 1000, transformer_2 below); name the one that "
                             "trains, transformer or transformer_2 (the other stays frozen)")
        if not two and expert is not None:
            raise InputError(f"config key 'model.expert': {pretrained!r} has one transformer; expected null, "
                             f"got {expert!r}")
        if two:
            self.denoiser_name, self.boundary_ratio = expert, float(index["boundary_ratio"])

    def load(self, pretrained: str, load: Callable[..., Any], vae: str | None = None) -> dict[str, Any]:
        """As Family.load (the trained expert as the denoiser), a separate ``vae`` being an AutoencoderKLWan;
        a two-expert pipeline's other expert loaded frozen."""
        from diffusers import AutoencoderKLWan

        comps = super().load(pretrained, load, None)
        if vae:
            comps["vae"] = AutoencoderKLWan.from_pretrained(vae).requires_grad_(False).eval()
        if self.boundary_ratio is not None:
            other = next(name for name in EXPERTS if name != self.denoiser_name)
            self.frozen_expert = load(other, weights=True).requires_grad_(False).eval()
            self.boundary = self.boundary_ratio * comps["noise_scheduler"].config.num_train_timesteps
        return comps

    def frozen_modules(self) -> list:
        """The frozen expert of a two-expert pipeline (moved with the VAE and text encoder)."""
        return [] if self.frozen_expert is None else [self.frozen_expert]

    def save_final(self, denoiser, folder, is_lora: bool) -> None:
        """As Family.save_final; a tuned transformer_2 is marked so it loads back into transformer_2."""
        super().save_final(denoiser, folder, is_lora)
        if self.denoiser_name == "transformer_2":
            (Path(folder) / EXPERT_FILE).write_text(json.dumps({"expert": "transformer_2"}) + "\n")

    def tuned_component(self, tuned: str) -> str:
        """transformer_2 for a final/ marked as its weights (``EXPERT_FILE``), else transformer."""
        folder = Path(tuned) if Path(tuned).is_dir() else Path(tuned).parent
        marker = folder / EXPERT_FILE
        return json.loads(marker.read_text())["expert"] if marker.is_file() else "transformer"

    def load_lora(self, pipe, lora: str, fuse: bool = False) -> None:
        """A transformer_2 adapter loads with WanPipeline's load_into_transformer_2 (and fuses into it)."""
        second = self.tuned_component(lora) == "transformer_2"
        pipe.load_lora_weights(lora, **({"load_into_transformer_2": True} if second else {}))
        if fuse:
            pipe.fuse_lora(components=["transformer_2" if second else "transformer"])

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

    def pipeline_images(self, pipe, num_frames: int = 1, **kwargs) -> list:
        """WanPipeline's videos as lists of PIL frames; at ``num_frames`` 1 (the family trains on images, as
        one-frame latents) each video's one frame, an image."""
        latent_frames(pipe.vae.config, num_frames)  # 4 k + 1, or an error (the pipeline would round it)
        videos = pipe(num_frames=num_frames, **kwargs).frames
        return [video[0] for video in videos] if num_frames == 1 else [list(video) for video in videos]

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
        [N] (1000 sigma, what the transformer takes). In a two-expert pipeline each row goes to the expert
        the pipeline uses at its timestep (transformer at >= the boundary), the trained or the frozen one."""
        x = noisy if noisy.ndim == 5 else noisy.unsqueeze(2)
        hidden = text["hidden"]
        if self.frozen_expert is None:
            out = _call(denoiser, x, timestep, hidden)
        else:
            high = timestep >= self.boundary
            trained = high if self.denoiser_name == "transformer" else ~high
            out = torch.empty_like(x)
            for rows, model in ((trained, denoiser), (~trained, self.frozen_expert)):
                if bool(rows.any()):
                    out[rows] = _call(model, x[rows], timestep[rows], hidden[rows]).to(x.dtype)
            if torch.is_grad_enabled() and not bool(trained.any()):
                # no row for the trained expert: keep it in the graph (at zero weight) so the loss has a
                # gradient, zero, and every process of a DDP run reduces the same parameters
                out = out + 0 * _call(denoiser, x[:1], timestep[:1], hidden[:1]).sum()
        out = out.to(noisy.dtype)
        return out if noisy.ndim == 5 else out.squeeze(2)


def _call(transformer, x: Tensor, timestep: Tensor, hidden: Tensor) -> Tensor:
    """The transformer's output (a DDP wrapper's too: no module attributes read here)."""
    return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=hidden, return_dict=False)[0]

