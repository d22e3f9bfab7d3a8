"""Trajectory sampling with per-step log-probs: shapes, per-image seeding, the ratio of exactly 1 on
unchanged weights, recomputation of chosen steps."""

import math

import pytest
import torch
from torch.distributions import Normal

from diffusion_dpo.errors import InputError
from diffusion_dpo.online.trajectory import gather_steps, sample_trajectory, transition_logprob
from diffusion_dpo.online.transitions import DDIMSchedule, FlowSDESchedule

SCHEDULES = {
    "ddim": DDIMSchedule(torch.tensor([0.3, 0.6, 0.9]), torch.tensor([0.6, 0.9, 0.99]),
                         torch.tensor([700, 400, 100]), eta=1.0),
    "flow": FlowSDESchedule(torch.tensor([1.0, 0.7, 0.3, 0.0]), torch.tensor([1000.0, 700.0, 300.0]), 0.7),
}


def predict(x, i):
    # any deterministic function of (latents, step) stands in for the denoiser
    return 0.3 * x + 0.1 * (i + 1)


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_shapes_and_per_image_seeding(kind):
    schedule = SCHEDULES[kind]
    start = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    traj = sample_trajectory(predict, schedule, start, generators(10, 11, 12))
    assert traj.latents.shape == (3, 4, 2, 4, 4) and traj.logprobs.shape == (3, 3)
    assert torch.equal(traj.latents[:, 0], start) and torch.equal(traj.final, traj.latents[:, -1])
    # image 1 alone, with its own seed, follows exactly the same trajectory as inside the batch
    alone = sample_trajectory(predict, schedule, start[1:2], generators(11))
    assert torch.equal(alone.latents[0], traj.latents[1]) and torch.equal(alone.logprobs[0], traj.logprobs[1])


def test_step_logprob_is_the_normal_density_of_the_drawn_noise():
    # one DDIM step from x = 0 with eps = 0.1: std 0.2 on every element, x_1 = mean + 0.2 z, so the
    # per-element log-prob is log N(z; 0, 1) - log 0.2
    schedule = DDIMSchedule(torch.tensor([0.5]), torch.tensor([0.9]), torch.tensor([500]), eta=1.0)
    traj = sample_trajectory(lambda x, i: torch.full_like(x, 0.1), schedule, torch.zeros(1, 8),
                             generators(3))
    z = torch.randn(8, generator=torch.Generator().manual_seed(3))
    _, std = schedule.mean_std(torch.zeros(1, 8), torch.full((1, 8), 0.1), torch.tensor([0]))
    expected = (Normal(0.0, 1.0).log_prob(z) - math.log(std.item())).mean()
    assert traj.logprobs.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recomputed_logprob_gives_ratio_exactly_one(kind, reduction):
    schedule = SCHEDULES[kind]
    start = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    traj = sample_trajectory(predict, schedule, start, generators(1, 2), reduction=reduction)
    for i in range(schedule.num_steps):
        x = traj.latents[:, i]
        new = transition_logprob(schedule, x, traj.latents[:, i + 1], predict(x, i), torch.full((2,), i),
                                 reduction=reduction)
        assert torch.equal(torch.exp(new.logprob - traj.logprobs[:, i]), torch.ones(2))
    # new weights: another model output gives another log-prob
    x = traj.latents[:, 0]
    moved = transition_logprob(schedule, x, traj.latents[:, 1], predict(x, 0) + 0.05, torch.zeros(2),
                               reduction=reduction)
    assert not torch.equal(moved.logprob, traj.logprobs[:, 0])


def test_gather_chosen_steps_and_recompute_in_one_batch():
    schedule = SCHEDULES["flow"]
    start = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    traj = sample_trajectory(predict, schedule, start, generators(7, 8))
    steps = torch.tensor([[2, 0], [1, 2]])
    lat, nxt, old = gather_steps(traj, steps)
    assert torch.equal(lat[1], traj.latents[0, 0]) and torch.equal(nxt[2], traj.latents[1, 2])
    assert old.tolist() == [traj.logprobs[0, 2].item(), traj.logprobs[0, 0].item(),
                            traj.logprobs[1, 1].item(), traj.logprobs[1, 2].item()]
    # the model sees each row at its own step; outputs computed row by row, as the sampler did
    out = torch.stack([predict(lat[r:r + 1], int(s))[0] for r, s in enumerate(steps.flatten())])
    new = transition_logprob(schedule, lat, nxt, out, steps.flatten())
    assert torch.allclose(new.logprob, old, atol=1e-6)


def test_checks():
    schedule = SCHEDULES["ddim"]
    with pytest.raises(InputError, match="one per sample"):
        sample_trajectory(predict, schedule, torch.zeros(2, 3), generators(1))
    with pytest.raises(InputError, match="predict returned shape"):
        sample_trajectory(lambda x, i: x[:, :1], schedule, torch.zeros(1, 3), generators(1))
    with pytest.raises(InputError, match="out of range"):
        zeros = torch.zeros(1, 3)
        transition_logprob(schedule, zeros, zeros, zeros, torch.tensor([3]))
