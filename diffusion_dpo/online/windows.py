"""Which steps of a trajectory inject noise and get trained: the SDE window.

Sampling every step with the SDE and training all of them costs T forward/backward passes per image. Two
follow-ups of Flow-GRPO keep the noise, and the training, on a window of w consecutive steps and run the rest
deterministically (the ODE), so credit is assigned where the randomness was:

    [Flow-GRPO-Fast] (flow_grpo's README, 2025): a window of 1-2 steps at a random place each iteration
                     (``mode="random"``), matching Flow-GRPO's reward with far fewer trained steps;
    [MixGRPO]        Li et al., "MixGRPO: Unlocking Flow-based GRPO Efficiency with Mixed ODE-SDE", 2025,
                     sec. 3: a window that starts at the noisiest step and slides towards the clean end by
                     ``stride`` steps every ``shift_every`` iterations (``mode="sliding"``), reporting 50-71%
                     less training time.
``mode="fixed"`` keeps the window at ``start``. Windows lie within the first ``eligible`` steps (the trained
fraction of the trajectory), and each choice is a pure function of (seed, iteration), so a resumed run
samples the same windows.
"""

from __future__ import annotations

import numpy as np
import torch

from diffusion_dpo.errors import InputError

Tensor = torch.Tensor

MODES = ("fixed", "random", "sliding")


def window_start(mode: str, iteration: int, *, size: int, eligible: int, start: int = 0, stride: int = 1,
                 shift_every: int = 1, seed: int = 0) -> int:
    """The first step of iteration ``iteration``'s window of ``size`` steps within steps 0..eligible-1.

    fixed: ``start``. random: uniform over 0..eligible-size, drawn from (seed, iteration). sliding: ``start +
    stride * (iteration // shift_every)``, wrapping back to ``start`` once the window would pass the end (the
    sweep repeats). Example: eligible 10, size 2, start 0, stride 2, shift_every 3 -> iterations 0-2 start
    at 0, 3-5 at 2, ..., 12-14 at 8, 15-17 at 0 again.
    """
    if mode not in MODES:
        raise InputError(f"SDE window mode {mode!r} is not one of {MODES}")
    if not 1 <= size <= eligible:
        raise InputError(f"SDE window of {size} steps does not fit the {eligible} trainable steps")
    last = eligible - size
    if not 0 <= start <= last:
        raise InputError(f"SDE window start {start} must lie in 0..{last} (a window of {size} within "
                         f"{eligible} steps)")
    if mode == "fixed":
        return start
    if mode == "random":
        return int(np.random.default_rng([seed, iteration]).integers(0, last + 1))
    positions = (last - start) // stride + 1  # starts start, start + stride, ... that fit
    return start + stride * ((iteration // shift_every) % positions)


def window_mask(num_steps: int, start: int, size: int) -> Tensor:
    """bool [num_steps], True on steps start..start+size-1."""
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[start:start + size] = True
    return mask
