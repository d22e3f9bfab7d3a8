"""Videos in evaluate: a video family's pipeline (Wan) at ``sampling.num_frames`` > 1 gives each (prompt, seed)
a video, a list of PIL frames. Each frame is scored by the image scorer and a video's score is its frames'
mean; a video is saved as a lossless animated WebP (every frame, read back exactly on resume) beside a PNG of
its first, middle and last frames side by side, at the path an image would have.

    save_video(frames, path)      # path.png (the three-frame strip) and path.webp (the video)
    frames = read_video(path)     # the frames of path.webp
    scores = frame_mean_scores(lambda images, texts: scorer.score(images, texts), videos, texts)
    frame_consistency(videos)     # [N]: how alike adjacent frames are, reported beside the frame-mean score
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch

from diffusion_dpo.fileio import atomic_write


def is_video(sample) -> bool:
    """Whether a generated sample is a video (a list of frames) rather than one PIL image."""
    return isinstance(sample, list)


def strip(frames: list):
    """The first, middle and last frames side by side, one PIL image."""
    from PIL import Image

    picked = [frames[0], frames[len(frames) // 2], frames[-1]]
    width, height = picked[0].size
    sheet = Image.new("RGB", (3 * width, height))
    for i, frame in enumerate(picked):
        sheet.paste(frame.convert("RGB"), (i * width, 0))
    return sheet


def save_video(frames: list, path: Path, fps: int = 16) -> None:
    """``path`` (PNG): the three-frame strip; ``path`` with suffix .webp: every frame, lossless, ``fps``
    frames a second (Wan's 16). Each file is written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    webp = functools.partial(frames[0].save, format="WEBP", save_all=True, append_images=frames[1:],
                             lossless=True, duration=round(1000 / fps), loop=0)
    atomic_write(path.with_suffix(".webp"), webp)
    atomic_write(path, functools.partial(strip(frames).save, format="PNG"))


def read_video(path: Path) -> list:
    """The frames of the video saved at ``path`` (its .webp), as RGB PIL images."""
    from PIL import Image, ImageSequence

    with Image.open(path.with_suffix(".webp")) as video:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(video)]


CONSISTENCY = "frame_consistency"  # its name in evaluate's rows and report and in grpo's metrics


def frame_consistency(videos) -> torch.Tensor:
    """How alike adjacent frames are, per video, in [0, 1], from pixels alone (no scorer): with pixels in
    [0, 1], c = mean over t = 1 .. F-1 of (1 - mean |x_t - x_{t-1}|), the inner mean over channels and
    pixels. A still video scores 1; a video flipping between black and white every frame scores 0; a
    one-frame video scores 1. ``videos``: a tensor [N, 3, F, H, W] in [0, 1], or a list of N videos, each a
    list of PIL frames (8-bit, read as value / 255). Returns [N] fp32.

    Example: two 1x1 grey frames 0.2 then 0.6 differ by 0.4, so c = 0.6; three frames 0, 0.5, 0.5 give
    ((1 - 0.5) + (1 - 0)) / 2 = 0.75."""
    import numpy as np

    if not torch.is_tensor(videos):
        videos = torch.stack([torch.from_numpy(np.stack([np.asarray(f.convert("RGB"), dtype=np.float32)
                                                         for f in video])).permute(3, 0, 1, 2) / 255.0
                              for video in videos])
    videos = videos.float()
    if videos.shape[2] < 2:
        return torch.ones(videos.shape[0])
    change = (videos[:, :, 1:] - videos[:, :, :-1]).abs().mean(dim=(1, 3, 4))  # [N, F - 1]
    return (1 - change).mean(dim=1)


def frames_of(samples: list, texts: list[str]) -> tuple[list, list[str], int]:
    """(images, their texts, F): images as they are (F = 0); videos of F frames each (one run's are of one
    length) as their frames, video 0's first, each with its video's text."""
    if not samples or not is_video(samples[0]):
        return samples, texts, 0
    n = len(samples[0])
    return [frame for video in samples for frame in video], [t for t in texts for _ in range(n)], n


def per_sample(values: torch.Tensor, frames: int) -> torch.Tensor:
    """Per-frame values [N F] as each video's mean [N] (``frames`` = F from :func:`frames_of`); per-image
    values (F = 0) as they are."""
    return values if frames == 0 else values.float().view(-1, frames).mean(dim=1)


def video_scores(scorer, samples: list, texts: list[str]) -> torch.Tensor:
    """Each sample's score: a scorer that judges whole clips (``scores_videos``, e.g. ``shapes_video``: the
    motion across frames) scores videos whole; otherwise :func:`frame_mean_scores` of its image scores."""
    if samples and is_video(samples[0]) and getattr(scorer, "scores_videos", False):
        return scorer.score_videos(samples, texts)
    return frame_mean_scores(scorer.score, samples, texts)


def frame_mean_scores(score: Callable[[list, list[str]], torch.Tensor], samples: list,
                      texts: list[str]) -> torch.Tensor:
    """``score`` of images as it is; of videos, every frame scored with its video's text and each video's
    frames averaged."""
    images, image_texts, frames = frames_of(samples, texts)
    return per_sample(score(images, image_texts), frames)
