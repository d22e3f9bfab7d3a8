"""Videos as preference data: each side of a pair may be a video instead of an image.

A stored value is read as a clip, a list of PIL frames (one for an image):

* encoded bytes, a file path or a ``{"bytes", "path"}`` dict of an animated WebP or GIF (what ``label``
  writes for a video family: lossless animated WebP bytes) -- every frame, as RGB;
* an MP4 / MOV / WebM / MKV / AVI file path, read with imageio (``pip install imageio av``; without it an
  error says so and names the file);
* a folder of frame images, its files with an image suffix in sorted name order;
* anything :func:`~diffusion_dpo.data.images.open_image` reads as one still image (one frame).

A video's frames share the pair's crop and flip, and become pixels [3, F, R, R]; a pair's winner and loser
must have the same frame count. Whether F fits the VAE (t k + 1 frames for its temporal factor t) and the
family trains on videos at all is checked where the VAE is known (``models.encode_pair_batch``).

    frames = open_clip(row["jpg_0"], "row 3 column jpg_0")     # [PIL RGB] (video) or [PIL] (image)
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from diffusion_dpo.data.images import BadImage, ImageFetcher, open_image, to_rgb, transform_image
from diffusion_dpo.errors import InputError

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MOVIE_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi")


def _location(value: Any) -> Optional[str]:
    """The file path or URL a stored value names, when it names one instead of holding bytes."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        return str(value["path"])
    return None


def frame_folder_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` is not a video's frames (None when it is): a frame folder holds image files
    (FRAME_SUFFIXES) and nothing else but hidden files, so a folder named by mistake (a dataset's own
    folder, say) is refused where it is named rather than read as a clip of whatever images it holds."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    others = sorted(p.name for p in entries if not (p.is_file() and p.suffix.lower() in FRAME_SUFFIXES))
    if others:
        return f"it holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}, which are not frame images"
    if not entries:
        return "it is empty"
    return None


def _folder_frames(folder: Path, where: str) -> list:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise BadImage(f"{where}: frame folder {folder} holds no image files ({', '.join(FRAME_SUFFIXES)})")
    return [open_image(str(f), f"{where} frame file {f}") for f in files]


def _movie_frames(path: str, where: str) -> list:
    """The frames of an MP4 (or other movie container) file, read with imageio's pyav or ffmpeg plugin."""
    from PIL import Image

    try:
        import imageio.v3 as iio
    except ImportError:
        raise InputError(f"{where}: {path} is a movie file; reading it needs imageio with a video plugin "
                         "(pip install imageio av), or give the video as an animated WebP/GIF or a folder of "
                         "frame images") from None
    try:
        frames = iio.imread(path, index=None)
    except Exception as e:  # imageio raises plugin-specific errors (no plugin, bad file)
        raise BadImage(f"{where}: cannot read movie file {path}: {e}") from None
    return [Image.fromarray(np.asarray(frame)[..., :3]).convert("RGB") for frame in frames]


def open_clip(value: Any, where: str, *, fetcher: Optional[ImageFetcher] = None) -> list:
    """The frames of a stored value (see the module docstring): a video's as RGB PIL images, an image's
    one frame in its stored mode (``to_rgb`` decides about it). Raises BadImage naming ``where``."""
    from PIL import Image, ImageSequence

    location = _location(value)
    if location is not None and Path(location).is_dir():
        return _folder_frames(Path(location), where)
    if location is not None and location.lower().endswith(MOVIE_SUFFIXES):
        return _movie_frames(location, where)
    image = open_image(value, where, fetcher=fetcher)
    if getattr(image, "n_frames", 1) <= 1:
        return [image]
    # An animated file: its frames are the container's (GIF palettes, WebP RGBA), not a choice of the
    # data's author, so each is converted to RGB.
    try:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(image)]
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{where}: cannot decode the video's frames: {e}") from None


def clip_pixels(frames: list, where: str, cfg, draws, flip: bool) -> tuple[torch.Tensor, tuple, tuple, int]:
    """A clip through the training transform: (pixels [3, R, R] for one frame or [3, F, R, R] for a video,
    original (height, width), crop (top, left), frames converted to RGB). Every frame of a video gets the
    same crop and flip; frames of different sizes are an InputError naming the frame."""
    _, u_top, u_left, _ = draws
    converted = frames[0].mode != "RGB" if len(frames) == 1 else 0
    images = [to_rgb(frame, where, cfg.convert_non_rgb) for frame in frames]
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        first = images[0].size
        bad = next(i for i, image in enumerate(images) if image.size != first)
        raise InputError(f"{where}: video frames differ in size: frame 0 is {first[0]}x{first[1]}, frame "
                         f"{bad} is {images[bad].size[0]}x{images[bad].size[1]}")
    out = [transform_image(image, cfg.resolution, cfg.center_crop, u_top, u_left, flip) for image in images]
    if len(out) == 1:
        return (*out[0], converted)
    pixels = torch.stack([tensor for tensor, _, _ in out], dim=1)  # [3, F, R, R]
    return pixels, out[0][1], out[0][2], converted


def describe_clip(pixels: torch.Tensor) -> str:
    """'an image' or 'a 5-frame video' for the pixels of one side of a pair."""
    return "an image" if pixels.ndim == 3 else f"a {pixels.shape[1]}-frame video"


def pack_frames(frames: list) -> bytes:
    """A lossless animated WebP of ``frames`` (PIL images of one size): how label stores a video."""
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=list(frames[1:]), lossless=True,
                   duration=62, loop=0)
    return buffer.getvalue()
