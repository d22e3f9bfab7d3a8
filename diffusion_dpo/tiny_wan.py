"""A tiny Wan pipeline (WanPipeline), built from configs, offline, at a size that trains in seconds on a CPU.
``tiny.build_tiny_pipeline(path, family="wan")`` calls this.

The layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers: a UMT5 encoder (2 layers, 32 wide) with a T5 tokenizer
(``tiny.write_t5_tokenizer``), an AutoencoderKLWan with two stages that both halve space and time, so its
scale factors are 4 and 4 like Wan's temporal 4 (videos of 4 k + 1 frames; 5 frames at 32 px are latents
[4, 2, 8, 8]) and whose latents_mean / latents_std are set away from (0, 1) so the normalisation is
exercised, and a two-block WanTransformer3DModel over (1, 2, 2) patches. The scheduler is
FlowMatchEulerDiscreteScheduler with Wan's 480p shift 3 (Wan's training setup; the checkpoints ship UniPC with
flow_shift, see ``families.wan``), so the online sampler at zero noise reproduces the pipeline exactly.
``experts=True`` builds Wan 2.2 A14B's layout: a second transformer and boundary_ratio 0.875.
"""

from __future__ import annotations

LATENT_CHANNELS = 4
TEXT_DIM = 32


def _text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_ff=64, d_kv=8, num_layers=2,
                                       num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                       eos_token_id=1, decoder_start_token_id=0))


def _transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM,
                                 freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def _vae():
    import torch
    from diffusers import AutoencoderKLWan

    g = torch.Generator().manual_seed(1)
    mean = (torch.rand(LATENT_CHANNELS, generator=g) - 0.5).tolist()
    std = (torch.rand(LATENT_CHANNELS, generator=g) * 1.5 + 0.5).tolist()
    return AutoencoderKLWan(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2], num_res_blocks=1,
                            temperal_downsample=[True, True], latents_mean=mean, latents_std=std,
                            scale_factor_temporal=4, scale_factor_spatial=4)


def tiny_wan_pipeline(tokenizer, experts: bool = False):
    """A WanPipeline with random weights (seed the global generator first) around the T5 ``tokenizer``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    two = dict(transformer_2=_transformer(), boundary_ratio=0.875) if experts else {}
    return WanPipeline(tokenizer=tokenizer, text_encoder=_text_encoder(len(tokenizer)), vae=_vae(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=_transformer(), **two)
