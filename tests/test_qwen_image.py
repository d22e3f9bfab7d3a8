"""Qwen-Image: detection, the prompt template's dropped tokens against the pipeline's own encode_prompt, the 2x2
packing and the video VAE's per-channel normalisation against the pipeline's, true CFG with its norm
rescaling, the denoiser call against a direct one on the pipeline's padding, and LoRA weights that load back
exactly."""

import pytest
import torch

from diffusion_dpo import models
from diffusion_dpo.families import by_name, detect, detect_index
from diffusion_dpo.families.flux import pack_latents, unpack_latents
from diffusion_dpo.families.qwen_image import NEGATIVE_PROMPT, PROMPT_TEMPLATE, TEMPLATE_TOKENS
from diffusion_dpo.online.rollout import decode
from diffusion_dpo.tiny import build_tiny_pipeline
from tests.lora_round_trip import lora_round_trip

CAPTIONS = ["a red dog", "a green square on a black background"]  # two lengths: the first is padded


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("qwen") / "base", family="qwen_image"))


@pytest.fixture(scope="module")
def pipe(tiny):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(tiny)


@pytest.fixture(scope="module")
def comps(tiny):
    return models.load_components(tiny)


def test_detect(tiny):
    assert detect(tiny).name == "qwen_image"
    assert detect_index({"_class_name": "QwenImagePipeline"}).denoiser_class == "QwenImageTransformer2DModel"
    family = by_name("qwen_image")
    assert family.flow and family.dpo_beta == 100.0 and not family.guidance_embedded
    assert family.unguided_scale == 1.0 and family.online_guidance_scale == 4.0


def test_text_drops_the_template_as_the_pipeline_does(pipe, comps):
    """The template and the count of dropped tokens are the pipeline's; the tiny tokenizer spells the system
    turn and the user turn's start in 34 tokens as Qwen's does, so exactly the template is dropped; each
    caption's states equal the pipeline's (which pads to the longest caption and masks)."""
    assert pipe.prompt_template_encode == PROMPT_TEMPLATE
    assert pipe.prompt_template_encode_start_idx == TEMPLATE_TOKENS
    assert len(pipe.tokenizer(PROMPT_TEMPLATE.split("{}")[0]).input_ids) == TEMPLATE_TOKENS
    text = comps.family.encode_text(comps, CAPTIONS)
    hidden, mask = pipe.encode_prompt(CAPTIONS, device="cpu", max_sequence_length=64)
    assert text["hidden"].shape == (2, 64, 32) and text["mask"].dtype == torch.bool
    lengths = mask.sum(dim=1)
    assert lengths[0] < lengths[1] and torch.equal(text["mask"].sum(dim=1), lengths)
    torch.testing.assert_close(text["hidden"][:, :hidden.shape[1]], hidden)
    assert not text["hidden"][:, hidden.shape[1]:].any()
    empty = comps.family.encode_empty_prompt(comps)
    negative, _ = pipe.encode_prompt(NEGATIVE_PROMPT, device="cpu", max_sequence_length=64)
    torch.testing.assert_close(empty["hidden"][:, :negative.shape[1]], negative)
    short = pipe.encode_prompt(CAPTIONS, device="cpu", max_sequence_length=3)[0]  # the pipeline's cut
    torch.testing.assert_close(text["hidden"][:, :3], short)


def test_packing_matches_the_pipeline():
    from diffusers import QwenImagePipeline

    x = torch.randn(2, 4, 6, 8)
    packed = QwenImagePipeline._pack_latents(x.unsqueeze(1), 2, 4, 6, 8)  # its latents [B, 1, C, h, w]
    assert torch.equal(pack_latents(x), packed)
    # _unpack_latents takes the image size in px (vae_scale_factor 8: 48 x 64 px for 6 x 8 latents)
    assert torch.equal(unpack_latents(packed, 6, 8), QwenImagePipeline._unpack_latents(packed, 48, 64, 8)[:, :, 0])


