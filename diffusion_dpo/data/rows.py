"""One pair at a time: the data config, a row's verdict (which image won), per-pair random draws, decoding
and transforming a pair winner first, and collating pairs into a training batch."""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from diffusion_dpo.config import option
from diffusion_dpo.data.columns import ColumnMap
from diffusion_dpo.data.images import BadImage, ImageFetcher
from diffusion_dpo.data.sources import IMAGE_COLUMNS
from diffusion_dpo.data.videos import clip_pixels, describe_clip, open_clip
from diffusion_dpo.errors import InputError


@dataclass
class DataConfig:
    """The ``data:`` section of the train config."""

    source: Optional[str] = option(None, "preference pairs: a hub dataset id, a local folder of parquet shards, a "
                                   ".parquet file, or a .jsonl file naming image files; no default (Pick-a-Pic "
                                   "left the hub): see missing_source_error")
    columns: ColumnMap = option(ColumnMap, "which of the source's columns hold caption, images and labels, "
                                "and the label form (defaults: the Pick-a-Pic columns, read unchanged)")
    split: str = option("train", "split of a hub dataset, or subfolder of a local folder when it exists")
    streaming: bool = option(False, "read the source as a stream (no full download; resume skips the rows "
                             "that were in the shuffle buffer at checkpoint time)")
    cache_dir: Optional[str] = option(None, "where datasets keeps its arrow copy of a non-streaming hub or "
                                      "parquet source (null: HF_DATASETS_CACHE)")
    resolution: int = option(512, "training image side in pixels: shortest side resized to it, then cropped "
                             "to a square (SDXL: 1024)")
    center_crop: bool = option(True, "crop the center (as the paper's code does); false: a random crop")
    random_flip: bool = option(True, "flip each pair horizontally with probability 0.5 (winner and loser "
                               "together)")
    caption_dropout: float = option(0.2, "probability a caption is replaced by '' (the paper's code: 0.2)")
    keep_ties: bool = option(False, "keep 0.5/0.5 pairs (in stored order, is_tie true); default: drop and "
                             "count them")
    convert_non_rgb: bool = option(False, "convert grayscale/palette/CMYK images to RGB and composite "
                                   "transparent ones on white (counted); default: such pairs are bad rows")
    max_bad_fraction: float = option(0.01, "abort when more than this fraction of rows (or of decoded pairs) "
                                     "is bad; bad rows below it are skipped and counted")
    num_workers: int = option(0, "threads decoding and transforming images ahead of training (0: in the "
                              "calling thread)")
    shuffle_buffer: int = option(1000, "streaming only: rows in the shuffle buffer (0: stream order)")
    max_rows: Optional[int] = option(None, "use only the first N rows of the source (null: all); with "
                                     "data.columns.labels=ranks, the first N pairs")
    image_cache_dir: Optional[str] = option(None, "where images fetched from http(s) URLs are kept (null: "
                                            "~/.cache/diffusion-dpo/images, or under $XDG_CACHE_HOME)")
    fetch_retries: int = option(3, "further attempts at an image URL after a timeout, refused connection or "
                                "5xx/429 answer; still failing, the pair is a counted bad row")
    fetch_timeout: float = option(30.0, "seconds to wait for an image URL to answer, per attempt")
    fetch_backoff: float = option(1.0, "seconds before the first retry of an image URL, doubled at each "
                                  "retry")


def missing_source_error() -> InputError:
    """What a train run without ``data.source`` is told: where pairs come from now that Pick-a-Pic, once the
    default, has left the hub (April 2025)."""
    return InputError("config key 'data.source': no preference pairs given (there is no default). Make pairs "
                      "from a model with `diffusion-dpo label` and pass its output_dir, or name a public set "
                      "with one of the column maps in assets/configs/data/ (--config "
                      "assets/configs/data/<set>.yaml), or a parquet folder or JSONL file of your own")


