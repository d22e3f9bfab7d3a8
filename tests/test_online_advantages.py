"""Group-normalised advantages by hand."""

import pytest
import torch

from diffusion_dpo.errors import InputError
from diffusion_dpo.online.advantages import group_advantages


def test_group_scope_by_hand_with_zero_spread_group():
    # group a: (1, 2, 3), mean 2, population var 2/3 -> (-1.224745, 0, 1.224745); group b: (5, 5) -> 0
    adv = group_advantages(torch.tensor([1.0, 5.0, 2.0, 5.0, 3.0]), ["a", "b", "a", "b", "a"])
    assert adv.values.tolist() == pytest.approx([-1.224745, 0.0, 0.0, 0.0, 1.224745], abs=1e-6)
    assert (adv.zero_spread_groups, adv.groups) == (1, 2)


def test_zero_spread_is_exactly_zero_and_singletons_count():
    # 0.1 three times: (r - mean) would be rounding noise, which normalisation would blow up
    adv = group_advantages(torch.tensor([0.1, 0.1, 0.1, 7.0]), [0, 0, 0, 1])
    assert adv.values.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert (adv.zero_spread_groups, adv.groups) == (2, 2)


def test_batch_scope_ignores_groups():
    # (0, 0, 4, 4): mean 2, var 4 -> (-1, -1, 1, 1), although each key's group has zero spread
    adv = group_advantages(torch.tensor([0.0, 0.0, 4.0, 4.0]), ["a", "a", "b", "b"], scope="batch")
    assert adv.values.tolist() == pytest.approx([-1.0, -1.0, 1.0, 1.0], abs=1e-6)
    assert (adv.zero_spread_groups, adv.groups) == (0, 1)
    by_group = group_advantages(torch.tensor([0.0, 0.0, 4.0, 4.0]), ["a", "a", "b", "b"])
    assert (by_group.values.abs().sum().item(), by_group.zero_spread_groups) == (0.0, 2)


def test_checks():
    with pytest.raises(InputError, match="scope"):
        group_advantages(torch.zeros(2), [0, 1], scope="prompt")
    with pytest.raises(InputError, match="one per reward"):
        group_advantages(torch.zeros(3), [0, 1])
    with pytest.raises(InputError, match=r"positions \[1\]"):
        group_advantages(torch.tensor([1.0, float("nan")]), [0, 0])


def test_group_mean_over_batch_std_by_hand():
    """flow_grpo's code: (r - group mean) / (batch population std + 1e-4). Rewards (1, 2, 3, 5, 5): batch std
    1.6, so group a's advantages are (-1, 0, 1) / 1.6001; group b is tied and stays exactly 0."""
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0]), ["a", "a", "a", "b", "b"],
                           scope="group_batch_std")
    assert torch.allclose(adv.values, torch.tensor([-0.624961, 0.0, 0.624961, 0.0, 0.0]), atol=1e-6)
    assert adv.zero_spread_groups == 1 and adv.groups == 2


def test_group_batch_std_keeps_a_near_tie_small():
    """Per-group whitening blows a near-tie up to unit size; the batch std keeps it at its real scale."""
    rewards = torch.tensor([0.5, 0.501, 0.0, 1.0])
    keys = [0, 0, 1, 1]
    per_group = group_advantages(rewards, keys).values
    batch = group_advantages(rewards, keys, scope="group_batch_std").values
    assert per_group[1] > 0.95  # 0.0005 above its group's mean, whitened to ~1
    # batch std 0.3536: the near-tie stays at 0.0005 / 0.3537, the real difference at 0.5 / 0.3537
    assert abs(float(batch[1])) < 2e-3 and abs(float(batch[3]) - 0.5 / 0.35366) < 1e-3


def test_group_batch_std_uses_the_gathered_std_when_given():
    adv = group_advantages(torch.tensor([1.0, 3.0]), [0, 0], scope="group_batch_std", batch_std=2.0)
    assert torch.allclose(adv.values, torch.tensor([-1.0, 1.0]) / 2.0001)


def test_per_reward_normalisation_lets_a_small_scale_count():
    """The docstring's example: a (100, 200) and b (0.3, 0.1) in one group. The weighted sum's advantages
    follow a alone; normalised one by one, the two disagree equally and cancel."""
    from diffusion_dpo.online.advantages import tied_groups, weighted_advantages

    a, b = torch.tensor([100.0, 200.0]), torch.tensor([0.3, 0.1])
    summed = group_advantages(a + b, [0, 0]).values
    assert torch.allclose(summed, torch.tensor([-1.0, 1.0]), atol=1e-4)
    each = {"a": group_advantages(a, [0, 0]).values, "b": group_advantages(b, [0, 0]).values}
    assert torch.allclose(weighted_advantages(each, {"a": 1.0, "b": 1.0}), torch.zeros(2), atol=1e-4)
    assert torch.allclose(weighted_advantages(each, {"a": 1.0, "b": 0.5}), torch.tensor([-0.5, 0.5]), atol=1e-4)
    assert tied_groups([torch.tensor([1.0, 1.0, 2.0, 3.0]), torch.tensor([5.0, 5.0, 0.0, 0.0])], 2) == 1
    with pytest.raises(InputError, match="no weight"):
        weighted_advantages(each, {"a": 1.0})
