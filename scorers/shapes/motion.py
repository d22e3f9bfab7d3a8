"""The demo world in motion: one coloured shape moving across a plain background, and its scorer.

    "a red circle moving left on a blue background"

A clip is ``frames`` frames of a small shape (the world's "small" size) travelling ``TRAVEL`` of the image
side in the named direction, from a random start that keeps the whole path inside the frame.

The scorer ``shapes_video`` judges a clip by two parts, each in [0, 1], and returns their mean:

    look    the mean over frames of the ``shapes`` score of "a small <colour> <shape> on a <bg> background"
    motion  the shape's displacement along the asked direction, first frame to last, over the travel the
            world draws: clamp((c_last - c_first) . u / (TRAVEL x side), 0, 1), c the centroid of the
            shape-coloured pixels and u the unit direction (image axes: right +x, down +y). A clip that moves
            the full distance the right way scores 1, a still one 0, one moving the wrong way 0.

Called on single images (``score``), it gives the look part alone, so a frame-mean caller still gets a
sensible number; ``score_videos`` judges whole clips, and label, evaluate and grpo call it for videos.

    clip = render_clip(parse_motion_prompt(prompt), random.Random(0))        # 5 PIL frames
    load_scorer("shapes_video").score_videos([clip], [prompt])
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
import torch

from scorers.base import Scorer, to_uint8
from scorers.errors import InputError
from scorers.shapes.scorer import colour_membership, score_components
from scorers.shapes.world import COLORS, SHAPES, SIZES, Scene, render

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TRAVEL = 0.375  # of the image side, first frame to last (12 px at 32 px)
SIZE = "small"  # the moving shape's size word in the world's scenes
MOTION_WORDS: tuple[str, ...] = ("moving", *DIRECTIONS)

_PROMPT = re.compile(r"^a (?P<color>\w+) (?P<shape>\w+) moving (?P<direction>\w+) on a (?P<background>\w+) "
                     r"background$")


@dataclass(frozen=True)
class MotionScene:
    color: str
    shape: str
    direction: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction} on a {self.background} background"

    @property
    def still(self) -> Scene:
        """The scene of one frame, the world's still prompt."""
        return Scene(SIZE, self.color, self.shape, self.background)


def parse_motion_prompt(prompt: str) -> MotionScene:
    """The scene a moving-shapes prompt describes; InputError naming the prompt if it is not one."""
    m = _PROMPT.match(prompt.strip().lower())
    if m is None:
        raise InputError(f"prompt {prompt!r} is not a moving-shapes prompt; expected "
                         "'a <colour> <shape> moving <left|right|up|down> on a <colour> background'")
    scene = MotionScene(**m.groupdict())
    for key, allowed in (("color", COLORS), ("shape", SHAPES), ("direction", DIRECTIONS),
                         ("background", COLORS)):
        if getattr(scene, key) not in allowed:
            raise InputError(f"prompt {prompt!r}: {key} {getattr(scene, key)!r} is not one of "
                             f"{', '.join(allowed)}")
    if scene.color == scene.background:
        raise InputError(f"prompt {prompt!r}: the shape and the background have the same colour")
    return scene


def all_motion_scenes() -> list[MotionScene]:
    """Every clip scene: 7 colours x 3 shapes x 4 directions x 6 other backgrounds = 504."""
    return [MotionScene(c, s, d, bg) for c in COLORS for s in SHAPES for d in DIRECTIONS for bg in COLORS
            if bg != c]


