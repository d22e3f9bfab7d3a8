"""Our Flow-GRPO sampler against flow_grpo's own code (github.com/yifan123/flow_grpo) on the same tiny SD3:
with the same starting noise and step noise, the same latents and log-probs at every step, and the same
log-prob of a recorded transition recomputed under the model (the update's PPO ratio).

Needs a checkout of flow_grpo: set FLOW_GRPO_PATH to it (it is imported in place, never copied); without it
the tests skip (CI has none).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

PEER = os.environ.get("FLOW_GRPO_PATH")
pytestmark = pytest.mark.skipif(not PEER, reason="FLOW_GRPO_PATH (a flow_grpo checkout) is not set")

STEPS, GUIDANCE, NOISE_LEVEL, PX = 6, 4.5, 0.7, 32
PROMPT = "a photo of a red circle"


@pytest.fixture(scope="module")
def peer():
    """flow_grpo's (pipeline_with_logprob, sde_step_with_logprob), imported from FLOW_GRPO_PATH."""
    sys.path.insert(0, str(Path(PEER)))
    try:
        from flow_grpo.diffusers_patch.sd3_pipeline_with_logprob import pipeline_with_logprob
        from flow_grpo.diffusers_patch.sd3_sde_with_logprob import sde_step_with_logprob
    finally:
        sys.path.remove(str(Path(PEER)))
    return pipeline_with_logprob, sde_step_with_logprob


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Our components and diffusers' StableDiffusion3Pipeline of one tiny SD3 folder (the same weights)."""
    from diffusers import StableDiffusion3Pipeline

    from diffusion_dpo.models import load_components
    from diffusion_dpo.tiny import build_tiny_pipeline

    path = build_tiny_pipeline(tmp_path_factory.mktemp("peer") / "tiny-sd3", family="sd3", resolution=PX)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return load_components(str(path)), pipe


def ours(comps, seed: int):
    from diffusion_dpo.online.rollout import Conditioning, guided_predict, rollout, sampling_schedule

    hw = (PX // 2, PX // 2)
    schedule = sampling_schedule(comps, num_inference_steps=STEPS, eta=1.0, noise_level=NOISE_LEVEL, latent_hw=hw)
    cond = Conditioning.of(comps, [PROMPT], guidance_scale=GUIDANCE, size=(PX, PX))
    predict = guided_predict(comps.family, comps.denoiser, schedule, cond)
    roll = rollout(predict, schedule, comps.vae, [seed], (comps.denoiser.config.in_channels, *hw), "cpu")
    return schedule, cond, roll.trajectory


def theirs(pipe, pipeline_with_logprob, seed: int):
    """flow_grpo's sampling of one image from the noise our rollout draws for ``seed``: the starting noise
    passed in, the step noise from the global generator re-seeded and advanced past that first draw (our
    generator draws the start, then each step's noise, from one stream)."""
    shape = (pipe.transformer.config.in_channels, PX // 2, PX // 2)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(seed))[None]
    torch.manual_seed(seed)
    torch.randn(shape)
    t5_length = min(256, pipe.tokenizer_3.model_max_length)  # the T5 tokens our SD3 family encodes
    _, latents, logprobs = pipeline_with_logprob(
        pipe, prompt=PROMPT, height=PX, width=PX, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
        latents=start, noise_level=NOISE_LEVEL, output_type="pt", max_sequence_length=t5_length)
    return torch.stack(latents, dim=1), torch.stack(logprobs, dim=1)


def test_schedule_is_the_pipelines(models):
    """Our SD3 timesteps and sigmas are those the pipeline's scheduler sets (set_timesteps(T) with its
    shift), which flow_grpo's sampler and its sde_step_with_logprob read (sigma_max = sigmas[1])."""
    from diffusion_dpo.online.rollout import sampling_schedule

    comps, pipe = models
    schedule = sampling_schedule(comps, num_inference_steps=STEPS, eta=1.0, noise_level=NOISE_LEVEL,
                                 latent_hw=(PX // 2, PX // 2))
    pipe.scheduler.set_timesteps(STEPS)
    assert torch.equal(schedule.timesteps, pipe.scheduler.timesteps.float())
    assert torch.equal(schedule.sigmas, pipe.scheduler.sigmas.float())
    assert float(schedule.sigmas[0]) == 1.0  # so the first step takes flow_grpo's sigma_max branch


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 7])
def test_sampled_latents_and_logprobs_equal_flow_grpos(models, peer, seed):
    comps, pipe = models
    _, _, trajectory = ours(comps, seed)
    latents, logprobs = theirs(pipe, peer[0], seed)
    assert trajectory.latents.shape == latents.shape and trajectory.logprobs.shape == logprobs.shape
    assert torch.equal(trajectory.latents[:, 0], latents[:, 0])
    torch.testing.assert_close(trajectory.latents, latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trajectory.logprobs, logprobs, rtol=1e-5, atol=1e-4)
    # the log-probs are real densities of the noise drawn: about -log(std sqrt(2 pi e)) per element, not 0
    assert bool((trajectory.logprobs.abs() > 0.1).all())


@torch.no_grad()
def test_recomputed_transition_logprob_equals_flow_grpos(models, peer):
    """The update's log-prob of recorded transitions (every step at once, as rows) under the model: ours via
    transition_logprob, flow_grpo's via sde_step_with_logprob(prev_sample=...), from the same velocities."""
    from diffusion_dpo.online.rollout import guided_predict
    from diffusion_dpo.online.trajectory import transition_logprob

    comps, pipe = models
    schedule, cond, trajectory = ours(comps, seed=3)
    step_index = torch.arange(STEPS)
    x, x_next = trajectory.latents[0, :-1], trajectory.latents[0, 1:]
    velocity = guided_predict(comps.family, comps.denoiser, schedule, cond.rows(torch.zeros(STEPS, dtype=torch.long)))(
        x, step_index)
    new = transition_logprob(schedule, x, x_next, velocity, step_index)
    pipe.scheduler.set_timesteps(STEPS)
    _, peer_logprob, peer_mean, peer_sigma = peer[1](pipe.scheduler, velocity, pipe.scheduler.timesteps,
                                                      x, noise_level=NOISE_LEVEL, prev_sample=x_next)
    torch.testing.assert_close(new.mean, peer_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new.logprob, peer_logprob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.logprob, trajectory.logprobs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(schedule.sde_sigmas(), peer_sigma.flatten(), rtol=1e-6, atol=0)
