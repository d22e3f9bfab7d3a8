"""``diffusion-dpo score``: score image files, or measure how often a scorer agrees with preference labels.

    diffusion-dpo score --scorer pickscore --prompt "a red dog" a.png b.png   # prints path<TAB>score
    diffusion-dpo score --scorer pickscore --pairs yuvalkirstain/pickapic_v2 --split validation
    diffusion-dpo score --scorer hpsv2 --option checkpoint=HPS_v2_compressed.pt --option batch_size=16 ...

With ``--pairs`` it scores both images of every pair of a Pick-a-Pic-schema source (hub id, parquet
folder or JSONL) with the pair's caption and reports the preference accuracy: the share of pairs with a
human preference on which the scorer ranks the preferred image higher (label ties excluded and counted;
equal scores count half). PickScore's published figure on Pick-a-Pic v2 validation is 64.2%.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scorers.errors import InputError

_CHUNK = 64  # images (or pairs) read into memory at a time


def _parser() -> argparse.ArgumentParser:
    from scorers import available

    p = argparse.ArgumentParser(
        prog="diffusion-dpo score",
        description="Score images with a preference scorer, or measure a scorer's agreement with the labels "
                    "of a preference-pair dataset.",
    )
    p.add_argument("--scorer", required=True, help=f"scorer name: {', '.join(available())}")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="scorer option (repeatable), e.g. model=PATH, checkpoint=FILE, device=cuda, dtype=bf16, "
                        "batch_size=32; values are read as YAML, so parts={pickscore: 1, hpsv2.1: 0.5} works")
    p.add_argument("--prompt", help="the prompt of every image (scorers that read prompts need it)")
    p.add_argument("images", nargs="*", help="image files to score; prints one 'path<TAB>score' line each")
    p.add_argument("--pairs", metavar="SOURCE",
                   help="a Pick-a-Pic-schema source (hub dataset id, parquet folder or .parquet/.jsonl file): "
                        "score both images of each pair and report agreement with the labels")
    p.add_argument("--split", default="train", help="split of --pairs (default: train)")
    p.add_argument("--limit", type=int, help="score at most this many pairs of --pairs (default: all)")
    p.add_argument("--streaming", action="store_true", help="stream --pairs from the hub instead of downloading")
    return p


def parse_options(items: list[str]) -> dict:
    """``["model=ckpt", "batch_size=8"]`` -> ``{"model": "ckpt", "batch_size": 8}`` (values read as YAML)."""
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--option {item!r}: expected KEY=VALUE, e.g. batch_size=16")
        try:
            parsed = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            parsed = value
        # Keep text that YAML would turn into something else only by accident (e.g. "no", "1e-3").
        if isinstance(parsed, bool) and value.strip().lower() not in ("true", "false"):
            parsed = value
        options[key.strip()] = parsed
    return options


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if bool(args.images) == bool(args.pairs):
        raise InputError("give either image files to score or --pairs SOURCE (not both, not neither)")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit {args.limit}: expected a positive number of pairs")
    from scorers import load_scorer

    scorer = load_scorer(args.scorer, **parse_options(args.option))
    if args.pairs:
        summary = score_pairs(scorer, args.pairs, split=args.split, limit=args.limit, streaming=args.streaming)
        print(format_summary(summary))
    else:
        score_files(scorer, args.images, args.prompt)
    return 0


def score_files(scorer, paths: list[str], prompt: str | None) -> list[float]:
    """Print ``path<TAB>score`` for each image file (as soon as its chunk is scored); return the scores."""
    from PIL import Image
    from tqdm.auto import tqdm

    if scorer.needs_prompts and prompt is None:
        raise InputError(f"scorer {scorer.name} reads prompts: give --prompt TEXT")
    for path in paths:
        if not Path(path).is_file():
            raise InputError(f"image file {path} does not exist")
    scores: list[float] = []
    bar = tqdm(total=len(paths), unit="img", desc=f"scoring ({scorer.name})", disable=len(paths) <= _CHUNK,
               file=sys.stderr)
    for start in range(0, len(paths), _CHUNK):
        chunk = paths[start:start + _CHUNK]
        images = []
        for path in chunk:
            try:
                with Image.open(path) as image:
                    image.load()
                    images.append(image)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise InputError(f"image file {path} cannot be read as an image: {e}") from None
        values = scorer.score(images, prompt).tolist()
        for path, value in zip(chunk, values):
            print(f"{path}\t{value:.6f}", flush=True)
        scores += values
        bar.update(len(chunk))
    bar.close()
    return scores


def score_pairs(scorer, source: str, *, split: str = "train", limit: int | None = None,
                streaming: bool = False) -> dict:
    """Score both images of each pair with its caption; count how often the preferred one scores higher.

    Returns ``{"pairs", "ties", "decided", "agree", "accuracy", "score_ties"}``: ``ties`` are label ties
    (0.5/0.5), left out of ``decided``; ``agree`` counts pairs where the preferred image scores higher,
    plus half of the ``score_ties`` (equal scores); ``accuracy = agree / decided``.
    """
    from tqdm.auto import tqdm

    from diffusion_dpo.data import decode_image, open_pairs

    rows = open_pairs(source, split=split, streaming=streaming)
    total = limit if limit is not None else (len(rows) if hasattr(rows, "__len__") else None)
    counts = {"pairs": 0, "ties": 0, "decided": 0, "agree": 0.0, "score_ties": 0}
    bar = tqdm(total=total, unit="pair", desc=f"agreement ({scorer.name})", file=sys.stderr)
    chunk: list[dict] = []

    def flush() -> None:
        images, prompts, labels = [], [], []
        for index, row in chunk:
            where = f"{source} ({split}) row {index}"
            images += [decode_image(row["jpg_0"], f"{where} column jpg_0", convert_non_rgb=True),
                       decode_image(row["jpg_1"], f"{where} column jpg_1", convert_non_rgb=True)]
            prompts += [row["caption"], row["caption"]]
            labels.append((_label(row, "label_0", where), _label(row, "label_1", where)))
        scores = scorer.score(images, prompts).tolist()
        for i, (label_0, label_1) in enumerate(labels):
            counts["pairs"] += 1
            if label_0 == label_1:
                counts["ties"] += 1
                continue
            counts["decided"] += 1
            s_0, s_1 = scores[2 * i], scores[2 * i + 1]
            if s_0 == s_1:
                counts["score_ties"] += 1
                counts["agree"] += 0.5
            elif (s_0 > s_1) == (label_0 > label_1):
                counts["agree"] += 1
        bar.update(len(chunk))
        if counts["decided"]:
            bar.set_postfix(agreement=f"{100 * counts['agree'] / counts['decided']:.1f}%")
        chunk.clear()

    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            break
        chunk.append((index, row))
        if len(chunk) == _CHUNK // 2:
            flush()
    if chunk:
        flush()
    bar.close()
    if counts["pairs"] == 0:
        raise InputError(f"{source} ({split}) has no pairs to score")
    counts["accuracy"] = counts["agree"] / counts["decided"] if counts["decided"] else float("nan")
    return counts


def _label(row: dict, column: str, where: str) -> float:
    value = row[column]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where} column {column} is {value!r}; expected 1, 0 or 0.5")
    return float(value)


def format_summary(c: dict) -> str:
    if not c["decided"]:
        return f"pairs: {c['pairs']}, all label ties: no preference to agree with"
    return (f"pairs: {c['pairs']} ({c['decided']} with a preference, {c['ties']} label ties excluded)\n"
            f"agreement: {100 * c['accuracy']:.2f}% ({c['agree']:g} of {c['decided']}; "
            f"{c['score_ties']} equal scores counted half)")
