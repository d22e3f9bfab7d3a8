"""Preference pairs in the Pick-a-Pic schema: open a source, decode its images, batch winner/loser pairs.

* :mod:`~diffusion_dpo.data.sources`: opening a hub id, a parquet folder or file, or a JSONL file;
* :mod:`~diffusion_dpo.data.columns`: the ``data.columns`` map reading a foreign schema as ours;
* :mod:`~diffusion_dpo.data.images`: fetching and decoding a stored image into PIL RGB, the resize/crop/flip
  transform;
* :mod:`~diffusion_dpo.data.rows`: the ``data:`` config, a row's verdict, one pair decoded winner first;
* :mod:`~diffusion_dpo.data.loader`: :class:`PreferencePairs`, resumable batches split across processes.

    ds = open_pairs("pairs/")                                    # raw rows, a datasets.Dataset
    image = decode_image(ds[0]["jpg_0"], "row 0 column jpg_0")   # PIL RGB
"""

from diffusion_dpo.data.columns import ColumnMap, is_default, map_columns
from diffusion_dpo.data.images import (
    BadImage,
    ImageFetcher,
    NonRGBImage,
    UnreachableImage,
    decode_image,
    default_image_cache,
    open_image,
    to_rgb,
    transform_image,
)
from diffusion_dpo.data.loader import DataStats, PreferencePairs
from diffusion_dpo.data.rows import (
    IMAGE_REASONS,
    ROW_REASONS,
    BadPair,
    DataConfig,
    Pair,
    collate,
    content_id,
    load_pair,
    missing_source_error,
    pair_draws,
    row_verdict,
)
from diffusion_dpo.data.sources import (
    IMAGE_COLUMNS,
    REQUIRED_COLUMNS,
    check_columns,
    open_pairs,
    read_jsonl_rows,
)

__all__ = [
    "IMAGE_COLUMNS", "IMAGE_REASONS", "REQUIRED_COLUMNS", "ROW_REASONS", "BadImage", "BadPair", "ColumnMap",
    "DataConfig", "DataStats", "ImageFetcher", "NonRGBImage", "Pair", "PreferencePairs", "UnreachableImage",
    "check_columns", "collate", "content_id", "decode_image", "default_image_cache", "is_default",
    "load_pair", "map_columns", "missing_source_error", "open_image", "open_pairs", "pair_draws",
    "read_jsonl_rows", "row_verdict", "to_rgb", "transform_image",
]
