"""Choosing K distinct steps of T per sample, seeded."""

import pytest
import torch

from diffusion_dpo.errors import InputError
from diffusion_dpo.online.step_choice import choose_steps


def test_distinct_sorted_in_range_and_seeded():
    steps = choose_steps(50, 10, 4, seed=3)
    assert steps.shape == (50, 4) and steps.dtype == torch.long
    assert all(len(set(row)) == 4 and row == sorted(row) for row in steps.tolist())
    assert int(steps.min()) >= 0 and int(steps.max()) <= 9
    assert torch.equal(steps, choose_steps(50, 10, 4, seed=3))
    assert not torch.equal(steps, choose_steps(50, 10, 4, seed=4))
    # rows differ from each other (drawn independently per sample)
    assert len({tuple(row) for row in steps.tolist()}) > 1


def test_uniform_over_steps():
    # each step is chosen with probability K / T = 0.4; 4000 samples -> 1600 per step, sd ~31
    counts = torch.bincount(choose_steps(4000, 10, 4, seed=0).flatten(), minlength=10)
    assert counts.sum().item() == 16000
    assert ((counts - 1600).abs() < 200).all(), counts.tolist()


def test_first_steps_always_included():
    steps = choose_steps(200, 10, 4, seed=1, first=2)
    assert (steps[:, :2] == torch.tensor([0, 1])).all()
    assert ((steps[:, 2:] >= 2) & (steps[:, 2:] <= 9)).all()
    assert all(len(set(row)) == 4 for row in steps.tolist())
    # k = T and k = first: every step, in order
    assert choose_steps(2, 5, 5, seed=0).tolist() == [[0, 1, 2, 3, 4]] * 2
    assert choose_steps(2, 5, 3, seed=0, first=3).tolist() == [[0, 1, 2]] * 2


def test_checks():
    with pytest.raises(InputError, match="k=11"):
        choose_steps(2, 10, 11, seed=0)
    with pytest.raises(InputError, match="first=5"):
        choose_steps(2, 10, 4, seed=0, first=5)
    with pytest.raises(InputError, match="expected an integer"):
        choose_steps(2, 10.0, 4, seed=0)


def test_row_weights_leave_zero_advantages_out_of_the_mean():
    from diffusion_dpo.online.step_choice import row_weights

    advantages = torch.tensor([0.0, 1.0, -1.0, 0.0])
    assert row_weights(advantages, drop_zero=False).tolist() == [1.0, 1.0, 1.0, 1.0]
    weights = row_weights(advantages, drop_zero=True)
    assert weights.tolist() == [0.0, 2.0, 2.0, 0.0]
    losses = torch.tensor([5.0, 1.0, 3.0, 7.0])
    assert float((losses * weights).mean()) == 2.0  # the mean over the kept rows, (1 + 3) / 2
    assert row_weights(torch.zeros(3), drop_zero=True).tolist() == [0.0, 0.0, 0.0]
