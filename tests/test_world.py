"""The demo world (scorers/shapes/world.py) and its scorer (scorers/shapes/scorer.py)."""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_dpo.errors import InputError
from scorers import load_scorer
from scorers.shapes.scorer import rasterise, score_components, soft_iou
from scorers.shapes.world import (
    COLORS,
    SHAPES,
    SIZES,
    WORLD_WORDS,
    Scene,
    all_scenes,
    parse_prompt,
    render,
    sample_examples,
    split_prompts,
)


def pixels(images):
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 255


# ------------------------------------------------------------------------------------------------- world


def test_world_size_and_vocabulary():
    # 2 sizes x 7 colours x 3 shapes x 6 background colours (never the shape's own colour)
    scenes = all_scenes()
    assert len(scenes) == 2 * 7 * 3 * 6 == 252
    assert len({s.prompt for s in scenes}) == 252
    words = {w for s in scenes for w in s.prompt.split()}
    assert words == set(WORLD_WORDS)


def test_split_is_disjoint_complete_and_deterministic():
    train, held_out = split_prompts()
    assert len(held_out) == round(252 * 0.25) == 63 and len(train) == 189
    assert not set(train) & set(held_out)
    assert set(train) | set(held_out) == {s.prompt for s in all_scenes()}
    assert (train, held_out) == split_prompts()  # no hidden state
    assert split_prompts(seed=1) != (train, held_out)
    # every word of the world still appears in the training prompts
    assert {w for p in train for w in p.split()} == set(WORLD_WORDS)
    with pytest.raises(InputError, match="held_out_fraction"):
        split_prompts(held_out_fraction=1.0)


def test_parse_prompt_round_trip_and_errors():
    for scene in all_scenes()[::17]:
        assert parse_prompt(scene.prompt) == scene
    expected = Scene("large", "red", "circle", "blue")
    assert parse_prompt("  A Large RED circle on a blue background ") == expected
    with pytest.raises(InputError, match="not a shapes-world prompt"):
        parse_prompt("a photo of a dog")
    with pytest.raises(InputError, match="shape 'hexagon'"):
        parse_prompt("a large red hexagon on a blue background")
    with pytest.raises(InputError, match="same colour"):
        parse_prompt("a large red circle on a red background")


def test_generator_is_deterministic_and_draws_the_scene():
    train, _ = split_prompts()
    a, b = sample_examples(train, 6, seed=3), sample_examples(train, 6, seed=3)
    assert [p for p, _ in a] == [p for p, _ in b]
    assert all(np.array_equal(np.array(x), np.array(y)) for (_, x), (_, y) in zip(a, b))
    assert any(not np.array_equal(np.array(x), np.array(y))
               for (_, x), (_, y) in zip(a, sample_examples(train, 6, seed=4)))
    assert all(p in train for p, _ in a)

    # A large red square on blue: the corners are background, the centre of the shape is red, and the
    # red area is (0.62 +- 12%)^2 of the image.
    img = render(Scene("large", "red", "square", "blue"), random.Random(0))
    assert img.size == (32, 32) and img.mode == "RGB"
    px = np.array(img).reshape(-1, 3)
    red = (np.abs(px - COLORS["red"]).sum(1) < 30).mean()
    blue = (np.abs(px - COLORS["blue"]).sum(1) < 30).mean()
    assert (0.62 * 0.88) ** 2 * 0.8 < red < (0.62 * 1.12) ** 2
    assert red + blue > 0.9
    assert tuple(np.array(img)[0, 0]) == COLORS["blue"]


# ------------------------------------------------------------------------------------------------ scorer


