"""Images of a pair: decoding stored values into PIL RGB, and the training transform (resize, crop, flip)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion_dpo.errors import InputError


class BadImage(InputError):
    """An image that cannot be decoded, or (unless conversion is allowed) is not RGB."""

    reason = "bad_image"


class NonRGBImage(BadImage):
    """An image whose mode is not RGB while ``data.convert_non_rgb`` is off."""

    reason = "non_rgb_image"


def open_image(value: Any, where: str):
    """Decode ``value`` (bytes, a ``{"bytes": b, "path": p}`` dict as datasets stores images, or a PIL
    image) into a fully loaded PIL image in its stored mode. Raises BadImage naming ``where``."""
    from PIL import Image

    if isinstance(value, Image.Image):
        image = value
    else:
        data = value
        if isinstance(value, dict):
            data = value.get("bytes")
            if data is None and value.get("path"):
                try:
                    data = Path(value["path"]).read_bytes()
                except OSError as e:
                    raise BadImage(f"{where}: cannot read image file {value['path']}: {e}") from None
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BadImage(f"{where}: expected encoded image bytes, got {type(value).__name__}")
        try:
            image = Image.open(io.BytesIO(data))
            image.load()  # decode now: a truncated file fails here, not later inside a transform
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            raise BadImage(f"{where}: cannot decode image ({len(data)} bytes): {e}") from None
    return image


def to_rgb(image, where: str, convert_non_rgb: bool = False):
    """``image`` as RGB. Other modes are bad data unless ``convert_non_rgb``: then grayscale, palette and
    CMYK are converted by PIL, and images with alpha (RGBA, LA, PA) are composited on white."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if not convert_non_rgb:
        raise NonRGBImage(f"{where}: image mode is {image.mode}, expected RGB (set data.convert_non_rgb=true to "
                       "convert grayscale/palette/CMYK and composite transparent images on white)")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(value: Any, where: str, *, convert_non_rgb: bool = False):
    """Decode one image into PIL RGB (see :func:`open_image` for what ``value`` may be).

    A non-RGB image raises BadImage unless ``convert_non_rgb`` (see :func:`to_rgb`); every error is an
    InputError naming ``where`` (e.g. ``"row 17 column jpg_1 of pairs/"``).
    """
    return to_rgb(open_image(value, where), where, convert_non_rgb)



def transform_image(image, resolution: int, center_crop: bool, u_top: float, u_left: float,
                    flip: bool) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize the shortest side to ``resolution`` (bilinear), crop a square, optionally flip, normalize.

    Returns pixels float32 [3, resolution, resolution] in [-1, 1], the original (height, width) and the
    crop's (top, left) in the resized, unflipped image. A random crop puts its offset at fraction
    ``u_top``/``u_left`` of the free range, so two images of different sizes get the same relative crop.
    """
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    free_w, free_h = size[0] - resolution, size[1] - resolution
    if center_crop:
        top, left = int(round(free_h / 2.0)), int(round(free_w / 2.0))
    else:
        top, left = min(int(u_top * (free_h + 1)), free_h), min(int(u_left * (free_w + 1)), free_w)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    # numpy, not torch: single-threaded, so decode threads do not contend for torch's intra-op pool.
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(pixels)), (height, width), (top, left)
