"""The model-family layer: detection from model_index.json, SD3 and FLUX text encoding against their
pipelines' encode_prompt, the flow-matching noise (target, samplers, shift) by hand, FLUX's 2x2 packing."""

import math

import pytest
import torch

from diffusion_dpo import denoising, models
from diffusion_dpo.config import ConfigError
from diffusion_dpo.errors import InputError
from diffusion_dpo.families import FlowNoise, NoiseConfig, SDFamily, by_name, detect, detect_index
from diffusion_dpo.families.base import shifted_sigma
from diffusion_dpo.families.flux import image_ids, pack_latents, unpack_latents
from diffusion_dpo.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: str(build_tiny_pipeline(root / name, family=name))
            for name in ("sd3", "flux", "z_image", "qwen_image", "wan")}


def test_detect_from_model_index(tiny, tmp_path):
    assert detect(tiny["sd3"]).name == "sd3" and detect(tiny["flux"]).name == "flux"
    assert detect(tiny["z_image"]).name == "z_image" and detect(tiny["qwen_image"]).name == "qwen_image"
    assert detect(tiny["wan"]).name == "wan"
    assert detect(str(build_tiny_pipeline(tmp_path / "xl", sdxl=True))).name == "sdxl"
    unet_only = {"_class_name": "StableDiffusionImg2ImgPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                 "text_encoder_2": [None, None]}
    assert isinstance(detect_index(unet_only), SDFamily)
    with pytest.raises(InputError, match="'KandinskyPipeline' is not a supported family"):
        detect_index({"_class_name": "KandinskyPipeline", "transformer": ["diffusers", "X"]}, "k")
    assert by_name("flux").denoiser_class == "FluxTransformer2DModel"


def test_sd3_text_matches_the_pipeline(tiny):
    from diffusers import StableDiffusion3Pipeline

    comps = models.load_components(tiny["sd3"])
    captions = ["a red dog", "zebra on a hill"]
    text = models.encode_prompts(comps, captions)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny["sd3"])
    hidden, _, pooled, _ = pipe.encode_prompt(captions, captions, captions, do_classifier_free_guidance=False,
                                              max_sequence_length=16)
    # 16 CLIP tokens then 16 T5 tokens, 80 wide (CLIP-L + CLIP-G = 64, zero-padded to T5's 80)
    assert text["hidden"].shape == (2, 32, 80) and text["pooled"].shape == (2, 64)
    assert torch.equal(text["hidden"][:, :16, 64:], torch.zeros(2, 16, 16))
    assert torch.allclose(text["hidden"], hidden, atol=1e-6) and torch.allclose(text["pooled"], pooled, atol=1e-6)


def test_flux_text_matches_the_pipeline(tiny):
    from diffusers import FluxPipeline

    comps = models.load_components(tiny["flux"])
    captions = ["a red dog", "zebra on a hill"]
    text = models.encode_prompts(comps, captions)
    hidden, pooled, text_ids = FluxPipeline.from_pretrained(tiny["flux"]).encode_prompt(
        captions, max_sequence_length=16)
    assert text["hidden"].shape == (2, 16, 48) and text["pooled"].shape == (2, 32)
    assert torch.allclose(text["hidden"], hidden, atol=1e-6) and torch.allclose(text["pooled"], pooled, atol=1e-6)
    assert not text_ids.any()  # the positions the FLUX forward gives its text tokens: zeros


def test_z_image_guidance_and_time_follow_its_pipeline(tiny):
    """Z-Image's guidance is c + w (c - u) (skipped at w = 0); its transformer sees 1 - sigma and predicts
    the negated velocity, so the family's forward at sigma is minus the transformer's output at 1 - sigma."""
    comps = models.load_components(tiny["z_image"])
    family = comps.family
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    assert family.unguided_scale == 0.0 and family.guide(u, c, 2.0).tolist() == [7.0, -1.0]
    text = family.encode_text(comps, ["a red dog"])
    noisy = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = family.forward(comps.denoiser, noisy, torch.tensor([250.0]), text, {})
        raw = comps.denoiser([noisy[0].unsqueeze(1)], torch.tensor([0.75]), [text["hidden"][0][text["mask"][0]]],
                             return_dict=False)[0][0]
    torch.testing.assert_close(ours[0], -raw.squeeze(1))


def test_flow_velocity_target_by_hand():
    """x0 = 2, eps = -1, sigma 0.25: x_t = 0.75 * 2 + 0.25 * -1 = 1.25; v = eps - x0 = -3; the model sees
    t = 250. A model predicting v exactly has zero error; one predicting 0 has error 9 (mean) / 9 N (sum)."""
    flow = FlowNoise(NoiseConfig(), shift=1.0)
    x0, eps, sigma = torch.full((1, 4, 2, 2), 2.0), torch.full((1, 4, 2, 2), -1.0), torch.tensor([0.25])
    assert torch.equal(flow.noisy(x0, eps, sigma), torch.full_like(x0, 1.25))
    assert torch.equal(flow.target(x0, eps, sigma), torch.full_like(x0, -3.0))
    assert flow.model_timestep(sigma).tolist() == [250.0]

    def exact(model, noisy, t, text, image):
        return (noisy - x0) / sigma  # (x_t - x0) / sigma = eps - x0: the velocity

    def zero(model, noisy, t, text, image):
        return torch.zeros_like(noisy)

    assert denoising.denoising_errors(None, x0, eps, sigma, flow, {}, forward=exact).tolist() == [0.0]
    assert denoising.denoising_errors(None, x0, eps, sigma, flow, {}, forward=zero).tolist() == [9.0]
    flow_sum = FlowNoise(NoiseConfig(reduction="sum"), shift=1.0)
    assert denoising.denoising_errors(None, x0, eps, sigma, flow_sum, {}, forward=zero).tolist() == [9.0 * 16]


