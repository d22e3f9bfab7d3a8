"""Z-Image (Tongyi-MAI): a single-stream rectified-flow transformer over 2x2 latent patches, conditioned on
a Qwen3 language model.

Text conditioning as ``ZImagePipeline.encode_prompt`` builds it: each caption wrapped in the tokenizer's
chat template as one user turn with the generation prompt (thinking enabled), padded to 512 tokens, and
the second-to-last hidden state of the Qwen3 model; the transformer reads only the unpadded tokens of each
caption (a list of [L_i, D] tensors). Here the padded [B, L, D] states travel with their mask [B, L], so a
batch stacks and caches like the other families', and the forward drops the padding as the pipeline does.

The transformer takes 1 - sigma as its time and predicts the negated velocity; the pipeline negates its
output before the Euler step, and so does :meth:`ZImageFamily.forward`. Its guidance is
``c + w (c - u)`` (no unconditional pass at w = 0), not the ``u + w (c - u)`` of the other families.
"""

from __future__ import annotations

import torch

from diffusion_dpo.families.base import Family

Tensor = torch.Tensor


class ZImageFamily(Family):
    name = "z_image"
    pipeline_class = "ZImagePipeline"
    denoiser_name = "transformer"
    denoiser_class = "ZImageTransformer2DModel"
    text_components = (("tokenizer", "text_encoder"),)
    flow = True
    dpo_beta = 100.0  # flow_grpo's DPO on SD3.5 (Family.dpo_beta)
    max_sequence_length = 512  # ZImagePipeline's default
    online_guidance_scale = 5.0  # ZImagePipeline's default guidance_scale
    native_resolution = 1024  # ZImagePipeline's height and width when not given
    unguided_scale = 0.0  # ZImagePipeline skips the unconditional pass at guidance_scale 0 (Z-Image-Turbo)

    def text_length(self, tokenizer) -> int:
        return min(self.max_sequence_length, tokenizer.model_max_length)

    @torch.no_grad()
    def encode_text(self, comps, captions: list[str]) -> dict[str, Tensor]:
        """{"hidden": [B, L, D] (Qwen3's second-to-last hidden state, zero where padded), "mask": bool [B, L]
        (the caption's own tokens)}; L = min(512, the tokenizer's model_max_length)."""
        tokenizer, encoder = comps.tokenizers[0], comps.text_encoders[0]
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True)
                 for caption in captions]
        tokens = tokenizer(chats, padding="max_length", max_length=self.text_length(tokenizer), truncation=True,
                           return_tensors="pt")
        mask = tokens.attention_mask.to(encoder.device).bool()
        hidden = encoder(input_ids=tokens.input_ids.to(encoder.device), attention_mask=mask,
                         output_hidden_states=True).hidden_states[-2]
        return {"hidden": hidden * mask[..., None], "mask": mask}

    def call_options(self, pipe) -> dict:
        """{"max_sequence_length": L}: the length training encodes with (the pipeline's 512 unless the
        tokenizer is shorter)."""
        return {"max_sequence_length": self.text_length(pipe.tokenizer)}

    def sampling_sigmas(self, num_inference_steps: int):
        """ZImagePipeline's linspace(1, 1/T, T), shifted by the scheduler (its static shift, or mu)."""
        import numpy as np

        return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)

    def guide(self, uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
        """ZImagePipeline's guidance c + w (c - u) (its cfg_normalization and cfg_truncation at their
        defaults, off)."""
        return cond + scale * (cond - uncond)

    def forward(self, denoiser, noisy: Tensor, timestep: Tensor, text: dict[str, Tensor],
                image: dict[str, Tensor]) -> Tensor:
        """The velocity [N, C, h, w] (noise minus data). ``timestep`` is 1000 sigma; the transformer takes
        (1000 - timestep) / 1000 and one [C, 1, h, w] latent and one [L_i, D] caption per image."""
        captions = [hidden[mask.bool()] for hidden, mask in zip(text["hidden"], text["mask"])]
        frames = list(noisy.unsqueeze(2).unbind(0))
        out = denoiser(frames, (1000 - timestep) / 1000, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2).to(noisy.dtype)
