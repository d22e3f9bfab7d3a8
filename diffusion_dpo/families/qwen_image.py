"""Qwen-Image: a double-stream rectified-flow transformer (MMDiT) over 2x2-packed latent patches of a video
VAE, conditioned on the Qwen2.5-VL language model.

Text conditioning as ``QwenImagePipeline.encode_prompt`` builds it: each caption as the user turn of its
prompt template (a system turn asking for the image's description, the user turn, the assistant's start),
the last hidden state of Qwen2.5-VL, and of each caption's own tokens only those after the template's first
34 (the system turn and the user turn's start), at most max_sequence_length of them. The pipeline pads a
batch to its longest caption and passes the padding mask; here the states are padded to the fixed
max_sequence_length with their mask [B, L], so batches stack and cache, and the forward cuts them back to
the batch's longest caption as the pipeline pads them.

Latents: AutoencoderKLQwenImage encodes an image as a one-frame video, [C, 1, h, w] normalised per channel
by latents_mean / latents_std (``vae_layout``, ``models.sample_latents``); the transformer reads the
[C, h, w] latent as h/2 * w/2 tokens of 4C features (FLUX.1's packing) with the grid in ``img_shapes``, at
time sigma. Guidance is the pipeline's true classifier-free guidance (``true_cfg_scale`` with a negative
prompt) followed by its rescaling of each token's prediction to the conditional one's norm.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from diffusion_dpo.families.base import DEFAULT_LORA_TARGETS, Family, save_peft_layout_lora
from diffusion_dpo.families.flux import pack_latents, unpack_latents

Tensor = torch.Tensor

# The prompt Qwen-Image was trained with (QwenImagePipeline's prompt_template_encode), and the number of its
# leading tokens the pipeline drops from the hidden states (prompt_template_encode_start_idx): everything
# before the caption.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_TOKENS = 34
# The pipeline has no default negative prompt (without one it does not guide); its docs and Qwen-Image's
# model card guide against a single space.
NEGATIVE_PROMPT = " "


class QwenImageFamily(Family):
    name = "qwen_image"
    pipeline_class = "QwenImagePipeline"
    denoiser_name = "transformer"
    denoiser_class = "QwenImageTransformer2DModel"
    text_components = (("tokenizer", "text_encoder"),)
    # The attention projections: the image stream's and the text stream's inputs (add_*_proj), which
    # QwenImagePipeline.load_lora_weights loads as it loads the image stream's. Not the text stream's output
    # projection (to_add_out): the last block's feeds nothing the image reads, an adapter there gets no
    # gradient, and DDP stops on a parameter without one.
    lora_targets = (*DEFAULT_LORA_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj")
    flow = True
    dpo_beta = 100.0  # as the other flow families (Family.dpo_beta)
    max_sequence_length = 512  # QwenImagePipeline's default
    online_guidance_scale = 4.0  # QwenImagePipeline's default true_cfg_scale
    # true_cfg_scale <= 1 makes no unconditional pass (the pipeline's do_true_cfg), and at 1 the guided
    # prediction is the conditional one, so 1 is the unguided scale.
    unguided_scale = 1.0

    def load(self, pretrained: str, load: Callable[..., Any], vae: str | None = None) -> dict[str, Any]:
        """As Family.load, a separate ``vae`` being an AutoencoderKLQwenImage. The last block's text-stream
        output (its attention's to_add_out and its txt_mlp) is frozen: the transformer returns the image
        stream only, so those weights get no gradient (a full fine-tune under DDP would stop on them) and
        freezing them changes nothing the loss sees."""
        from diffusers import AutoencoderKLQwenImage

        comps = super().load(pretrained, load, None)
        if vae:
            comps["vae"] = AutoencoderKLQwenImage.from_pretrained(vae).requires_grad_(False).eval()
        last = comps["denoiser"].transformer_blocks[-1]
        for module in (last.attn.to_add_out, last.txt_mlp):
            module.requires_grad_(False)
        return comps

    def save_lora(self, denoiser, folder) -> None:
        """The adapter in peft's own key layout, which QwenImageLoraLoaderMixin reads whole
        (``save_peft_layout_lora``)."""
        save_peft_layout_lora(self.pipeline_class, denoiser, folder)

    def default_resolution(self, vae_config) -> int:
        """The pipeline's default side, its default_sample_size 128 x its vae_scale_factor (1024 px for
        Qwen-Image); its video VAE names no sample_size."""
        from diffusion_dpo.vae_layout import spatial_factor

        return 128 * spatial_factor(vae_config)

    def text_length(self, tokenizer) -> int:
        """L: the caption tokens kept, min(512, the tokenizer's model_max_length)."""
        return min(self.max_sequence_length, tokenizer.model_max_length)

    @torch.no_grad()
    def encode_text(self, comps, captions: list[str]) -> dict[str, Tensor]:
        """{"hidden": [B, L, D] (Qwen2.5-VL's last hidden state of each caption's tokens after the template's
        first 34, left-aligned, zero where padded), "mask": bool [B, L] (those tokens)}."""
        tokenizer, encoder = comps.tokenizers[0], comps.text_encoders[0]
        length = self.text_length(tokenizer)
        # The pipeline truncates at 1024 + 34 tokens and keeps max_sequence_length of the caption's; the
        # language model is causal, so truncating at L + 34 keeps the same states.
        tokens = tokenizer([PROMPT_TEMPLATE.format(c) for c in captions], max_length=length + TEMPLATE_TOKENS,
                           padding=True, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(encoder.device)
        states = encoder(input_ids=tokens.input_ids.to(encoder.device), attention_mask=mask,
                         output_hidden_states=True).hidden_states[-1]
        hidden = states.new_zeros(len(captions), length, states.shape[-1])
        keep = torch.zeros(len(captions), length, dtype=torch.bool, device=states.device)
        for i, (state, valid) in enumerate(zip(states, mask.bool())):
            own = state[valid][TEMPLATE_TOKENS:TEMPLATE_TOKENS + length]
            hidden[i, :len(own)] = own
            keep[i, :len(own)] = True
        return {"hidden": hidden, "mask": keep}

    def encode_empty_prompt(self, comps) -> dict[str, Tensor]:
        """The negative prompt the family guides against (NEGATIVE_PROMPT, a single space), encoded."""
        return self.encode_text(comps, [NEGATIVE_PROMPT])

    def call_options(self, pipe) -> dict:
        """{"max_sequence_length": L}: the caption length training keeps."""
        return {"max_sequence_length": self.text_length(pipe.tokenizer)}

    def guidance_options(self, guidance_scale: float, batch_size: int) -> dict[str, Any]:
        """The pipeline guides by ``true_cfg_scale`` against a negative prompt (one per image); its
        ``guidance_scale`` is only for guidance-distilled transformers, which Qwen-Image's is not. At a scale
        <= 1 it makes no unconditional pass, and no negative prompt is passed."""
        if guidance_scale <= 1:
            return {"true_cfg_scale": guidance_scale}
        return {"true_cfg_scale": guidance_scale, "negative_prompt": [NEGATIVE_PROMPT] * batch_size}

    def guide(self, uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
        """QwenImagePipeline's true CFG: g = u + w (c - u), then each packed token's g rescaled to the norm of
        its c (over the token's 4C features); at w <= 1 the conditional prediction alone, as the pipeline."""
        if scale <= 1:
            return cond
        h, w = cond.shape[-2:]
        combined = pack_latents(uncond + scale * (cond - uncond))
        cond_norm = torch.norm(pack_latents(cond), dim=-1, keepdim=True)
        combined_norm = torch.norm(combined, dim=-1, keepdim=True)
        return unpack_latents(combined * (cond_norm / combined_norm), h, w)

    def sampling_sigmas(self, num_inference_steps: int):
        """QwenImagePipeline's linspace(1, 1/T, T), shifted by the scheduler with mu."""
        import numpy as np

        return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)

    def sampling_mu(self, scheduler_config, latent_hw: tuple[int, int], num_inference_steps: int):
        """The pipeline's mu (its calculate_shift) of the packed length h/2 * w/2, with the scheduler config's
        settings or the pipeline's fallbacks; passed whether or not the scheduler shifts dynamically, as the
        pipeline passes it (a static scheduler ignores it)."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        c = scheduler_config
        return calculate_shift((latent_hw[0] // 2) * (latent_hw[1] // 2), c.get("base_image_seq_len", 256),
                               c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def forward(self, denoiser, noisy: Tensor, timestep: Tensor, text: dict[str, Tensor],
                image: dict[str, Tensor]) -> Tensor:
        """The velocity [N, C, h, w] (noise minus data) for latents [N, C, h, w]; ``timestep`` is 1000 sigma and
        the transformer takes sigma, as the pipeline passes ``timestep / 1000``. The captions are cut to the
        batch's longest; the mask goes along unless every token is a caption's (the pipeline's None)."""
        n, _, h, w = noisy.shape
        length = int(text["mask"].sum(dim=1).max())
        hidden, mask = text["hidden"][:, :length], text["mask"][:, :length]
        out = denoiser(hidden_states=pack_latents(noisy), timestep=timestep / 1000, encoder_hidden_states=hidden,
                       encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                       img_shapes=[[(1, h // 2, w // 2)]] * n, return_dict=False)[0]
        return unpack_latents(out, h, w).to(noisy.dtype)