def test_rasterise_areas_and_iou():
    # A fitted shape has the requested area (up to subsampling), wherever its centroid is.
    area = torch.tensor([120.0, 120.0, 120.0])
    cx, cy = torch.tensor([16.0, 10.3, 20.7]), torch.tensor([16.0, 12.1, 19.5])
    for shape in SHAPES:
        cover = rasterise(shape, area, cx, cy, 32, 32)
        assert cover.sum((1, 2)).tolist() == pytest.approx([120.0] * 3, rel=0.05)
    # Fuzzy IoU of a mask with itself is 1; of disjoint halves 0; of a disc and the square of equal area
    # around the same centre it is about 0.8 (the disc pokes out of the square's sides).
    m = torch.zeros(1, 4, 4)
    m[0, :2] = 1
    assert soft_iou(m, m).item() == 1.0
    assert soft_iou(m, 1 - m).item() == 0.0
    one = torch.tensor([200.0])
    c = torch.tensor([16.0])
    disc, square = rasterise("circle", one, c, c, 32, 32), rasterise("square", one, c, c, 32, 32)
    assert 0.75 < soft_iou(disc, square).item() < 0.85


def test_rendered_scene_scores_higher_for_its_own_prompt():
    scorer = load_scorer("shapes")
    img = render(Scene("large", "red", "circle", "blue"), random.Random(1))
    right = "a large red circle on a blue background"
    wrong = [
        "a large blue square on a red background",   # everything swapped
        "a large red square on a blue background",   # wrong shape
        "a large red triangle on a blue background",  # wrong shape
        "a small red circle on a blue background",   # wrong size
        "a large green circle on a blue background",  # wrong shape colour
        "a large red circle on a white background",  # wrong background
    ]
    scores = scorer.score([img] * 7, [right] + wrong)
    assert scores[0] > 0.9
    assert (scores[0] > scores[1:] + 0.1).all(), scores.tolist()
    assert scores[1] < 0.5  # only "clean" (two flat colours) and the layout are right


def test_scorer_on_ground_truth_and_components():
    # Over the whole world, ground-truth renderings score high and each component recognises its part:
    # the fitted-shape classifier names the right shape for every rendering.
    examples = sample_examples([s.prompt for s in all_scenes()], 200, seed=5)
    scenes = [parse_prompt(p) for p, _ in examples]
    parts = score_components(pixels([im for _, im in examples]), scenes)
    assert parts["score"].min() > 0.85 and parts["score"].mean() > 0.93
    assert parts["predicted_shape"].tolist() == [SHAPES.index(s.shape) for s in scenes]
    expected = torch.tensor([(SIZES[s.size] * 32) ** 2 for s in scenes])
    fill = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
    expected = expected * torch.tensor([fill[s.shape] for s in scenes])
    ratio = parts["shape_area"] / expected
    # the size jitter is +-12% of the side (area x0.77 to x1.25); anti-aliased edges count partly
    assert ratio.min() > 0.6 and ratio.max() < 1.3


def test_scorer_interface_tensor_equals_pil_and_bad_prompt():
    scorer = load_scorer("shapes", batch_size=3)
    examples = sample_examples([s.prompt for s in all_scenes()], 7, seed=2)
    images, prompts = [im for _, im in examples], [p for p, _ in examples]
    from_pil = scorer.score(images, prompts)
    from_tensor = scorer.score(pixels(images), prompts)
    assert from_pil.dtype == torch.float32 and from_pil.shape == (7,)
    assert torch.equal(from_pil, from_tensor)
    # Upscaled images are area-downsampled back to the 32 px grid: the same score up to resampling.
    big = [im.resize((64, 64), Image.Resampling.NEAREST) for im in images]
    assert scorer.score(big, prompts).tolist() == pytest.approx(from_pil.tolist(), abs=1e-5)
    with pytest.raises(InputError, match="not a shapes-world prompt"):
        scorer.score(images[:1], "a photo of a cat")


def test_scorer_prefers_the_right_colour_over_a_blend():
    # A solid wrong-colour shape, and a shape whose colour is halfway between right and wrong, both score
    # below the correct one, and the blend scores between the two.
    right = render(Scene("large", "yellow", "square", "black"), random.Random(4))
    wrong = render(Scene("large", "white", "square", "black"), random.Random(4))
    blend = Image.blend(right, wrong, 0.5)
    s = load_scorer("shapes").score([right, blend, wrong], "a large yellow square on a black background")
    assert s[0] > s[1] > s[2], s.tolist()
