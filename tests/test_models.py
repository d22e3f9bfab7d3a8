"""Components of the trainer on tiny pipelines: loading and SDXL detection, text and image encoding, SDXL
time ids, the LoRA reference, and the shared-noise denoising errors."""

import math

import pytest
import torch

from diffusion_dpo import denoising, models
from diffusion_dpo.errors import InputError
from diffusion_dpo.families import DDPMNoise
from diffusion_dpo.families.base import reduce_error
from diffusion_dpo.families.sd import sdxl_time_ids
from diffusion_dpo.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return models.load_components(str(build_tiny_pipeline(tmp_path_factory.mktemp("sd") / "p")))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    path = build_tiny_pipeline(tmp_path_factory.mktemp("sdxl") / "p", sdxl=True, prediction_type="v_prediction")
    return models.load_components(str(path))


def test_loading_detects_sdxl_and_prediction_type(sd, sdxl, tmp_path):
    assert sd.family.name == "sd" and len(sd.text_encoders) == 1 and sd.prediction_type == "epsilon"
    assert sdxl.family.name == "sdxl" and len(sdxl.text_encoders) == 2 and sdxl.prediction_type == "v_prediction"
    assert type(sd.noise_scheduler).__name__ == "DDPMScheduler"
    assert not any(p.requires_grad for m in [sd.vae, *sd.text_encoders] for p in m.parameters())
    with pytest.raises(InputError, match="not a diffusers pipeline"):
        models.load_components(str(tmp_path / "nowhere"))


def test_text_encoding_sd_and_sdxl(sd, sdxl):
    captions = ["a red dog", ""]
    text = models.encode_prompts(sd, captions)
    ids = sd.tokenizers[0](captions, padding="max_length", max_length=16, truncation=True,
                           return_tensors="pt").input_ids
    assert set(text) == {"hidden"}
    assert torch.equal(text["hidden"], sd.text_encoders[0](ids)[0])  # the last hidden state, [2, 16, 32]

    text = models.encode_prompts(sdxl, captions)
    assert text["hidden"].shape == (2, 16, 64) and text["pooled"].shape == (2, 32)
    ids_1, ids_2 = (tok(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
                    for tok in sdxl.tokenizers)
    out_1 = sdxl.text_encoders[0](ids_1, output_hidden_states=True)
    out_2 = sdxl.text_encoders[1](ids_2, output_hidden_states=True)
    # penultimate layers concatenated on features; pooled (projected) output of encoder 2
    assert torch.equal(text["hidden"][..., :32], out_1.hidden_states[-2])
    assert torch.equal(text["hidden"][..., 32:], out_2.hidden_states[-2])
    assert torch.equal(text["pooled"], out_2.text_embeds)


def test_sdxl_time_ids_by_hand():
    """An image 600 high, 800 wide, cropped at (top 0, left 133) to 512 x 512: (600, 800, 0, 133, 512, 512)."""
    sizes = torch.tensor([[[600, 800], [512, 512]]])
    crops = torch.tensor([[[0, 133], [0, 0]]])
    ids = sdxl_time_ids(sizes, crops, (512, 512))
    assert ids.shape == (1, 2, 6) and ids.dtype == torch.float32
    assert ids[0, 0].tolist() == [600, 800, 0, 133, 512, 512]
    assert ids[0, 1].tolist() == [512, 512, 0, 0, 512, 512]


def test_sample_latents_by_hand(sd):
    """mean 1, log-variance 2 log 2 (std 2), eps 0.5: z = (1 + 2 * 0.5) * scaling_factor = 2 * 0.18215."""
    moments = torch.cat([torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2 * math.log(2))], dim=1)
    z = models.sample_latents(sd.vae.config, moments, torch.full((1, 4, 2, 2), 0.5))
    assert sd.vae.config.scaling_factor == pytest.approx(0.18215)
    assert torch.allclose(z, torch.full_like(z, 2 * 0.18215))
    assert models.encode_latent_moments(sd.vae, torch.zeros(3, 3, 32, 32)).shape == (3, 8, 16, 16)


def _inputs(comps, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"pixel_values": torch.rand(n, 2, 3, 32, 32, generator=g) * 2 - 1, "captions": ["a red dog"] * n,
             "original_sizes": torch.full((n, 2, 2), 32), "crop_top_lefts": torch.zeros(n, 2, 2, dtype=torch.long),
             "is_tie": torch.zeros(n, dtype=torch.bool), "row_indices": torch.arange(n)}
    pairs = models.encode_pair_batch(comps, batch)
    noise = denoising.draw_pair_noise(denoising.pair_seeds(seed, 0, 0, n), (4, 16, 16), 1000)
    return models.pair_inputs(comps.vae.config, pairs, noise)


