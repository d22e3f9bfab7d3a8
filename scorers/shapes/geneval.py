"""GenEval on the shapes world, offline: a detector exact for the world's rendered scenes and GenEval-style
checks of what a prompt asks for, each right (1) or wrong (0).

The detector: every pixel takes the nearest world colour when it lies within :data:`COLOUR_RADIUS` of one
(anti-aliased edges, which blend two colours, take none); the background is the colour most of the
:data:`~scorers.shapes.scorer.BORDER` px border ring takes; objects are the 4-connected regions of one
non-background colour of at least :data:`MIN_AREA` px (on the world's 32 x 32 grid), each with its colour,
pixel box and shape (of the world's three, upright, with the region's area and centroid, the one
overlapping the region best). The checks, for
"a large red circle on a blue background":

    counting     exactly one object
    colors       the largest object is red
    shape        the largest object is a circle
    size         its box side (the longer one) is nearer the large than the small side of the world
    position     its box lies inside the frame the world keeps free of shapes (6% of the side, rounded to px)
    background   the border ring is blue

``score`` is 1 when every check holds; :meth:`ShapesGenEval.score_tasks` gives each check. A benchmark
reports each check's share of correct images and their mean (GenEval's overall).

    load_scorer("shapes_geneval").score_tasks(images, prompts)  # {"counting": tensor [N], ...}
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scorers.base import Scorer, check_images, check_prompts, to_rgb, to_uint8
from scorers.shapes.scorer import BORDER, RESOLUTION, rasterise, soft_iou
from scorers.shapes.world import COLORS, SHAPES, SIZES, Scene, parse_prompt

SHAPE_TASKS = ("counting", "colors", "shape", "size", "position", "background")
COLOUR_RADIUS = 0.15  # RGB distance in [0, 1] units; the world's closest two colours are 0.67 apart
MIN_AREA = 8  # px of the 32 x 32 grid; the smallest shape the world draws covers about 40
FRAME = 0.06  # of the side: the world's margin between shape and edge


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    area: int  # px
    box: tuple[int, int, int, int]  # x0, y0, x1, y1, inclusive pixel indices
    shape: str


def colour_map(pixels: torch.Tensor) -> list[list[str | None]]:
    """[H][W] world colour name of each pixel of ``pixels`` [3, H, W] in [0, 1] (None: near none)."""
    names = list(COLORS)
    palette = torch.tensor([COLORS[n] for n in names], dtype=torch.float32) / 255
    d = ((pixels.permute(1, 2, 0)[:, :, None, :] - palette) ** 2).sum(-1).sqrt()  # [H, W, n_colours]
    nearest, index = d.min(-1)
    return [[names[k] if near <= COLOUR_RADIUS else None for near, k in zip(row_d, row_i)]
            for row_d, row_i in zip(nearest.tolist(), index.tolist())]


def detect(pixels: torch.Tensor) -> tuple[str | None, list[ShapeObject]]:
    """(background colour, objects largest first) of one image ``pixels`` [3, H, W] in [0, 1] (on the
    world's grid when it is another size)."""
    if pixels.shape[-2:] != (RESOLUTION, RESOLUTION):
        pixels = F.interpolate(pixels[None], size=(RESOLUTION, RESOLUTION), mode="area")[0]
    names = colour_map(pixels)
    h, w = len(names), len(names[0])
    ring = [names[i][j] for i in range(h) for j in range(w)
            if i < BORDER or j < BORDER or i >= h - BORDER or j >= w - BORDER]
    background = Counter(ring).most_common(1)[0][0]
    seen = [[False] * w for _ in range(h)]
    objects = []
    for i in range(h):
        for j in range(w):
            colour = names[i][j]
            if seen[i][j] or colour is None or colour == background:
                continue
            region, stack = [], [(i, j)]
            seen[i][j] = True
            while stack:
                y, x = stack.pop()
                region.append((y, x))
                for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= ny < h and 0 <= nx < w and not seen[ny][nx] and names[ny][nx] == colour:
                        seen[ny][nx] = True
                        stack.append((ny, nx))
            if len(region) >= MIN_AREA:
                objects.append(_object(colour, region))
    return background, sorted(objects, key=lambda o: -o.area)


def _object(colour: str, region: list[tuple[int, int]]) -> ShapeObject:
    ys, xs = [y for y, _ in region], [x for _, x in region]
    box = (min(xs), min(ys), max(xs), max(ys))
    # The shape is the world's shape (same area, same centroid, upright) that overlaps the region best.
    mask = torch.zeros(1, RESOLUTION, RESOLUTION)
    mask[0, ys, xs] = 1.0
    area = torch.tensor([float(len(region))])
    cy, cx = torch.tensor([sum(ys) / len(ys) + 0.5]), torch.tensor([sum(xs) / len(xs) + 0.5])
    shape = max(SHAPES, key=lambda s: soft_iou(mask, rasterise(s, area, cx, cy, RESOLUTION, RESOLUTION)).item())
    return ShapeObject(colour, len(region), box, shape)


def check(background: str | None, objects: list[ShapeObject], scene: Scene, side: int = RESOLUTION) -> dict[str, bool]:
    """Each of SHAPE_TASKS for an image whose detections are (``background``, ``objects``) and which should
    show ``scene``; ``side`` in px of the grid the boxes are on."""
    if not objects:
        return {task: task == "background" and background == scene.background for task in SHAPE_TASKS}
    main = objects[0]
    extent = max(main.box[2] - main.box[0], main.box[3] - main.box[1]) + 1
    nearest_size = min(SIZES, key=lambda s: abs(SIZES[s] * side - extent))
    # The world keeps FRAME * side (1.9 px at 32) free; anti-aliasing never makes that sliver a full pixel.
    frame = round(FRAME * side)
    inside = min(main.box[:2]) >= frame and max(main.box[2:]) <= side - 1 - frame
    return {"counting": len(objects) == 1, "colors": main.colour == scene.color, "shape": main.shape == scene.shape,
            "size": nearest_size == scene.size, "position": inside, "background": background == scene.background}


class ShapesGenEval(Scorer):
    """Registered as ``shapes_geneval``: 1.0 when an image passes every check of the module docstring,
    else 0.0, for shapes-world prompts. No weights."""

    name = "shapes_geneval"
    tasks = SHAPE_TASKS
    #: a benchmark reports the mean over ``tasks`` of each task's share correct
    overall = "task_mean"

    def __init__(self, *, device=None, dtype=None, batch_size: int = 256):
        super().__init__(device=device or "cpu", dtype=dtype, batch_size=batch_size)

    def _checks(self, images, prompts: list[str]) -> list[dict[str, bool]]:
        scenes = [parse_prompt(p) for p in prompts]
        pixels = [p.float().cpu() / 255 for p in to_uint8(images, "cpu")]
        return [check(*detect(p), scene) for p, scene in zip(pixels, scenes)]

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([float(all(c.values())) for c in self._checks(images, prompts)])

    def score_tasks(self, images, prompts) -> dict[str, torch.Tensor]:
        """task -> float32 [N] (1 right, 0 wrong) for each of SHAPE_TASKS; same input as :meth:`score`."""
        batch = check_images(images)
        prompts = check_prompts(prompts, len(batch), True, self.name)
        if isinstance(batch, list):
            batch = [to_rgb(image, self.alpha, f"image {i}") for i, image in enumerate(batch)]
        checks = self._checks(batch, prompts)
        return {task: torch.tensor([float(c[task]) for c in checks]) for task in SHAPE_TASKS}
