"""FLUX.2 [dev] and [klein]: a rectified-flow transformer over the 2x2-patchified, batch-normalised latents
of AutoencoderKLFlux2.

Latent space as the pipelines build it: the VAE's C-channel latent [C, h, w] is patchified 2x2 into
[4C, h/2, w/2] and normalised per channel by the VAE's batch-norm running statistics; each of the h/2 * w/2
positions is one token of 4C features at (0, row, column, 0) (``img_ids``). Text: the chat-templated
caption through a causal LM, three intermediate hidden states stacked on features (``Flux2Pipeline``:
Mistral-3 layers 10, 20, 30 under its system message; ``Flux2KleinPipeline``: Qwen3 layers 9, 18, 27), text
token l at (0, 0, 0, l) (``txt_ids``). [dev] embeds its guidance value; [klein] guides classifier-free
against the empty prompt, and its step-distilled variant (``is_distilled``) samples unguided.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from diffusion_dpo.families.base import DEFAULT_LORA_TARGETS, Family, save_peft_layout_lora
from diffusion_dpo.families.flux import embedded_guidance

Tensor = torch.Tensor

PATCH = 2  # the pipelines' 2x2 patchify of the VAE latent


def register_latent_normalisation(vae) -> None:
    """Write the batch-norm statistics of an AutoencoderKLFlux2 into its config as ``latents_mean`` /
    ``latents_std`` (per patchified channel, 4C each; std = sqrt(running_var + batch_norm_eps)) and
    ``latents_patch_size`` = 2, the keys ``models.sample_latents`` and ``rollout.decode`` read, so a config
    alone (what a precomputed run keeps after freeing the VAE) maps samples into the denoiser's space."""
    if "latents_patch_size" in vae.config:
        return
    std = torch.sqrt(vae.bn.running_var.float() + vae.config.batch_norm_eps)
    vae.register_to_config(latents_mean=vae.bn.running_mean.float().tolist(), latents_std=std.tolist(),
                           latents_patch_size=PATCH)


