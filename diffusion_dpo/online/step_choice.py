"""Which K of the T recorded transitions of each sample to train on.

Training on every step costs T forward/backward passes per image; with K < T steps drawn uniformly
without replacement (DDPO's ``timestep_fraction``: a random permutation of the steps per sample, of which
the first K are trained), the mean loss over the K chosen steps is an unbiased estimate of the mean over
all T.

``first``: always train the first ``first`` steps (the noisiest) and draw the rest uniformly from the
others. Follow-ups of Flow-GRPO report that the early, high-noise steps fix the layout and carry most of
the reward's credit, which is why they are worth every update; this weights them more than the others
(by design: the estimate is then of a weighted mean over steps). Contiguous windows of steps are not offered.

A caller may pass only the first steps of the T as ``num_steps`` (flow_grpo's timestep_fraction 0.99: all but
the last of T = 10 steps).
"""

from __future__ import annotations

import torch

from diffusion_dpo.errors import InputError

Tensor = torch.Tensor


def choose_steps(num_samples: int, num_steps: int, k: int, seed: int, *, first: int = 0) -> Tensor:
    """K distinct step indices per sample, sorted ascending: long [num_samples, k].

    Steps first..T-1 are drawn uniformly without replacement, independently per sample, from a CPU
    generator seeded with ``seed`` (the same seed gives the same choice on any device); steps 0..first-1
    are always included. Example: T = 10, k = 4, first = 2 -> each row is 0, 1 and two distinct steps of 2..9.
    """
    for name, value in (("num_samples", num_samples), ("num_steps", num_steps), ("k", k), ("first", first)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{name}={value!r}: expected an integer")
    if num_samples < 1 or num_steps < 1:
        raise InputError(f"need num_samples >= 1 and num_steps >= 1, got {num_samples} and {num_steps}")
    if not 1 <= k <= num_steps:
        raise InputError(f"k={k}: expected 1 <= k <= num_steps = {num_steps} (distinct steps per sample)")
    if not 0 <= first <= k:
        raise InputError(f"first={first}: expected 0 <= first <= k = {k} (the always-trained first steps "
                         "are part of the k)")
    generator = torch.Generator("cpu").manual_seed(seed)
    rest = num_steps - first
    drawn = torch.stack([torch.randperm(rest, generator=generator)[:k - first] for _ in range(num_samples)])
    fixed = torch.arange(first).expand(num_samples, first)
    return torch.cat([fixed, drawn + first], dim=1).sort(dim=1).values


def row_weights(advantages: Tensor, *, drop_zero: bool) -> Tensor:
    """Per trained row [M] fp32, the weight of its loss in the step's mean over rows: all 1, or with
    ``drop_zero`` 0 for rows whose advantage is exactly 0 and M / M_kept for the rest, so the mean over all M
    rows is the mean over the kept ones (flow_grpo leaves such images out). Example: advantages (0, 1, -1, 0)
    -> (0, 2, 2, 0). When every advantage is 0 all weights are 0: the update has no policy signal at all."""
    weights = torch.ones(len(advantages), dtype=torch.float32)
    if not drop_zero:
        return weights
    keep = (advantages.detach().cpu() != 0).float()
    kept = int(keep.sum())
    return keep * (len(advantages) / kept) if kept else keep