def test_lora_reference_is_the_base_without_a_second_copy(tmp_path):
    comps = models.load_components(str(build_tiny_pipeline(tmp_path / "p")))
    x = _inputs(comps)
    unet, sched = comps.unet, comps.noise_scheduler
    with torch.no_grad():
        base = denoising.pair_errors(unet, x, sched)
    models.attach_lora(unet, rank=4, alpha=8, targets=["to_q", "to_v"])
    lora = models.trainable_parameters(unet)
    assert lora and all("lora" in n for n, p in unet.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(denoising.pair_errors(unet, x, sched), base))  # B = 0 at init
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
        moved = denoising.pair_errors(unet, x, sched)
        with models.reference_unet(unet) as ref:
            assert ref is unet
            assert not any(p.requires_grad for p in unet.parameters())  # disabled adapter: nothing trains
            reference = denoising.pair_errors(ref, x, sched)
    assert not torch.equal(moved[0], base[0])
    assert all(torch.equal(a, b) for a, b in zip(reference, base))
    assert models.trainable_parameters(unet) == lora  # requires_grad back on after the block
    with pytest.raises(InputError, match="lora_rank"):
        models.attach_lora(unet, rank=0)


def test_frozen_copy_reference(sd):
    ref = models.frozen_copy(sd.unet, torch.bfloat16)
    assert ref is not sd.unet and not ref.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in ref.parameters())
    assert any(p.requires_grad for p in sd.unet.parameters())  # the policy is untouched
    with models.reference_unet(sd.unet, ref) as chosen:
        assert chosen is ref


def test_targets_by_prediction_type(sd, sdxl):
    """epsilon: the noise; v_prediction: sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022)."""
    x0, eps, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([10, 900])
    assert torch.equal(DDPMNoise(sd.noise_scheduler).target(x0, eps, t), eps)
    abar = sdxl.noise_scheduler.alphas_cumprod[t].view(2, 1, 1, 1)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    assert torch.allclose(DDPMNoise(sdxl.noise_scheduler).target(x0, eps, t), v, atol=1e-6)


def test_per_sample_mse_by_hand():
    """Sample 0: errors (1, 1, 1, 1) -> 1; sample 1: (0, 2, 0, 0) -> 4 / 4 = 1... and (0, 0, 0, 2) -> 1."""
    pred = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[0.0, 2.0], [0.0, 0.0]]]], dtype=torch.bfloat16)
    mse = reduce_error(pred, torch.zeros(2, 1, 2, 2))
    assert mse.dtype == torch.float32 and mse.tolist() == [1.0, 1.0]
    assert reduce_error(pred, torch.zeros(2, 1, 2, 2), "sum").tolist() == [4.0, 4.0]


def test_pair_errors_share_noise_and_timestep(sdxl):
    x = _inputs(sdxl)
    sched = sdxl.noise_scheduler
    with torch.no_grad():
        mse_w, mse_l = denoising.pair_errors(sdxl.unet, x, sched)
        # the winner's error alone, through the single-image path, is the same number
        assert torch.allclose(denoising.winner_errors(sdxl.unet, x, sched), mse_w, atol=1e-6)
        # the same image as winner and loser gives the same error: noise and timestep are shared
        same = denoising.PairInputs(x.latents_w, x.latents_w, x.noise, x.timesteps, x.text,
                                    {"time_ids": x.image["time_ids"][:2]})
        a, b = denoising.pair_errors(sdxl.unet, same, sched)
    assert mse_w.shape == (2,) and not torch.equal(mse_w, mse_l)
    assert torch.allclose(a, b, atol=1e-6)


def test_pair_seeds_and_noise_are_reproducible():
    seeds = denoising.pair_seeds(7, step=3, rank=1, n_pairs=4)
    assert seeds == denoising.pair_seeds(7, 3, 1, 4)
    assert len(set(seeds)) == 4 and seeds != denoising.pair_seeds(7, 4, 1, 4) != denoising.pair_seeds(7, 3, 0, 4)
    # two micro-batches of 2 draw what one batch of 4 draws
    assert denoising.pair_seeds(7, 3, 1, 2) + denoising.pair_seeds(7, 3, 1, 2, offset=2) == seeds
    a = denoising.draw_pair_noise(seeds, (4, 8, 8), 1000)
    b = denoising.draw_pair_noise(seeds[2:], (4, 8, 8), 1000)
    assert a.noise.shape == (4, 4, 8, 8) and a.latent_eps.shape == (4, 2, 4, 8, 8) and a.timesteps.dtype == torch.long
    assert torch.equal(a.noise[2:], b.noise) and torch.equal(a.timesteps[2:], b.timesteps)
    assert ((a.timesteps >= 0) & (a.timesteps < 1000)).all()