def test_vae_normalisation_matches_the_pipeline(pipe, comps):
    """Encoding: the one-frame video's posterior, normalised per channel (z - mean) / std; decoding: the
    pipeline's latents / (1 / std) + mean through the VAE's decoder, first frame, to [0, 1]."""
    vae = comps.vae
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    moments = models.encode_latent_moments(vae, pixels)
    assert moments.shape == (2, 8, 16, 16)
    torch.testing.assert_close(moments, vae.encode(pixels[:, :, None]).latent_dist.parameters[:, :, 0])
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    assert not torch.allclose(mean, torch.zeros_like(mean)) and not torch.allclose(std, torch.ones_like(std))
    z = models.sample_latents(vae.config, moments, torch.zeros(2, 4, 16, 16))
    torch.testing.assert_close(z, (moments[:, :4] - mean) / std)
    scale = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)  # the pipeline's decode
    theirs = vae.decode(z[:, :, None] / scale + mean[..., None]).sample[:, :, 0]
    torch.testing.assert_close(decode(vae, z), (theirs / 2 + 0.5).clamp(0, 1))
    assert comps.family.latent_shape(vae.config, 32) == (4, 16, 16)
    assert comps.family.default_resolution(vae.config) == 128 * pipe.vae_scale_factor


def test_true_cfg_rescales_each_token_to_the_conditional_norm():
    family = by_name("qwen_image")
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 4, 6, 8, generator=g)
    assert torch.equal(family.guide(u, c, 1.0), c) and torch.equal(family.guide(u, c, 0.5), c)
    noise_pred, neg = pack_latents(c), pack_latents(u)  # the pipeline's tokens
    comb = neg + 4.0 * (noise_pred - neg)
    expected = comb * (torch.norm(noise_pred, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    torch.testing.assert_close(family.guide(u, c, 4.0), unpack_latents(expected, 6, 8))
    assert family.guidance_options(4.0, 2) == {"true_cfg_scale": 4.0, "negative_prompt": [" ", " "]}
    assert family.guidance_options(1.0, 2) == {"true_cfg_scale": 1.0}


def test_forward_is_the_transformer_on_the_pipelines_padding(pipe, comps):
    """Captions padded to 64 and cut back to the batch's longest with their mask: the transformer's output
    on the pipeline's own embeddings and mask, at time sigma = timestep / 1000."""
    family = comps.family
    text = family.encode_text(comps, CAPTIONS)
    hidden, mask = pipe.encode_prompt(CAPTIONS, device="cpu", max_sequence_length=64)
    noisy = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor([700.0, 250.0])
    with torch.no_grad():
        ours = family.forward(comps.denoiser, noisy, timestep, text, {})
        theirs = comps.denoiser(hidden_states=pack_latents(noisy), timestep=timestep / 1000,
                                encoder_hidden_states=hidden, encoder_hidden_states_mask=mask,
                                img_shapes=[[(1, 8, 8)]] * 2, return_dict=False)[0]
    torch.testing.assert_close(ours, unpack_latents(theirs, 16, 16))
    mu = family.sampling_mu(pipe.scheduler.config, (16, 16), 4)
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    assert mu == calculate_shift(64, 256, 8192, 0.5, 0.9)


def test_last_block_text_output_is_frozen_and_blocks_shard(comps):
    """The transformer returns the image stream, so the last block's text-stream output gets no gradient:
    frozen at load (DDP needs every trained parameter to get one); fsdp shards the double-stream blocks."""
    denoiser = comps.denoiser
    noisy = torch.randn(1, 4, 16, 16)
    text = comps.family.encode_text(comps, CAPTIONS[:1])
    comps.family.forward(denoiser, noisy, torch.tensor([500.0]), text, {}).square().mean().backward()
    unused = {n for n, p in denoiser.named_parameters() if p.grad is None}
    frozen = {n for n, p in denoiser.named_parameters() if not p.requires_grad}
    assert unused == frozen and frozen and all(n.startswith("transformer_blocks.0.") for n in frozen)
    denoiser.zero_grad(set_to_none=True)
    blocks = comps.family.shard_blocks(denoiser)
    assert [type(b).__name__ for b in blocks] == ["QwenImageTransformerBlock"] * len(denoiser.transformer_blocks)


def test_lora_loads_back_exactly(tiny, tmp_path):
    adapted = lora_round_trip(by_name("qwen_image"), tiny, tmp_path)
    assert any(".add_q_proj." in k for k in adapted) and any(".to_out.0." in k for k in adapted)
    blocks = by_name("qwen_image").load_denoiser(tiny + "/transformer").transformer_blocks
    assert len(adapted) == 2 * 7 * len(blocks)  # A and B of the 7 projections