def split_motion_prompts(held_out_fraction: float = 0.25, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held_out): disjoint, sorted, together every moving-shapes prompt (a seeded shuffle)."""
    prompts = sorted(s.prompt for s in all_motion_scenes())
    random.Random(seed).shuffle(prompts)
    n_held = round(len(prompts) * held_out_fraction)
    return sorted(prompts[n_held:]), sorted(prompts[:n_held])


class _Shifted(random.Random):
    """A Random whose uniform draws are fixed: render's size jitter, then the box's x0, y0."""

    def __init__(self, values: list[float]):
        super().__init__(0)
        self.values = list(values)

    def uniform(self, a, b):
        return self.values.pop(0)


def render_clip(scene: MotionScene, rng: random.Random, frames: int = 5, size: int = 32) -> list:
    """``frames`` PIL frames of ``scene``: the shape (jittered size, as ``render``) moves TRAVEL x size px
    in the scene's direction, evenly, from a random start that keeps it 6 % inside the edges throughout."""
    supersample = 4
    big = size * supersample
    jitter = rng.uniform(-0.12, 0.12)
    side = SIZES[SIZE] * (1 + jitter) * big
    travel, margin = TRAVEL * big, 0.06 * big
    dx, dy = DIRECTIONS[scene.direction]
    lo_x, hi_x = margin + max(0, -dx) * travel, big - margin - side - max(0, dx) * travel
    lo_y, hi_y = margin + max(0, -dy) * travel, big - margin - side - max(0, dy) * travel
    x0, y0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
    out = []
    for t in range(frames):
        f = t / max(frames - 1, 1)
        out.append(render(scene.still, _Shifted([jitter, x0 + dx * travel * f, y0 + dy * travel * f]), size))
    return out


def as_video_tensor(videos) -> torch.Tensor:
    """[N, 3, F, H, W] in [0, 1] from such a tensor or from N lists of PIL frames (through uint8)."""
    if torch.is_tensor(videos):
        return (videos.float().clamp(0, 1) * 255).round() / 255
    return torch.stack([torch.from_numpy(np.stack([np.asarray(f.convert("RGB"), dtype=np.float32)
                                                   for f in video])).permute(3, 0, 1, 2) / 255.0
                        for video in videos])


def motion_parts(videos: torch.Tensor, scenes: list[MotionScene]) -> dict[str, torch.Tensor]:
    """``look``, ``motion`` and ``score`` (their mean), each [N] in [0, 1], of videos [N, 3, F, H, W] in
    [0, 1]; also ``displacement`` [N, 2] (x, y) in px of the image's own size."""
    n, _, f, h, w = videos.shape
    frames = videos.transpose(1, 2).flatten(0, 1)  # [N F, 3, H, W]
    stills = [s.still for s in scenes for _ in range(f)]
    look = score_components(frames, stills)["score"].view(n, f).mean(1)
    fg = torch.tensor([COLORS[s.color] for s in stills], dtype=frames.dtype) / 255
    member = colour_membership(frames, fg)  # [N F, H, W]
    mass = member.sum((1, 2)).clamp_min(1e-6)
    cy = (member.sum(2) * (torch.arange(h, dtype=frames.dtype) + 0.5)).sum(1) / mass
    cx = (member.sum(1) * (torch.arange(w, dtype=frames.dtype) + 0.5)).sum(1) / mass
    centre = torch.stack([cx, cy], 1).view(n, f, 2)
    displacement = centre[:, -1] - centre[:, 0]
    unit = torch.tensor([DIRECTIONS[s.direction] for s in scenes], dtype=frames.dtype)
    motion = ((displacement * unit).sum(1) / (TRAVEL * w)).clamp(0, 1)
    return {"look": look, "motion": motion, "score": (look + motion) / 2, "displacement": displacement}


class ShapesVideoScorer(Scorer):
    """Registered as ``shapes_video``: clips of the moving-shapes world judged by look and motion (see the
    module docstring); images (single frames) by look alone."""

    name = "shapes_video"
    scores_videos = True

    def __init__(self, *, device=None, dtype=None, batch_size: int = 256):
        super().__init__(device="cpu", dtype=dtype, batch_size=batch_size)

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack(to_uint8(images, self.device)).float() / 255
        scenes = [parse_motion_prompt(p).still for p in prompts]
        return score_components(pixels, scenes)["score"]

    def score_videos(self, videos, prompts: list[str]) -> torch.Tensor:
        """Scores [N] in [0, 1] of N clips (a tensor [N, 3, F, H, W] in [0, 1] or lists of PIL frames)."""
        scenes = [parse_motion_prompt(p) for p in prompts]
        return motion_parts(as_video_tensor(videos), scenes)["score"].cpu()
