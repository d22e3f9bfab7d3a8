"""Stable Diffusion 3 / 3.5: an MMDiT transformer trained with rectified flow (Esser et al. 2024).

Text conditioning as ``StableDiffusion3Pipeline.encode_prompt`` builds it: CLIP-L's and CLIP-G's
penultimate hidden states concatenated on features and zero-padded to T5's width, followed on the sequence
axis by T5-XXL's last hidden state; the pooled projection is both CLIPs' pooled outputs concatenated.
"""

from __future__ import annotations

import torch

from diffusion_dpo.families.base import Family, tokenize

Tensor = torch.Tensor


class SD3Family(Family):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    denoiser_class = "SD3Transformer2DModel"
    text_components = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"),
                       ("tokenizer_3", "text_encoder_3"))
    flow = True
    dpo_beta = 100.0  # flow_grpo's DPO on SD3.5 (Family.dpo_beta)
    t5_max_length = 256  # the pipeline's default max_sequence_length

    @torch.no_grad()
    def encode_text(self, comps, captions: list[str]) -> dict[str, Tensor]:
        """{"hidden": [B, 77 + L5, D5], "pooled": [B, D_L + D_G]} (77 and L5 = 256 for the real tokenizers)."""
        clip_states, pooled = [], []
        for tokenizer, encoder in zip(comps.tokenizers[:2], comps.text_encoders[:2]):
            out = encoder(tokenize(tokenizer, captions, tokenizer.model_max_length, encoder.device),
                          output_hidden_states=True)
            pooled.append(out[0])
            clip_states.append(out.hidden_states[-2])
        t5_tokenizer, t5 = comps.tokenizers[2], comps.text_encoders[2]
        length = min(self.t5_max_length, t5_tokenizer.model_max_length)
        t5_states = t5(tokenize(t5_tokenizer, captions, length, t5.device))[0]
        clip = torch.cat(clip_states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        return {"hidden": torch.cat([clip, t5_states.to(clip.dtype)], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def call_options(self, pipe) -> dict:
        """{"max_sequence_length": L5}: the pipeline pads T5's tokens to max_sequence_length whatever its
        tokenizer's own length, while training encodes min(default, model_max_length) tokens; the same here."""
        return {"max_sequence_length": min(self.t5_max_length, pipe.tokenizer_3.model_max_length)}

    def forward(self, denoiser, noisy: Tensor, timestep: Tensor, text: dict[str, Tensor],
                image: dict[str, Tensor]) -> Tensor:
        """The velocity [N, C, h, w]; ``timestep`` is 1000 sigma, as the pipeline passes it."""
        return denoiser(hidden_states=noisy, timestep=timestep, encoder_hidden_states=text["hidden"],
                        pooled_projections=text["pooled"], return_dict=False)[0]