def test_timestep_samplers_by_hand():
    """Each sampler's u from a seeded generator, then sigma = s u / (1 + (s - 1) u) (s = 3: u = 0.5 -> 0.75)."""
    assert shifted_sigma(torch.tensor([0.5, 0.0, 1.0]), 3.0).tolist() == [0.75, 0.0, 1.0]
    assert shifted_sigma(torch.tensor([0.3]), 1.0).tolist() == pytest.approx([0.3])

    def draw(**kw):
        shift = kw.pop("shift", 1.0)
        return FlowNoise(NoiseConfig(**kw), shift=shift).draw_time(torch.Generator().manual_seed(5)).item()

    u = torch.rand(1, generator=torch.Generator().manual_seed(5)).item()
    assert draw() == pytest.approx(u)
    assert draw(shift=3.0) == pytest.approx(3 * u / (1 + 2 * u))
    z = torch.normal(0.5, 2.0, (1,), generator=torch.Generator().manual_seed(5)).item()
    assert draw(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=2.0) == pytest.approx(
        1 / (1 + math.exp(-z)))
    mode = 1 - u - 1.29 * (math.cos(math.pi * u / 2) ** 2 - 1 + u)
    assert draw(timestep_sampling="mode", mode_scale=1.29) == pytest.approx(mode)


def test_shift_defaults_and_ddpm_refuses_flow_sampling(tiny, tmp_path):
    sd3, flux = models.load_components(tiny["sd3"]), models.load_components(tiny["flux"])
    assert sd3.family.noise_process(sd3.noise_scheduler, NoiseConfig()).shift == 3.0  # the scheduler's shift
    # FLUX shifts by resolution at sampling time; its training draw is unshifted unless noise.shift says
    assert flux.family.noise_process(flux.noise_scheduler, NoiseConfig()).shift == 1.0
    assert flux.family.noise_process(flux.noise_scheduler, NoiseConfig(shift=2.0)).shift == 2.0
    sd = models.load_components(str(build_tiny_pipeline(tmp_path / "sd")))
    with pytest.raises(ConfigError, match="noise.timestep_sampling"):
        sd.family.noise_process(sd.noise_scheduler, NoiseConfig(timestep_sampling="logit_normal"))


def test_flux_packing_round_trips_and_matches_the_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(3, 4, 6, 8)
    packed = pack_latents(x)
    assert packed.shape == (3, 12, 16)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 3, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    assert torch.equal(packed[0, 1], x[0, :, 0:2, 2:4].flatten())  # token 1: row 0, patch column 1
    ids = image_ids(6, 8)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32))
    assert ids[5].tolist() == [0.0, 1.0, 1.0]


@pytest.mark.parametrize("name", ["sd3", "flux", "z_image", "qwen_image", "wan"])
def test_winner_and_loser_share_sigma_and_noise(tiny, name):
    """The same image as winner and loser gives the same error: one sigma and one noise per pair."""
    comps = models.load_components(tiny[name])
    family = comps.family
    process = family.noise_process(comps.noise_scheduler, NoiseConfig(timestep_sampling="logit_normal"))
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(2, 2, 3, 32, 32, generator=g) * 2 - 1, "captions": ["a red dog"] * 2,
             "is_tie": torch.zeros(2, dtype=torch.bool), "row_indices": torch.arange(2)}
    encoded = models.encode_pair_batch(comps, batch)
    shape = (encoded.moments.shape[2] // 2, *encoded.moments.shape[3:])  # (4, 16, 16); Wan's VAE: (4, 8, 8)
    noise = denoising.draw_pair_noise(denoising.pair_seeds(0, 0, 0, 2), shape, process.draw_time)
    assert noise.timesteps.dtype == torch.float32 and ((noise.timesteps > 0) & (noise.timesteps < 1)).all()
    x = models.pair_inputs(comps.vae.config, encoded, noise)
    same = denoising.PairInputs(x.latents_w, x.latents_w, x.noise, x.timesteps, x.text)
    with torch.no_grad():
        mse_w, mse_l = denoising.pair_errors(comps.denoiser, x, process, family.forward)
        a, b = denoising.pair_errors(comps.denoiser, same, process, family.forward)
        alone = denoising.winner_errors(comps.denoiser, x, process, family.forward)
    assert not torch.equal(mse_w, mse_l)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(alone, mse_w, atol=1e-6)
