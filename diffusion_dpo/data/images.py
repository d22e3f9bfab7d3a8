"""Images of a pair: fetching (files, http(s) URLs with retries and an on-disk cache), decoding stored
values into PIL RGB, and the training transform (resize, crop, flip)."""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from diffusion_dpo.errors import InputError

URL_PREFIXES = ("http://", "https://")
# HTTP statuses worth retrying: the server may answer later (timeout, rate limit, overload).
_RETRY_STATUSES = (408, 425, 429, 500, 502, 503, 504)


class BadImage(InputError):
    """An image that cannot be decoded, or (unless conversion is allowed) is not RGB."""

    reason = "bad_image"


class NonRGBImage(BadImage):
    """An image whose mode is not RGB while ``data.convert_non_rgb`` is off."""

    reason = "non_rgb_image"


class UnreachableImage(BadImage):
    """An image URL that could not be fetched after every retry."""

    reason = "unreachable_image"


def default_image_cache() -> Path:
    """Where fetched images are kept unless ``data.image_cache_dir`` says otherwise:
    ``$XDG_CACHE_HOME/diffusion-dpo/images`` (``~/.cache/diffusion-dpo/images``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffusion-dpo" / "images"


class ImageFetcher:
    """Fetches image URLs with retries and keeps each answer on disk, so a URL is downloaded once.

    ``retries``: further attempts after the first; attempt ``n`` (from 1) waits ``backoff * 2**(n-1)``
    seconds first. A timeout, a refused connection or a status in ``_RETRY_STATUSES`` is retried; any other
    HTTP error (404, 403, ...) is final at once. The cache file is named by the URL's SHA-256 and written
    through a temporary file, so concurrent decode threads never read half a file."""

    def __init__(self, cache_dir: Optional[str | Path] = None, retries: int = 3, timeout: float = 30.0,
                 backoff: float = 1.0):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_image_cache()
        self.retries, self.timeout, self.backoff = retries, timeout, backoff

    def cache_path(self, url: str) -> Path:
        return self.cache_dir / hashlib.sha256(url.encode()).hexdigest()

    def fetch(self, url: str, where: str) -> bytes:
        """The bytes at ``url``, from the cache when present. Raises UnreachableImage naming ``where``."""
        cached = self.cache_path(url)
        if cached.is_file():
            return cached.read_bytes()
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(url, timeout=self.timeout) as response:
                    data = response.read()
                break
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code} {e.reason}"
                if e.code not in _RETRY_STATUSES:
                    raise UnreachableImage(f"{where}: cannot fetch {url}: {error}") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                error = str(getattr(e, "reason", None) or e) or type(e).__name__
        else:
            raise UnreachableImage(f"{where}: cannot fetch {url} after {self.retries + 1} attempt(s): "
                                   f"{error}") from None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, cached)
        return data


def _read_location(location: str, where: str, fetcher: Optional[ImageFetcher]) -> bytes:
    """The bytes of an image named by a file path or an http(s) URL."""
    if location.startswith(URL_PREFIXES):
        return (fetcher or ImageFetcher()).fetch(location, where)
    try:
        return Path(location).read_bytes()
    except OSError as e:
        raise BadImage(f"{where}: cannot read image file {location}: {e}") from None


def open_image(value: Any, where: str, *, fetcher: Optional[ImageFetcher] = None):
    """Decode ``value`` into a fully loaded PIL image in its stored mode. ``value`` is encoded bytes, a
    ``{"bytes": b, "path": p}`` dict as datasets stores images (``p`` used when ``b`` is missing), a PIL
    image, or a string: a file path or an http(s) URL (fetched by ``fetcher``, default settings when None).
    Raises BadImage (UnreachableImage for a URL that cannot be fetched) naming ``where``."""
    from PIL import Image

    if isinstance(value, Image.Image):
        image = value
    else:
        data = value
        if isinstance(value, dict):
            data = value.get("bytes")
            if data is None and value.get("path"):
                data = _read_location(str(value["path"]), where, fetcher)
        elif isinstance(value, str):
            data = _read_location(value, where, fetcher)
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
        raise NonRGBImage(f"{where}: image mode is {image.mode}, expected RGB (set data.convert_non_rgb=true "
                          "to convert grayscale/palette/CMYK and composite transparent images on white)")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(value: Any, where: str, *, convert_non_rgb: bool = False,
                 fetcher: Optional[ImageFetcher] = None):
    """Decode one image into PIL RGB (see :func:`open_image` for what ``value`` may be).

    A non-RGB image raises BadImage unless ``convert_non_rgb`` (see :func:`to_rgb`); every error is an
    InputError naming ``where`` (e.g. ``"row 17 column jpg_1 of pairs/"``).
    """
    return to_rgb(open_image(value, where, fetcher=fetcher), where, convert_non_rgb)


def keep_images_encoded(ds, columns):
    """A source whose image ``columns`` are ``datasets.Image`` features (or lists of them) would decode
    every image while reading; keep them as ``{"bytes", "path"}`` dicts, decoded later by
    :func:`decode_image`."""
    import datasets

    for column in columns:
        feature = (ds.features or {}).get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(column, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.List, datasets.Sequence)):
            inner = feature.feature
            if isinstance(inner, datasets.Image) and inner.decode:
                ds = ds.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return ds



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
