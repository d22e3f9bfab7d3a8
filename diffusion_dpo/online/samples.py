"""One sampling step's images with everything an update needs, and the seeded random streams of a step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffusion_dpo.online.rollout import Conditioning
from diffusion_dpo.online.trajectory import Trajectory

Tensor = torch.Tensor

# Independent random streams of one (seed, step, process): images' noise, pair noise, the step choice and
# order, the forward-process noise of NFT's rows, and the starting noise a group shares.
IMAGES, PAIRS, CHOICE, FORWARD_NOISE, GROUP_START = 0, 1, 2, 3, 4


def stream_seeds(seed: int, step: int, rank: int, stream: int, n: int) -> list[int]:
    """n 63-bit seeds from (run seed, sampling step, process, stream, position): what a step draws depends on
    nothing else, so a resumed run draws the same."""
    return [int(np.random.SeedSequence([seed, step, rank, stream, i]).generate_state(2, np.uint64)[0] >> 1)
            for i in range(n)]


@dataclass
class Samples:
    """One step's samples on one process: N = P x G images, prompt p's G images at rows p*G .. p*G + G - 1."""

    prompts: list[str]  # [P]
    cond: Conditioning  # per image [N, ...]
    trajectory: Trajectory  # latents [N, T + 1, C, h, w], log-probs [N, T] under the sampling policy
    schedule: Any  # this step's sampler: the run's schedule with this step's SDE window
    rewards: Tensor  # [N] fp32
    advantages: Tensor  # [N] fp32, clipped
    zero_spread_groups: int
    images: Tensor  # [N, 3, H, W] in [0, 1], on the CPU (videos: their N F frames)
    frame_consistency: Tensor | None = None  # videos: [N], evaluation.video.frame_consistency
