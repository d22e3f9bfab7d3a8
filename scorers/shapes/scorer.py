"""The demo world's scorer: how well an image shows what its shapes-world prompt asks for. No weights.

For "a large red circle on a blue background" it measures, from pixels alone (each part in [0, 1]):

    background  share of the 2 px border ring (where the world never puts the shape) in the background
                colour
    size        shape-coloured area against the area the prompt's size and shape imply
                (a log-normal bump: 1 at the expected area, 0.06 at the other size's)
    shape       how much better the shape-coloured region overlaps the named shape than the other two:
                each shape is fitted (same area, same centroid) and scored by soft IoU; softmax over
                shapes with temperature 0.05, the named shape's probability
    clean       share of all pixels close to one of the two named colours (no stray colours, no smear)

and returns their mean. A correct rendering scores about 0.95 to 1.0; a right shape in the wrong colour
about 0.5; a wrong background about 0.4 to 0.5. Scores are continuous, so two samples of a model tie
only by accident.

    scorer = load_scorer("shapes")
    scorer.score(images, "a large red circle on a blue background")
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from scorers.base import Scorer, to_uint8
from scorers.shapes.world import COLORS, SHAPES, SIZES, Scene, parse_prompt

# Soft colour membership exp(-(d / TAU)^2), d the RGB distance in [0, 1] units. The closest two colours
# of the world (red and purple) are 0.67 apart: membership of one in the other is exp(-11) ~ 0.
TAU = 0.2
SHAPE_TEMPERATURE = 0.05
SIZE_SIGMA = 0.5  # of log(area / expected area)
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # shape area / bounding-box area
RESOLUTION = 32  # images are scored on the world's 32 x 32 grid (larger ones are area-downsampled)
SUBSAMPLES = 4  # per pixel side, when rasterising fitted shapes
BORDER = 2  # px: the world keeps shapes this far from the edge, so this ring is all background


def colour_membership(pixels: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """Soft membership [B, H, W] in [0, 1] of ``pixels`` [B, 3, H, W] (in [0, 1]) in the colours
    ``rgb`` [B, 3] (in [0, 1])."""
    d2 = ((pixels - rgb[:, :, None, None]) ** 2).sum(1)
    return torch.exp(-d2 / TAU**2)


def rasterise(shape: str, area: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, h: int,
              w: int) -> torch.Tensor:
    """Pixel coverage [B, H, W] in [0, 1] of an upright ``shape`` of ``area`` px^2 whose centroid is (cx, cy)
    (pixel units, pixel (i, j) spans [j, j+1] x [i, i+1]); coverage is averaged over SUBSAMPLES^2 points."""
    offsets = (torch.arange(SUBSAMPLES, dtype=area.dtype, device=area.device) + 0.5) / SUBSAMPLES
    ys = (torch.arange(h, dtype=area.dtype, device=area.device)[:, None] + offsets).reshape(-1)
    xs = (torch.arange(w, dtype=area.dtype, device=area.device)[:, None] + offsets).reshape(-1)
    y = ys[None, :, None] - cy[:, None, None]  # [B, H*S, 1], relative to the centroid
    x = xs[None, None, :] - cx[:, None, None]  # [B, 1, W*S]
    area = area[:, None, None]
    if shape == "circle":
        inside = x**2 + y**2 <= area / math.pi
    elif shape == "square":
        half = area.sqrt() / 2
        inside = (x.abs() <= half) & (y.abs() <= half)
    elif shape == "triangle":
        # Base = height = s, area s^2 / 2; the centroid sits 2/3 of the way down from the apex.
        s = (2 * area).sqrt()
        from_apex = y + 2 * s / 3
        inside = (from_apex >= 0) & (from_apex <= s) & (x.abs() <= from_apex / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    b = inside.shape[0]
    cover = inside.expand(b, h * SUBSAMPLES, w * SUBSAMPLES).float()
    return F.avg_pool2d(cover[:, None], SUBSAMPLES)[:, 0]


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fuzzy IoU sum(min) / sum(max) over [B, H, W] -> [B]."""
    return a.minimum(b).sum((1, 2)) / a.maximum(b).sum((1, 2)).clamp_min(1e-6)


def score_components(pixels: torch.Tensor, scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """The four parts of the score and their mean, each [B] in [0, 1].

    ``pixels``: float [B, 3, H, W] in [0, 1]; ``scenes``: what each image should show. Also returns
    ``predicted_shape`` [B] (index into SHAPES of the best-fitting shape) and ``shape_area`` [B] in px^2.
    """
    if pixels.shape[-1] != RESOLUTION or pixels.shape[-2] != RESOLUTION:
        pixels = F.interpolate(pixels, size=(RESOLUTION, RESOLUTION), mode="area")
    b, _, h, w = pixels.shape
    fg = torch.tensor([COLORS[s.color] for s in scenes], dtype=pixels.dtype, device=pixels.device) / 255
    bg = torch.tensor([COLORS[s.background] for s in scenes], dtype=pixels.dtype, device=pixels.device) / 255
    m_fg, m_bg = colour_membership(pixels, fg), colour_membership(pixels, bg)

    area = m_fg.sum((1, 2))
    expected = torch.tensor(
        [(SIZES[s.size] * h) * (SIZES[s.size] * w) * FILL[s.shape] for s in scenes],
        dtype=pixels.dtype, device=pixels.device,
    )
    size = torch.exp(-0.5 * (torch.log(area.clamp_min(1e-3) / expected) / SIZE_SIGMA) ** 2)
    ring = torch.ones(h, w, dtype=torch.bool, device=pixels.device)
    ring[BORDER:h - BORDER, BORDER:w - BORDER] = False
    background = m_bg[:, ring].mean(1)
    clean = m_fg.maximum(m_bg).mean((1, 2))

    centre_y = torch.arange(h, dtype=pixels.dtype, device=pixels.device) + 0.5
    centre_x = torch.arange(w, dtype=pixels.dtype, device=pixels.device) + 0.5
    mass = area.clamp_min(1e-6)
    cy = (m_fg.sum(2) * centre_y).sum(1) / mass
    cx = (m_fg.sum(1) * centre_x).sum(1) / mass
    ious = torch.stack([soft_iou(m_fg, rasterise(k, area, cx, cy, h, w)) for k in SHAPES], 1)  # [B, 3]
    named = torch.tensor([SHAPES.index(s.shape) for s in scenes], device=pixels.device)
    shape = torch.softmax(ious / SHAPE_TEMPERATURE, 1).gather(1, named[:, None])[:, 0]

    total = (background + size + shape + clean) / 4
    return {
        "score": total, "background": background, "size": size, "shape": shape, "clean": clean,
        "predicted_shape": ious.argmax(1), "shape_area": area,
    }


def shapes_score(pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Scores [B] in [0, 1] of ``pixels`` [B, 3, H, W] in [0, 1] for shapes-world ``prompts``."""
    return score_components(pixels, [parse_prompt(p) for p in prompts])["score"]


class ShapesScorer(Scorer):
    """Registered as ``shapes``: :func:`shapes_score` behind the common scorer interface (no weights).

    Prompts must be shapes-world prompts ("a small green triangle on a white background"); any other
    prompt raises InputError naming it.
    """

    name = "shapes"

    def __init__(self, *, device=None, dtype=None, batch_size: int = 256):
        super().__init__(device=device or "cpu", dtype=dtype, batch_size=batch_size)

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        # Through uint8, so a float tensor and the PIL images it rounds to get the same score.
        pixels = torch.stack(to_uint8(images, self.device)).float() / 255
        return shapes_score(pixels, prompts)
