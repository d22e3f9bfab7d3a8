"""Image statistics that reveal reward hacking during online tuning.

A policy that games its scorer drifts in ways these numbers show long before a human looks: JPEG
incompressibility is won with noise and texture (JPEG size climbs), aesthetic scorers with saturated,
over-bright or over-dark images, and a collapsing run often produces black images (the fraction of
near-black pixels jumps). Logged per batch next to the reward, their trend is the alarm.

All statistics are per image, computed on 8-bit pixels (a float tensor is rounded as saving it would, so a
tensor and the PIL images made from it give the same numbers; transparent PIL pixels count as white, as
for the scorers):

    brightness       mean Rec. 601 luma 0.299 R + 0.587 G + 0.114 B, in [0, 1]
    saturation       mean HSV saturation (max - min) / max per pixel (0 where max = 0), in [0, 1]
    jpeg_kb          size of the image saved as JPEG at quality 95, in kB (1000 bytes), DDPO's encoder
    near_black       fraction of pixels whose brightest channel is below ``black_threshold`` (0.05 by
                     default, i.e. every channel <= 12 of 255)
"""

from __future__ import annotations

import torch

from diffusion_dpo.errors import InputError
from scorers.base import check_images, to_pil, to_rgb, to_uint8
from scorers.jpeg import jpeg_kilobytes

Tensor = torch.Tensor

LUMA = (0.299, 0.587, 0.114)


def image_statistics(images, *, black_threshold: float = 0.05, jpeg_quality: int = 95) -> dict[str, Tensor]:
    """The statistics above for ``images`` (a list of PIL images or a float tensor [B, 3, H, W] in [0, 1]).

    Returns {name: float64 tensor [B]}; :func:`batch_means` reduces them to one number each for the log.
    """
    if not 0.0 < black_threshold <= 1.0:
        raise InputError(f"black_threshold={black_threshold!r}: expected a fraction of full scale in (0, 1]")
    batch = check_images(images)
    if isinstance(batch, list):
        batch = [to_rgb(image, where=f"image {i}") for i, image in enumerate(batch)]
    stats: dict[str, list[float]] = {"brightness": [], "saturation": [], "jpeg_kb": [], "near_black": []}
    for pixels in to_uint8(batch, "cpu"):
        rgb = pixels.double() / 255.0  # [3, H, W]
        high, low = rgb.max(dim=0).values, rgb.min(dim=0).values
        luma = sum(w * channel for w, channel in zip(LUMA, rgb))
        saturation = torch.where(high > 0, (high - low) / high.clamp(min=1e-12), torch.zeros_like(high))
        stats["brightness"].append(float(luma.mean()))
        stats["saturation"].append(float(saturation.mean()))
        stats["near_black"].append(float((high < black_threshold).double().mean()))
    stats["jpeg_kb"] = [jpeg_kilobytes(image, jpeg_quality) for image in to_pil(batch)]
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in stats.items()}


def batch_means(stats: dict[str, Tensor]) -> dict[str, float]:
    """The mean of each per-image statistic over the batch, as plain floats (for metrics.jsonl)."""
    return {name: float(values.mean()) for name, values in stats.items()}
