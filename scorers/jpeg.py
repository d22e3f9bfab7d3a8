"""JPEG (in)compressibility, the weight-free rewards of DDPO (Black et al., 2023, "Training Diffusion
Models with Reinforcement Learning", section 6):

    jpeg_incompressibility(x) = + size of x saved as JPEG at quality 95, in kB (1 kB = 1000 bytes)
    jpeg_compressibility(x)   = - that size

as in DDPO's reference code (PIL ``save(format="JPEG", quality=95)``, bytes / 1000). Tensors are first
rounded to 8-bit pixels, as DDPO does. The prompt is not used, so these scorers need none; they run on
the CPU and need no download, which makes them the scorers the offline demo and tests use for real.
"""

from __future__ import annotations

import io

import torch

from scorers.base import Scorer, to_pil
from scorers.errors import InputError


def jpeg_kilobytes(image, quality: int = 95) -> float:
    """Size in kB (1000 bytes) of PIL RGB ``image`` encoded as JPEG at ``quality``."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegIncompressibility(Scorer):
    """+ JPEG size in kB. Options: ``quality`` (default 95, DDPO's), ``batch_size``; ``device``/``dtype``
    are accepted for a uniform interface but the work is PIL's, on the CPU."""

    name = "jpeg_incompressibility"
    needs_prompts = False
    sign = 1.0

    def __init__(self, *, quality: int = 95, **common):
        common.setdefault("device", "cpu")
        super().__init__(**common)
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise InputError(f"quality={quality!r}: expected an integer JPEG quality from 1 to 100")
        self.quality = quality

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        sizes = [jpeg_kilobytes(image, self.quality) for image in to_pil(images)]
        return self.sign * torch.tensor(sizes, dtype=torch.float64)


class JpegCompressibility(JpegIncompressibility):
    """- JPEG size in kB: smaller files (simpler images) score higher."""

    name = "jpeg_compressibility"
    sign = -1.0
