"""The clipped ratio loss per transition, its metrics and the Gaussian KL to the reference, by hand."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffusion_dpo.errors import InputError
from diffusion_dpo.online.objective import (
    clipped_policy_loss,
    gaussian_mean_kl,
    grpo_transition_loss,
    policy_metrics,
)

T = torch.tensor


def test_clipping_both_sides_and_ratio_one():
    # eps 0.2; per sample advantages (1, -1) broadcast over K = 3 steps with ratios (1.5, 1, 0.5)
    logp = torch.log(T([[1.5, 1.0, 0.5], [1.5, 1.0, 0.5]]))
    losses, clipped = clipped_policy_loss(logp, torch.zeros(2, 3), T([1.0, -1.0]), clip_range=0.2)
    # A = 1:  ratio 1.5 -> max(-1.5, -1.2) = -1.2 clipped; 1 -> -1; 0.5 -> max(-0.5, -0.8) = -0.5 unclipped
    # A = -1: ratio 1.5 -> max(1.5, 1.2) = 1.5 unclipped; 1 -> 1; 0.5 -> max(0.5, 0.8) = 0.8 clipped
    assert losses.tolist() == [pytest.approx([-1.2, -1.0, -0.5]), pytest.approx([1.5, 1.0, 0.8])]
    assert clipped.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    # ratio exactly 1: loss -A and the gradient of the loss wrt the log-prob is -A
    new = torch.zeros(2, 3, requires_grad=True)
    losses, clipped = clipped_policy_loss(new, torch.zeros(2, 3), T([2.0, -3.0]), clip_range=1e-4)
    losses.sum().backward()
    assert new.grad.tolist() == [[-2.0] * 3, [3.0] * 3] and clipped.sum().item() == 0


def test_advantage_shape_checked():
    with pytest.raises(InputError, match="one advantage per sample"):
        clipped_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), clip_range=0.2)


def test_policy_metrics_by_hand():
    m = policy_metrics(T([0.0, math.log(2)]), torch.zeros(2), T([0.0, 1.0]))
    assert m["clip_fraction"].item() == 0.5
    assert m["approx_kl"].item() == pytest.approx(0.5 * math.log(2) ** 2 / 2, abs=1e-7)
    assert m["kl_k3"].item() == pytest.approx((1 - math.log(2)) / 2, abs=1e-7)
    zero = policy_metrics(torch.ones(3), torch.ones(3), torch.zeros(3))
    assert all(v.item() == 0 for v in zero.values())


def test_gaussian_mean_kl_by_hand_and_against_torch():
    # means differ by (0.3, -0.1), std 0.5: (0.09 + 0.01) / (2 * 0.25) = 0.2 summed, 0.1 as a mean
    mean, ref = T([[0.3, -0.1]]), torch.zeros(1, 2)
    assert gaussian_mean_kl(mean, ref, T(0.5), "sum").item() == pytest.approx(0.2, abs=1e-7)
    assert gaussian_mean_kl(mean, ref, T(0.5)).item() == pytest.approx(0.1, abs=1e-7)
    expected = kl_divergence(Normal(mean, 0.5), Normal(ref, 0.5)).sum()
    assert gaussian_mean_kl(mean, ref, T(0.5), "sum").item() == pytest.approx(expected.item(), abs=1e-7)
    # at the start the policy is the reference: KL exactly 0
    assert gaussian_mean_kl(mean, mean.clone(), T(0.5)).tolist() == [0.0]
    with pytest.raises(InputError, match="reduction"):
        gaussian_mean_kl(mean, ref, T(0.5), "max")


def test_grpo_transition_loss_adds_the_kl_term():
    losses, _ = grpo_transition_loss(torch.zeros(1, 2), torch.zeros(1, 2), T([1.0]), T([[0.0, 0.5]]),
                                     clip_range=0.2, kl_coef=0.1)
    assert losses.tolist() == [pytest.approx([-1.0, -0.95])]
    with pytest.raises(InputError, match="KL of shape"):
        grpo_transition_loss(torch.zeros(1, 2), torch.zeros(1, 2), T([1.0]), torch.zeros(2), clip_range=0.2,
                             kl_coef=0.1)


def test_transition_kl_conventions_differ_by_the_step_size():
    """The KL the GRPO loss weighs, under each convention, on a flow schedule with sigmas (1, .75, .5, .25, 0)
    (|dt| = .25 everywhere) and noise level 1: at step 1, t = .75, sigma_t = sqrt(.75 / .25) = sqrt(3). With
    the reference's velocity 1 higher in every element, the means differ by
    [1 + sigma_t^2 / (2t) (1 - t)] dt = (1 + 3 / 1.5 * .25) * -.25 = -0.375 per element, so
        paper           0.375^2 / (2 * 3 * .25) = 0.09375
        flow_grpo_code  0.375^2 / (2 * 3)       = 0.0234375   (|dt| = 1/4 of the exact KL)"""
    from diffusion_dpo.online.objective import transition_kl
    from diffusion_dpo.online.transitions import FlowSDESchedule

    schedule = FlowSDESchedule(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]),
                               torch.tensor([1000.0, 750.0, 500.0, 250.0]), noise_level=1.0)
    x, v = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    step = torch.tensor([1, 1])
    mean, _ = schedule.mean_std(x, v, step)
    paper = transition_kl(schedule, x, mean, v + 1, step)
    code = transition_kl(schedule, x, mean, v + 1, step, convention="flow_grpo_code")
    assert torch.allclose(paper, torch.tensor([0.09375, 0.09375]))
    assert torch.allclose(code, torch.tensor([0.0234375, 0.0234375]))


def test_flow_grpo_code_convention_needs_a_flow_schedule():
    from diffusers import DDIMScheduler

    from diffusion_dpo.online.objective import transition_kl
    from diffusion_dpo.online.transitions import DDIMSchedule

    schedule = DDIMSchedule.from_scheduler(DDIMScheduler(), 4, eta=1.0)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(InputError, match="kl_convention"):
        transition_kl(schedule, x, x, x, torch.tensor([1]), convention="flow_grpo_code")