def patchify(latents: Tensor) -> Tensor:
    """[N, C, h, w] -> [N, 4C, h/2, w/2]: channel c's 2x2 patch becomes channels 4c .. 4c + 3 (row-major),
    as ``Flux2Pipeline._patchify_latents``."""
    n, c, h, w = latents.shape
    patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(n, c * 4, h // 2, w // 2)


def unpatchify(latents: Tensor) -> Tensor:
    """The inverse of :func:`patchify`: [N, 4C, h, w] -> [N, C, 2h, 2w]."""
    n, c4, h, w = latents.shape
    patches = latents.reshape(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return patches.reshape(n, c4 // 4, h * 2, w * 2)


def token_ids(h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    """Position of each latent token [h * w, 4]: (0, row, column, 0), rows outermost."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], dim=-1).to(dtype)


def text_ids(length: int, device=None, dtype=torch.float32) -> Tensor:
    """Position of each text token [L, 4]: (0, 0, 0, l)."""
    ids = torch.zeros(length, 4, device=device, dtype=dtype)
    ids[:, 3] = torch.arange(length, device=device, dtype=dtype)
    return ids


class Flux2Family(Family):
    """FLUX.2 [dev]: Mistral-3 text encoder, embedded guidance."""

    name = "flux2"
    pipeline_class = "Flux2Pipeline"
    denoiser_name = "transformer"
    denoiser_class = "Flux2Transformer2DModel"
    text_components = (("tokenizer", "text_encoder"),)
    # The double-stream attention and the single-stream blocks' fused q/k/v/MLP input projection.
    lora_targets = (*DEFAULT_LORA_TARGETS, "to_qkv_mlp_proj")
    flow = True
    dpo_beta = 100.0  # as FLUX.1 and SD3 (Family.dpo_beta)
    max_sequence_length = 512  # the pipeline's default
    hidden_layers = (10, 20, 30)  # Flux2Pipeline's text_encoder_out_layers
    # [dev]'s embedded guidance in training: the pipeline's default guidance_scale (Flux2Pipeline: 4.0).
    guidance = 4.0
    guidance_embedded = True
    online_guidance_scale = 4.0

    def load(self, pretrained: str, load: Callable[..., Any], vae: str | None = None) -> dict[str, Any]:
        """As Family.load, a separate ``vae`` being an AutoencoderKLFlux2; its normalisation registered."""
        from diffusers import AutoencoderKLFlux2

        comps = super().load(pretrained, load, None)
        if vae:
            comps["vae"] = AutoencoderKLFlux2.from_pretrained(vae).requires_grad_(False).eval()
        self.prepare_vae(comps["vae"])
        return comps

    def save_lora(self, denoiser, folder) -> None:
        """The adapter in peft's own key layout, which Flux2LoraLoaderMixin reads (``save_peft_layout_lora``)."""
        save_peft_layout_lora(self.pipeline_class, denoiser, folder)

    def prepare_vae(self, vae) -> None:
        register_latent_normalisation(vae)

    def latent_shape(self, vae_config, side: int) -> tuple[int, int, int]:
        """(4C, side / 2f, side / 2f): the patchified latent the pipeline draws its noise in."""
        h = side // 2 ** (len(vae_config.block_out_channels) - 1) // PATCH
        return (vae_config.latent_channels * PATCH * PATCH, h, h)

    def sampling_mu(self, scheduler_config, latent_hw: tuple[int, int], num_inference_steps: int):
        """FLUX.2's empirical mu of the token count h * w and the step count (``compute_empirical_mu``)."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(latent_hw[0] * latent_hw[1], num_inference_steps)

    def sampling_sigmas(self, num_inference_steps: int):
        """The pipelines' linspace(1, 1/T, T), shifted by the scheduler with mu."""
        import numpy as np

        return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)

    def sequence_length(self, tokenizer) -> int:
        return min(self.max_sequence_length, tokenizer.model_max_length)

    @torch.no_grad()
    def encode_text(self, comps, captions: list[str]) -> dict[str, Tensor]:
        """{"hidden": [B, L, 3D]}: the pipeline's own prompt encoder (chat template, padded to L tokens, three
        hidden states stacked). A caller may add "guidance" [B], the value [dev] embeds (default ``guidance``)."""
        from diffusers import Flux2Pipeline
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        tokenizer, encoder = comps.tokenizers[0], comps.text_encoders[0]
        return {"hidden": Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            encoder, tokenizer, list(captions), max_sequence_length=self.sequence_length(tokenizer),
            system_message=SYSTEM_MESSAGE, hidden_states_layers=self.hidden_layers)}

    def call_options(self, pipe) -> dict:
        """{"max_sequence_length": L}: the pipeline pads to max_sequence_length whatever its tokenizer's own
        length, while training encodes min(default, model_max_length) tokens; the same here."""
        return {"max_sequence_length": self.sequence_length(pipe.tokenizer)}

    def forward(self, denoiser, noisy: Tensor, timestep: Tensor, text: dict[str, Tensor],
                image: dict[str, Tensor]) -> Tensor:
        """The velocity [N, 4C, h, w] for patchified latents [N, 4C, h, w]; ``timestep`` is 1000 sigma and the
        transformer takes sigma, as the pipeline passes ``timestep / 1000``."""
        n, c, h, w = noisy.shape
        hidden = text["hidden"]
        guidance = embedded_guidance(denoiser, text, n, self.guidance, noisy.device)
        tokens = noisy.reshape(n, c, h * w).permute(0, 2, 1)
        out = denoiser(hidden_states=tokens, timestep=timestep / 1000, guidance=guidance,
                       encoder_hidden_states=hidden,
                       txt_ids=text_ids(hidden.shape[1], noisy.device, noisy.dtype).expand(n, -1, -1),
                       img_ids=token_ids(h, w, noisy.device, noisy.dtype).expand(n, -1, -1), return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(n, c, h, w)


class Flux2KleinFamily(Flux2Family):
    """FLUX.2 [klein]: Qwen3 text encoder, classifier-free guidance against the empty prompt."""

    name = "flux2_klein"
    pipeline_class = "Flux2KleinPipeline"
    hidden_layers = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers
    guidance_embedded = False

    @classmethod
    def matches(cls, index: dict[str, Any]) -> bool:
        return index.get("_class_name") == cls.pipeline_class and not index.get("is_distilled", False)

    @torch.no_grad()
    def encode_text(self, comps, captions: list[str]) -> dict[str, Tensor]:
        """{"hidden": [B, L, 3D]}: Flux2KleinPipeline's prompt encoder (Qwen3 chat template, no thinking)."""
        from diffusers import Flux2KleinPipeline

        tokenizer, encoder = comps.tokenizers[0], comps.text_encoders[0]
        return {"hidden": Flux2KleinPipeline._get_qwen3_prompt_embeds(
            encoder, tokenizer, list(captions), max_sequence_length=self.sequence_length(tokenizer),
            hidden_states_layers=self.hidden_layers)}


class Flux2KleinDistilledFamily(Flux2KleinFamily):
    """A step-distilled FLUX.2 [klein] (``is_distilled`` in model_index.json): its pipeline ignores
    guidance_scale and makes one conditional pass a step, which ``guidance_embedded`` (no unconditional
    pass; the transformer embeds no guidance, so the value goes unused) reproduces."""

    name = "flux2_klein_distilled"
    guidance_embedded = True

    @classmethod
    def matches(cls, index: dict[str, Any]) -> bool:
        return index.get("_class_name") == cls.pipeline_class and bool(index.get("is_distilled", False))
