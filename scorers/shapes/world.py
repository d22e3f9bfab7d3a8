"""The demo's world: one coloured shape on a plain coloured background, described by a prompt.

    "a large red circle on a blue background"

Every prompt names a size (small, large), a shape colour, a shape (circle, square, triangle) and a
background colour different from the shape's. The generator draws the scene at a random position with a
little jitter in size, anti-aliased, so a tiny diffusion model can learn it on a CPU in minutes. Prompts
are split once, deterministically, into a training set and a held-out set that share no prompt (every
word still occurs in both), so the demo can tune on one and evaluate on the other.

    train, held_out = split_prompts()
    images = [render(parse_prompt(p), random.Random(i)) for i, p in enumerate(train)]
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from scorers.errors import InputError

# Colours far apart in RGB, so a scorer can tell them apart from pixels alone.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Side of the shape's bounding box as a fraction of the image side, before jitter.
SIZES: dict[str, float] = {"small": 0.34, "large": 0.62}
SIZE_JITTER = 0.12  # relative, uniform in [-12%, +12%]

# Every word a prompt can contain: the tokenizer of the demo's base model holds each as one token.
WORLD_WORDS: tuple[str, ...] = ("a", "on", "background", *SIZES, *COLORS, *SHAPES)

_PROMPT = re.compile(
    r"^a (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) on a (?P<background>\w+) background$"
)


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for."""

    size: str
    color: str
    shape: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on a {self.background} background"


def parse_prompt(prompt: str) -> Scene:
    """The scene a world prompt describes; ``InputError`` naming the prompt if it is not one."""
    m = _PROMPT.match(prompt.strip().lower())
    if m is None:
        raise InputError(
            f"prompt {prompt!r} is not a shapes-world prompt; expected "
            f"'a <size> <colour> <shape> on a <colour> background'"
        )
    scene = Scene(**m.groupdict())
    for key, allowed in (("size", SIZES), ("color", COLORS), ("shape", SHAPES), ("background", COLORS)):
        if getattr(scene, key) not in allowed:
            raise InputError(
                f"prompt {prompt!r}: {key} {getattr(scene, key)!r} is not one of {', '.join(allowed)}"
            )
    if scene.color == scene.background:
        raise InputError(f"prompt {prompt!r}: the shape and the background have the same colour")
    return scene


def all_scenes() -> list[Scene]:
    """Every scene of the world (2 sizes x 7 colours x 3 shapes x 6 other background colours = 252)."""
    return [
        Scene(size, color, shape, bg)
        for size in SIZES for color in COLORS for shape in SHAPES for bg in COLORS if bg != color
    ]


def split_prompts(held_out_fraction: float = 0.25, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held_out) prompt lists: disjoint, together every prompt of the world, each sorted.

    The split depends only on ``held_out_fraction`` and ``seed``: a seeded shuffle of the sorted prompts.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise InputError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    prompts = sorted(s.prompt for s in all_scenes())
    random.Random(seed).shuffle(prompts)
    n_held = round(len(prompts) * held_out_fraction)
    return sorted(prompts[n_held:]), sorted(prompts[:n_held])


def render(scene: Scene, rng: random.Random, size: int = 32, supersample: int = 4):
    """A ``size`` x ``size`` RGB PIL image of ``scene`` at a random position and jittered size.

    Drawn ``supersample`` times larger and downsampled (box filter), which anti-aliases the edges.
    """
    from PIL import Image, ImageDraw

    big = size * supersample
    side = SIZES[scene.size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)) * big
    margin = 0.06 * big
    x0 = rng.uniform(margin, big - margin - side)
    y0 = rng.uniform(margin, big - margin - side)
    img = Image.new("RGB", (big, big), COLORS[scene.background])
    draw = ImageDraw.Draw(img)
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse([x0, y0, x0 + side, y0 + side], fill=fill)
    elif scene.shape == "square":
        draw.rectangle([x0, y0, x0 + side, y0 + side], fill=fill)
    else:  # an upright isosceles triangle filling the box: half of it
        draw.polygon([(x0 + side / 2, y0), (x0 + side, y0 + side), (x0, y0 + side)], fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


def sample_examples(prompts: list[str], n: int, seed: int = 0, size: int = 32) -> list[tuple[str, object]]:
    """``n`` (prompt, PIL image) pairs: prompts drawn uniformly from ``prompts``; same seed, same pairs."""
    if not prompts:
        raise InputError("sample_examples needs at least one prompt")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = rng.choice(prompts)
        out.append((prompt, render(parse_prompt(prompt), rng, size)))
    return out
