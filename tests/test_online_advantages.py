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
