"""FLUX.2 [dev] / [klein]: detection of both pipeline classes (and step-distilled klein), the 2x2 patchify
and batch-norm normalisation against the pipeline's own, and LoRA weights that load back exactly."""

import pytest
import torch

from diffusion_dpo import models
from diffusion_dpo.families import by_name, detect, detect_index
from diffusion_dpo.families.flux2 import patchify, unpatchify
from diffusion_dpo.tiny import build_tiny_pipeline
from tests.lora_round_trip import lora_round_trip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    return {name: str(build_tiny_pipeline(root / name, family=name)) for name in ("flux2", "flux2_klein")}


def test_detect_dev_klein_and_distilled_klein(tiny):
    assert detect(tiny["flux2"]).name == "flux2" and detect(tiny["flux2_klein"]).name == "flux2_klein"
    distilled = detect_index({"_class_name": "Flux2KleinPipeline", "is_distilled": True})
    assert distilled.name == "flux2_klein_distilled" and distilled.guidance_embedded  # no unconditional pass
    assert by_name("flux2").guidance_embedded and not by_name("flux2_klein").guidance_embedded


def test_patchify_and_normalisation_match_the_pipeline(tiny):
    from diffusers import Flux2Pipeline

    x = torch.randn(2, 4, 6, 8)
    assert torch.equal(patchify(x), Flux2Pipeline._patchify_latents(x))
    assert torch.equal(unpatchify(patchify(x)), x)
    comps = models.load_components(tiny["flux2"])
    vae = comps.vae
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    moments = models.encode_latent_moments(vae, pixels)
    assert moments.shape == (2, 32, 8, 8)  # mean and log-variance, each 4 x 4 channels at 16 / 2 px
    eps = torch.zeros(2, 16, 8, 8)  # the posterior mean, as the pipeline's argmax encoding
    ours = models.sample_latents(vae.config, moments, eps)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    theirs = (Flux2Pipeline._patchify_latents(vae.encode(pixels).latent_dist.mode()) - mean) / std
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(models.unscale_latents(vae.config, ours), vae.encode(pixels).latent_dist.mode())


@pytest.mark.parametrize("name", ["flux2", "flux2_klein"])
def test_lora_loads_back_exactly(tiny, tmp_path, name):
    adapted = lora_round_trip(by_name(name), tiny[name], tmp_path)
    assert any("single_transformer_blocks" in k for k in adapted) and any(".to_q." in k for k in adapted)
