"""Relabel mode of label: reading a pairs source in shards and replacing each pair's labels with a scorer's
preference, the original labels kept beside them."""

from __future__ import annotations

from typing import Any, Callable

import pyarrow as pa

from diffusion_dpo.errors import InputError
from diffusion_dpo.labeling.pairing import agreement, relabel
from diffusion_dpo.labeling.records import RELABEL_SCHEMA, stored_bytes


def relabel_rows(scorer, rows: list[tuple[int, dict]], where: str, *, scorer_name: str, min_margin: float,
                 image_format: str) -> tuple[pa.Table, dict]:
    """Score both images of each ``(source_index, row)`` of ``where`` and relabel it (a margin under
    ``min_margin`` is a tie); return the rows and their stats. Images already encoded are stored as they are,
    decoded ones are encoded in ``image_format``."""
    scores = score_pairs(scorer, rows, where)
    out, original, new = [], [], []
    stats = {"winner_score_sum": 0.0, "loser_score_sum": 0.0}
    for j, (idx, row) in enumerate(rows):
        s0, s1 = scores[2 * j], scores[2 * j + 1]
        label_0, label_1 = relabel(s0, s1, min_margin)
        original.append(original_labels(row, f"row {idx} of {where}"))
        new.append((label_0, label_1))
        if label_0 != label_1:
            stats["winner_score_sum"] += max(s0, s1)
            stats["loser_score_sum"] += min(s0, s1)
        out.append({
            "caption": row["caption"],
            "jpg_0": stored_bytes(row["jpg_0"], image_format, f"row {idx} column jpg_0 of {where}"),
            "jpg_1": stored_bytes(row["jpg_1"], image_format, f"row {idx} column jpg_1 of {where}"),
            "label_0": label_0, "label_1": label_1,
            "original_label_0": original[-1][0], "original_label_1": original[-1][1],
            "score_0": s0, "score_1": s1, "scorer": scorer_name,
            "model_0": _opt_str(row.get("model_0")), "model_1": _opt_str(row.get("model_1")),
            "source_index": idx,
        })
    counts = agreement(original, new)
    stats.update({k: counts[k] for k in ("pairs", "original_ties", "new_ties", "compared", "agree")})
    return pa.Table.from_pylist(out, schema=RELABEL_SCHEMA), stats

def score_pairs(scorer, rows: list[tuple[int, dict]], where: str, *, fetcher=None) -> list[float]:
    """Scores of both images of each ``(source_index, row)`` of ``where``, each with the row's caption:
    ``[score(row 0 jpg_0), score(row 0 jpg_1), score(row 1 jpg_0), ...]`` (2 per row, scorer units).
    ``fetcher``: the :class:`~diffusion_dpo.data.images.ImageFetcher` for URL images (None: its defaults)."""
    from diffusion_dpo.data import decode_image

    images, prompts = [], []
    for idx, row in rows:
        for col in ("jpg_0", "jpg_1"):
            images.append(decode_image(row[col], f"row {idx} column {col} of {where}", convert_non_rgb=True,
                                       fetcher=fetcher))
            prompts.append(row["caption"] or "")
    return [float(x) for x in scorer.score(images, prompts).tolist()] if images else []


def original_labels(row: dict, where: str) -> tuple[float, float]:
    labels = (row["label_0"], row["label_1"])
    if labels not in ((1, 0), (0, 1), (0.5, 0.5)) or any(isinstance(x, bool) for x in labels):
        raise InputError(f"{where}: label_0/label_1 are {labels[0]!r}/{labels[1]!r}; expected 1/0, 0/1 or "
                         "0.5/0.5")
    return float(labels[0]), float(labels[1])

def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)

def shard_rows(ds, per: int, limit: int | None, wanted: Callable[[int], bool], seen: dict[str, int]):
    """Yield ``(shard_index, [(source_index, row), ...])`` for the wanted shards of a source; the last
    shard may be short. A map-style dataset is sliced; a streamed one is read through, skipping rows of
    unwanted shards without decoding them. ``seen["rows"]`` ends as the number of source rows in range."""
    if hasattr(ds, "__len__") and hasattr(ds, "select"):
        n = len(ds) if limit is None else min(limit, len(ds))
        seen["rows"] = n
        for index in range(-(-n // per)):
            if wanted(index):
                lo, hi = index * per, min((index + 1) * per, n)
                yield index, list(zip(range(lo, hi), ds.select(range(lo, hi))))
        return
    chunk: list = []
    index = 0
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        seen["rows"] = i + 1
        index = i // per
        if wanted(index):
            chunk.append((i, row))
            if len(chunk) == per:
                yield index, chunk
                chunk = []
    if chunk:
        yield index, chunk

def source_size(ds, limit: int | None) -> int | None:
    """Number of pairs to relabel when known without reading the source (map-style), else None."""
    if hasattr(ds, "__len__"):
        return len(ds) if limit is None else min(limit, len(ds))
    return None