def _check_config(cfg: DataConfig) -> None:
    if not cfg.source:
        raise missing_source_error()
    checks = [
        ("resolution", cfg.resolution > 0, "a positive number of pixels"),
        ("caption_dropout", 0.0 <= cfg.caption_dropout <= 1.0, "a probability in [0, 1]"),
        ("max_bad_fraction", 0.0 <= cfg.max_bad_fraction <= 1.0, "a fraction in [0, 1]"),
        ("num_workers", cfg.num_workers >= 0, "0 or more threads"),
        ("shuffle_buffer", cfg.shuffle_buffer >= 0, "0 or more rows"),
        ("max_rows", cfg.max_rows is None or cfg.max_rows > 0, "null or a positive number of rows"),
        ("fetch_retries", cfg.fetch_retries >= 0, "0 or more retries"),
        ("fetch_timeout", cfg.fetch_timeout > 0, "a positive number of seconds"),
        ("fetch_backoff", cfg.fetch_backoff >= 0, "0 or more seconds"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise InputError(f"config key 'data.{key}': expected {expected}, got {getattr(cfg, key)!r}")



# ---------------------------------------------------------------------------------------- rows and pairs

_VERDICTS = {(1.0, 0.0): "first", (0.0, 1.0): "second", (0.5, 0.5): "tie"}
ROW_REASONS = ("bad_label", "missing_caption")
IMAGE_REASONS = ("bad_image", "non_rgb_image", "unreachable_image")
_MIN_SEEN_FOR_ABORT = 20  # rows seen before the bad fraction may abort a run (or the whole set, if smaller)


def row_verdict(caption: Any, label_0: Any, label_1: Any, problem: Optional[str] = None) -> tuple[str, str]:
    """``("first" | "second" | "tie", "")`` for a usable row (which image won), else ``(reason, detail)``
    with reason ``bad_label`` or ``missing_caption``. ``problem``: why a mapped source's label could not be
    read (see :mod:`diffusion_dpo.data.columns`), making the row ``bad_label``."""
    # An empty caption is kept: it trains the unconditional prediction, as a dropped caption does.
    if not isinstance(caption, str):
        return "missing_caption", f"column caption is {caption!r}, expected a string"
    if problem:
        return "bad_label", problem
    # Numbers only, as a mapped source's labels (data.columns): the text "1" or true is not the label 1.
    numeric = all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in (label_0, label_1))
    verdict = _VERDICTS.get((float(label_0), float(label_1))) if numeric else None
    if verdict is None:
        return "bad_label", (f"columns label_0, label_1 are {label_0!r}, {label_1!r}; expected 1/0, 0/1 or "
                             "0.5/0.5")
    return verdict, ""


def pair_draws(seed: int, epoch: int, row_id: int) -> np.ndarray:
    """Four uniform [0, 1) numbers for one pair in one epoch: flip, crop top, crop left, caption dropout.

    Seeded from (seed, epoch, row id) alone, never from a shared RNG stream, so a pair's augmentation does
    not depend on what was loaded before it, on which process loads it, or on a resume."""
    return np.random.default_rng([seed, epoch, row_id]).random(4)




def content_id(row: dict[str, Any]) -> int:
    """A 63-bit id of a row's caption and image bytes: a streamed row's identity (a stream has no stable
    row index), used to seed its augmentation and reported as its ``row_indices`` entry."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(str(row.get("caption")).encode())
    for column in IMAGE_COLUMNS:
        value = row.get(column)
        if isinstance(value, dict):
            value = value.get("bytes") or str(value.get("path")).encode()
        elif hasattr(value, "tobytes"):
            value = value.tobytes()
        digest.update(value if isinstance(value, (bytes, bytearray)) else repr(value).encode())
    return int.from_bytes(digest.digest(), "little") >> 1


@dataclass
class Pair:
    """One transformed pair, winner first."""

    pixel_values: torch.Tensor  # [2, 3, R, R] in [-1, 1]; videos: [2, 3, F, R, R]
    caption: str
    original_sizes: list[tuple[int, int]]  # (height, width) of winner, loser
    crop_top_lefts: list[tuple[int, int]]
    is_tie: bool
    row_id: int
    converted: int  # images converted to RGB (only with convert_non_rgb)


@dataclass
class BadPair:
    reason: str
    message: str


def load_pair(row: dict[str, Any], verdict: str, row_id: int, epoch: int, seed: int, cfg: DataConfig,
              where: str) -> Pair | BadPair:
    """Decode and transform one usable row (``verdict`` from :func:`row_verdict`); the winner goes first,
    a tie keeps its stored order. Winner and loser share the flip and the relative crop position (as the
    diffusers Diffusion-DPO example, which crops and flips the pair stacked on channels), so the pair
    differs only in what the raters judged. A bad image gives a BadPair instead of raising."""
    draws = pair_draws(seed, epoch, row_id)
    order = ("jpg_1", "jpg_0") if verdict == "second" else ("jpg_0", "jpg_1")
    fetcher = ImageFetcher(cfg.image_cache_dir, cfg.fetch_retries, cfg.fetch_timeout, cfg.fetch_backoff)
    pixels, sizes, crops, converted = [], [], [], 0
    flip = cfg.random_flip and draws[0] < 0.5
    for column in order:
        at = f"row {where} column {column}"
        try:
            # a clip: one frame for an image, every frame of a video (data.videos)
            tensor, size, crop, changed = clip_pixels(open_clip(row[column], at, fetcher=fetcher), at, cfg,
                                                      draws, flip)
        except BadImage as e:
            return BadPair(e.reason, str(e))
        converted += changed
        pixels.append(tensor)
        sizes.append(size)
        crops.append(crop)
    if pixels[0].shape != pixels[1].shape:
        raise InputError(f"row {where}: column {order[0]} holds {describe_clip(pixels[0])} and column "
                         f"{order[1]} {describe_clip(pixels[1])}; a pair's two sides must have the same "
                         "frame count")
    caption = "" if draws[3] < cfg.caption_dropout else row["caption"]
    pair_pixels = torch.from_numpy(np.stack([p.numpy() for p in pixels]))
    return Pair(pair_pixels, caption, sizes, crops, verdict == "tie", row_id, converted)


def collate(pairs: list[Pair]) -> dict[str, Any]:
    """A training batch of B pairs: ``pixel_values`` float32 [B, 2, 3, R, R] (index 0 winner, 1 loser;
    videos [B, 2, 3, F, R, R]),
    ``captions`` list[str], ``original_sizes`` and ``crop_top_lefts`` long [B, 2, 2] ((height, width) and
    (top, left)), ``is_tie`` bool [B], ``row_indices`` long [B]."""
    shapes = {tuple(p.pixel_values.shape) for p in pairs}
    if len(shapes) > 1:
        kinds = ", ".join(f"row {p.row_id}: {describe_clip(p.pixel_values[0])}" for p in pairs)
        raise InputError(f"one batch mixes clips of different frame counts ({kinds}); every pair of a run "
                         "must have the same number of frames")
    return {
        "pixel_values": torch.from_numpy(np.stack([p.pixel_values.numpy() for p in pairs])),
        "captions": [p.caption for p in pairs],
        "original_sizes": torch.tensor([p.original_sizes for p in pairs], dtype=torch.long),
        "crop_top_lefts": torch.tensor([p.crop_top_lefts for p in pairs], dtype=torch.long),
        "is_tie": torch.tensor([p.is_tie for p in pairs], dtype=torch.bool),
        "row_indices": torch.tensor([p.row_id for p in pairs], dtype=torch.long),
    }
