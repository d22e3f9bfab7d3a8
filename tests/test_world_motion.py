"""The moving-shapes world and its scorer ``shapes_video``: clips move the way their prompts say, the motion
part is the centroid's displacement along the asked direction (checked on a hand-made clip), and whole
clips are what label / evaluate / grpo hand it."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from scorers import load_scorer
from scorers.errors import InputError
from scorers.shapes.motion import (
    TRAVEL,
    all_motion_scenes,
    as_video_tensor,
    motion_parts,
    parse_motion_prompt,
    render_clip,
    split_motion_prompts,
)


def square_clip(xs, size=32):
    """Frames of an 8x8 red square at column xs[t] (rows 12..19) on blue."""
    frames = []
    for x in xs:
        a = np.zeros((size, size, 3), np.uint8)
        a[:] = (30, 60, 220)
        a[12:20, x:x + 8] = (220, 30, 30)
        frames.append(Image.fromarray(a))
    return frames


def test_prompts_parse_and_split():
    scene = parse_motion_prompt("a red circle moving left on a blue background")
    assert (scene.color, scene.shape, scene.direction, scene.background) == ("red", "circle", "left", "blue")
    assert scene.still.prompt == "a small red circle on a blue background"
    for bad in ("a red circle moving sideways on a blue background", "a red circle on a blue background",
                "a red circle moving up on a red background"):
        with pytest.raises(InputError):
            parse_motion_prompt(bad)
    train, held = split_motion_prompts()
    assert len(all_motion_scenes()) == 504 and len(held) == 126 and not set(train) & set(held)


def test_motion_by_hand():
    """The square moves from x = 4 to x = 16: its centroid moves 12 px right, TRAVEL x 32 = 12 px, so
    motion is 12 / 12 = 1 for "right" and 0 for left, up and down; the frames look right either way."""
    assert TRAVEL * 32 == 12
    clip = as_video_tensor([square_clip([4, 10, 16])])
    scenes = [parse_motion_prompt(f"a red square moving {d} on a blue background")
              for d in ("right", "left", "up", "down")]
    parts = motion_parts(clip.expand(4, -1, -1, -1, -1), scenes)
    torch.testing.assert_close(parts["displacement"][0], torch.tensor([12.0, 0.0]), atol=1e-3, rtol=0)
    assert parts["motion"].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0], abs=1e-3)
    half = motion_parts(as_video_tensor([square_clip([4, 7, 10])]), scenes[:1])
    assert half["motion"].item() == pytest.approx(0.5, abs=1e-3)  # 6 px of 12
    assert torch.equal(parts["score"], (parts["look"] + parts["motion"]) / 2)


@pytest.mark.parametrize("direction", ["left", "right", "up", "down"])
def test_rendered_clips_score_high_forward_and_low_reversed(direction):
    scorer = load_scorer("shapes_video")
    prompts = [f"a {c} {s} moving {direction} on a {bg} background"
               for c, s, bg in (("red", "circle", "blue"), ("yellow", "square", "black"),
                                ("green", "triangle", "white"))]
    clips = [render_clip(parse_motion_prompt(p), random.Random(i)) for i, p in enumerate(prompts)]
    assert all(len(c) == 5 and c[0].size == (32, 32) for c in clips)
    forward = scorer.score_videos(clips, prompts)
    backward = scorer.score_videos([c[::-1] for c in clips], prompts)
    still = scorer.score_videos([[c[0]] * 5 for c in clips], prompts)
    assert (forward > 0.85).all() and (backward < 0.55).all() and (still < 0.55).all()
    assert scorer.score([clips[0][0]], [prompts[0]]).item() > 0.8  # one frame: its look alone


def test_video_scores_hand_whole_clips_to_a_clip_scorer():
    from diffusion_dpo.evaluation.video import frame_mean_scores, video_scores

    scorer = load_scorer("shapes_video")
    prompt = "a red square moving right on a blue background"
    clip = square_clip([4, 10, 16])
    whole = video_scores(scorer, [clip], [prompt])
    assert whole.item() == pytest.approx(scorer.score_videos([clip], [prompt]).item())
    assert frame_mean_scores(scorer.score, [clip], [prompt]).item() < whole.item()  # no motion credit
    tensor = as_video_tensor([clip])
    assert scorer.score_videos(tensor, [prompt]).item() == pytest.approx(whole.item(), abs=1e-5)
