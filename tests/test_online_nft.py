"""DiffusionNFT's pieces by hand (docstrings of diffusion_dpo.online.nft)."""

import pytest
import torch

from diffusion_dpo.errors import InputError
from diffusion_dpo.online.nft import nft_loss, old_policy_decay, optimality, velocity_kl


def test_optimality_maps_clipped_advantages_to_probabilities():
    r = optimality(torch.tensor([-10.0, -2.5, 0.0, 5.0]), 5.0)
    assert torch.allclose(r, torch.tensor([0.0, 0.25, 0.5, 1.0]))
    with pytest.raises(InputError):
        optimality(torch.zeros(1), 0.0)


def test_nft_loss_worked_example():
    one = lambda v: torch.full((1, 1, 1, 1), v)  # noqa: E731
    for r in (0.0, 0.3, 1.0):
        losses, metrics = nft_loss(one(0.5), one(1.0), one(0.0), lambda u: 1.0 - u, torch.tensor([r]),
                                   beta=1.0, adv_clip_max=5.0)
        assert torch.allclose(losses, torch.tensor([2.5]))
        assert torch.allclose(metrics["old_deviation"], torch.tensor([0.25]))


def test_nft_gradient_pulls_towards_good_images_and_away_from_bad():
    """At v = v_old the gradient of r L+ + (1 - r) L- w.r.t. v is beta (r g+ - (1 - r) g+) with g+ the
    gradient of the x0 error: for r = 1 it descends towards the target velocity, for r = 0 away from it."""
    x0, noise = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    xt = (1 - 0.6) * x0 + 0.6 * noise
    target = noise - x0
    old = target + 0.3 * torch.randn_like(target)
    for r, closer in ((1.0, True), (0.0, False)):
        v = old.clone().requires_grad_(True)
        losses, _ = nft_loss(v, old, x0, lambda u: xt - 0.6 * u, torch.tensor([r]), beta=1.0, adv_clip_max=5.0)
        losses.sum().backward()
        stepped = (v - 1e-3 * v.grad).detach()
        assert (float((stepped - target).norm()) < float((old - target).norm())) is closer


def test_velocity_kl_and_old_policy_decay():
    assert torch.allclose(velocity_kl(torch.ones(2, 1, 2), torch.zeros(2, 1, 2)), torch.ones(2))
    assert [old_policy_decay(s, rate=0.001, maximum=0.5) for s in (0, 100, 1000, 5000)] == [0.0, 0.1, 0.5, 0.5]
    assert old_policy_decay(74, rate=0.0075, maximum=0.999, after=75) == 0.0
    assert old_policy_decay(175, rate=0.0075, maximum=0.999, after=75) == 0.75
