"""Brightness: the mean Rec. 601 luma 0.299 R + 0.587 G + 0.114 B of an image's 8-bit pixels, in [0, 1].

A weight-free reward that a tiny random model can move within a few updates, which makes it the tests' and
benchmarks' reward for online tuning (a combo with weight -1 asks for darkness instead), and a plain monitor
of the drift towards over-bright images that aesthetic rewards invite. Tensors are rounded to 8-bit pixels
first, as saving them would, so a tensor and the PIL images made from it score the same.
"""

from __future__ import annotations

import torch

from scorers.base import Scorer, to_uint8

LUMA = (0.299, 0.587, 0.114)


class Brightness(Scorer):
    """Mean luma in [0, 1]; the prompt is not used. Options: ``batch_size``; ``device``/``dtype`` are accepted
    for a uniform interface, the work is on the CPU."""

    name = "brightness"
    needs_prompts = False

    def __init__(self, **common):
        common["device"] = "cpu"
        super().__init__(**common)

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        weights = torch.tensor(LUMA, dtype=torch.float64).view(3, 1, 1)
        return torch.stack([(pixels.double() / 255.0 * weights).sum(dim=0).mean() for pixels in
                            to_uint8(images, "cpu")])
