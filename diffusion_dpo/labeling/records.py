"""The rows label writes: the parquet schemas of its shards (the Pick-a-Pic columns plus provenance),
image encoding, and the run summary computed from the shards' own stats (so a resumed run summarises like an
uninterrupted one)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa

from diffusion_dpo.errors import InputError

GENERATE_SCHEMA = pa.schema([
    ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
    ("label_0", pa.float64()), ("label_1", pa.float64()),
    ("score_0", pa.float64()), ("score_1", pa.float64()),
    ("scorer", pa.string()), ("model_0", pa.string()), ("model_1", pa.string()),
    ("seed_0", pa.int64()), ("seed_1", pa.int64()), ("prompt_index", pa.int64()), ("style", pa.string()),
    ("sampler", pa.string()), ("num_inference_steps", pa.int64()), ("guidance_scale", pa.float64()),
    ("height", pa.int64()), ("width", pa.int64()),
])

RELABEL_SCHEMA = pa.schema([
    ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
    ("label_0", pa.float64()), ("label_1", pa.float64()),
    ("original_label_0", pa.float64()), ("original_label_1", pa.float64()),
    ("score_0", pa.float64()), ("score_1", pa.float64()), ("scorer", pa.string()),
    ("model_0", pa.string()), ("model_1", pa.string()), ("source_index", pa.int64()),
])

def encode(image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()

def stored_bytes(value: Any, fmt: str, where: str) -> bytes:
    """An image cell of a source dataset as encoded bytes, keeping the original encoding when it has one."""
    from PIL import Image

    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict) and value.get("bytes") is not None:
        return bytes(value["bytes"])
    if isinstance(value, dict) and value.get("path"):
        return Path(value["path"]).read_bytes()
    if isinstance(value, Image.Image):
        return encode(value, fmt)
    raise InputError(f"{where}: expected encoded image bytes, got {type(value).__name__}")

def mean(total: float, count: int) -> float | None:
    return total / count if count else None

def summarise_generate(done: dict[int, dict]) -> dict[str, Any]:
    total = {key: sum(st[key] for st in done.values())
             for key in ("prompts", "images", "pairs", "dropped", "winner_score_sum", "loser_score_sum")}
    return {
        "prompts": total["prompts"], "images_generated": total["images"], "pairs_written": total["pairs"],
        "pairs_dropped_for_margin": total["dropped"],
        "mean_winner_score": mean(total["winner_score_sum"], total["pairs"]),
        "mean_loser_score": mean(total["loser_score_sum"], total["pairs"]),
    }

def summarise_relabel(done: dict[int, dict]) -> dict[str, Any]:
    total = {key: sum(st[key] for st in done.values())
             for key in ("pairs", "original_ties", "new_ties", "compared", "agree", "winner_score_sum",
                         "loser_score_sum")}
    decided = total["pairs"] - total["new_ties"]
    return {
        "pairs_written": total["pairs"], "original_ties": total["original_ties"],
        "scorer_ties": total["new_ties"], "pairs_compared": total["compared"],
        "pairs_agreeing": total["agree"],
        "agreement": mean(total["agree"], total["compared"]),
        "mean_winner_score": mean(total["winner_score_sum"], decided),
        "mean_loser_score": mean(total["loser_score_sum"], decided),
    }
