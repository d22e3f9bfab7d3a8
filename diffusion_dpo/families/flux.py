"""FLUX.1 [dev] / [schnell]: a rectified-flow transformer over 2x2-packed latent patches.

Text conditioning as ``FluxPipeline.encode_prompt`` builds it: CLIP-L's pooled output and T5-XXL's last
hidden state; the text tokens' positions (``txt_ids``) are zeros. The latent [C, h, w] enters the
transformer as h/2 * w/2 tokens of 4C features, each with its (0, row, column) position (``img_ids``).
The guidance-distilled [dev] embeds a guidance value (``guidance_embeds`` in the transformer config).
"""

from __future__ import annotations

import torch

from diffusion_dpo.families.base import Family, tokenize

Tensor = torch.Tensor


def pack_latents(latents: Tensor) -> Tensor:
    """[N, C, h, w] -> [N, h/2 * w/2, 4C]: each 2x2 patch one token, channels outermost within a token."""
    n, c, h, w = latents.shape
    patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack_latents`: [N, h/2 * w/2, 4C] -> [N, C, h, w]."""
    n, _, features = tokens.shape
    patches = tokens.view(n, h // 2, w // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, features // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    """Position of each packed token [h/2 * w/2, 3]: (0, row, column) on the patch grid."""
    rows = torch.arange(h // 2, device=device).repeat_interleave(w // 2)
    cols = torch.arange(w // 2, device=device).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(dtype)


def embedded_guidance(denoiser, text: dict[str, Tensor], n: int, default: float, device) -> Tensor | None:
    """The guidance value [n] a guidance-distilled transformer embeds: text["guidance"] (online tuning's
    sampling.guidance_scale) or ``default``; None for a transformer without guidance_embeds."""
    if not getattr(denoiser, "module", denoiser).config.guidance_embeds:  # a DDP wrapper holds the model
        return None
    guidance = text["guidance"].float() if "guidance" in text else torch.full((n,), default)
    return guidance.to(device)


class FluxFamily(Family):
    name = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_name = "transformer"
    denoiser_class = "FluxTransformer2DModel"
    text_components = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    flow = True
    dpo_beta = 100.0  # flow_grpo's DPO on SD3.5 (Family.dpo_beta)
    t5_max_length = 512  # the pipeline's default max_sequence_length
    # The guidance value [dev] sees in training: the pipeline's default guidance_scale, which diffusers'
    # FLUX training examples also train with. Online tuning embeds its own sampling.guidance_scale instead
    # (text["guidance"]), the value the pipeline then samples with in evaluation.
    guidance = 3.5
    guidance_embedded = True  # FluxPipeline's guidance_scale is embedded ([dev]) or ignored ([schnell])
    online_guidance_scale = 3.5

    @torch.no_grad()
    def encode_text(self, comps, captions: list[str]) -> dict[str, Tensor]:
        """{"hidden": [B, L5, D5] (T5), "pooled": [B, D_L] (CLIP-L's pooled output)}. A caller may add
        "guidance" [B], the value [dev] embeds (default: ``guidance``)."""
        (clip_tokenizer, t5_tokenizer), (clip, t5) = comps.tokenizers, comps.text_encoders
        ids = tokenize(clip_tokenizer, captions, clip_tokenizer.model_max_length, clip.device)
        pooled = clip(ids, output_hidden_states=False).pooler_output
        length = min(self.t5_max_length, t5_tokenizer.model_max_length)
        hidden = t5(tokenize(t5_tokenizer, captions, length, t5.device))[0]
        return {"hidden": hidden, "pooled": pooled.to(hidden.dtype)}

    def call_options(self, pipe) -> dict:
        """{"max_sequence_length": L5}: the pipeline pads T5's tokens to max_sequence_length whatever its
        tokenizer's own length, while training encodes min(default, model_max_length) tokens; the same here."""
        return {"max_sequence_length": min(self.t5_max_length, pipe.tokenizer_2.model_max_length)}

    def sampling_sigmas(self, num_inference_steps: int):
        """FluxPipeline's linspace(1, 1/T, T) for every FLUX config: with dynamic shifting the scheduler shifts
        them by mu, without it by its static shift (a schnell-style config at shift 1, T = 4 samples at
        1, .75, .5, .25, not the scheduler's own 1, .667, .334, .001)."""
        import numpy as np

        return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)

    def forward(self, denoiser, noisy: Tensor, timestep: Tensor, text: dict[str, Tensor],
                image: dict[str, Tensor]) -> Tensor:
        """The velocity [N, C, h, w]. ``timestep`` is 1000 sigma; the transformer takes sigma, as the
        pipeline passes ``timestep / 1000``."""
        n, _, h, w = noisy.shape
        hidden = text["hidden"]
        guidance = embedded_guidance(denoiser, text, n, self.guidance, noisy.device)
        out = denoiser(hidden_states=pack_latents(noisy), timestep=timestep / 1000, guidance=guidance,
                       pooled_projections=text["pooled"], encoder_hidden_states=hidden,
                       txt_ids=torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                       img_ids=image_ids(h, w, noisy.device, noisy.dtype), return_dict=False)[0]
        return unpack_latents(out, h, w)
