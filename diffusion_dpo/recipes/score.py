"""``diffusion-dpo score``: score image files, or measure how often a scorer agrees with preference labels.

    diffusion-dpo score scorer.name=pickscore prompt="a red dog" a.png b.png    # prints path<TAB>score
    diffusion-dpo score scorer.name=hpsv2.1 data.source=runs/sd15-pickscore-pairs     # agreement with labels
    diffusion-dpo score --config my_score.yaml scorer.options.batch_size=16 images/*.png

Image paths are given as ``images=[a.png, b.png]`` or as plain arguments (appended to ``images``). With
``data.source`` it scores both images of every pair of a preference source (hub id, parquet folder or
JSONL, mapped with ``data.columns`` like train's) with the pair's caption and reports the preference
accuracy: the share of pairs with a human preference on which the scorer ranks the preferred image higher
(label ties excluded and counted; equal scores count half). PickScore's published figure on Pick-a-Pic v2
validation is 64.2%.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from diffusion_dpo.config import option, parse_args
from diffusion_dpo.data.columns import ColumnMap, check_column_map
from diffusion_dpo.data.images import ImageFetcher
from diffusion_dpo.data.rows import DataConfig
from diffusion_dpo.errors import InputError
from diffusion_dpo.fileio import atomic_write_text, check_folder, make_folder, not_a_file
from diffusion_dpo.labeling.relabel import score_pairs as score_pair_images
from diffusion_dpo.labeling.scoring import ScorerConfig, load_scorer

_CHUNK = 64  # images (or pairs) read into memory at a time


@dataclass
class PairsConfig(DataConfig):
    """The ``data:`` section: a preference source to measure agreement on. It is train's data section (so
    the files of ``assets/configs/data/`` that map a public set work here too), with no source by default;
    what shapes training images (resolution, crops, flips, caption dropout, workers, shuffling, ties kept)
    has no effect on scoring, and the URL-fetching keys (image_cache_dir, fetch_*) apply to URL columns."""

    source: Optional[str] = option(None, "preference pairs to score (hub dataset id, parquet folder or file, "
                                   "or JSONL); null: score the image files in images")
    max_pairs: Optional[int] = option(None, "score only the first N pairs of data.source; null: all",
                                      lambda v: v is None or v >= 1, "null or a positive number of pairs")


@dataclass
class ScoreConfig:
    scorer: ScorerConfig = option(ScorerConfig, "the preference scorer and its options")
    device: Optional[str] = option(None, "device to score on when scorer.options names none (cpu, cuda, "
                                   "cuda:1); null: the scorer's default (cuda when available, else cpu)")
    images: list[str] = option([], "image files to score (plain arguments are appended); prints one "
                               "'path<TAB>score' line each")
    prompt: Optional[str] = option(None, "the prompt of every image (scorers that read prompts need one)")
    prompts: list[str] = option([], "one prompt per image, in the order of images (instead of prompt)")
    data: PairsConfig = option(PairsConfig, "score a pairs dataset and report agreement with its labels")
    output: Optional[str] = option(None, "also write the result here: the path<TAB>score lines, or the "
                                   "agreement counts as JSON with data.source; null: print only")

    def check(self) -> None:
        if self.prompts and (self.prompt is not None or len(self.prompts) != len(self.images)):
            raise InputError(f"config key 'prompts': expected one prompt per image ({len(self.images)}) and "
                             f"no prompt, got {len(self.prompts)} prompts and prompt={self.prompt!r}")
        check_column_map(self.data.columns)


def run(cfg: ScoreConfig) -> dict:
    """Score ``cfg.images`` (printing ``path<TAB>score`` lines) or the pairs of ``cfg.data.source`` (printing
    the agreement); return ``{"scores": [...]}`` or the counts of :func:`score_pairs`."""
    # Checked here, not in check(): a config naming neither is complete as a file (a YAML of scorer
    # settings to which the images are added on the command line).
    if bool(cfg.images) == bool(cfg.data.source):
        raise InputError("give either image files to score (images=[...] or plain paths) or "
                         "data.source=SOURCE (not both, not neither)")
    if cfg.output and Path(cfg.output).is_dir():
        raise InputError(f"config key 'output': {cfg.output} is a folder; expected a file to write")
    if cfg.output:  # a path that cannot be written fails before the scoring, not after
        check_folder(Path(cfg.output).parent, "the folder of config key 'output'")
    scorer = load_scorer(cfg.scorer, cfg.device)
    if cfg.data.source:
        data = cfg.data
        limits = [n for n in (data.max_pairs, data.max_rows) if n is not None]
        fetcher = ImageFetcher(data.image_cache_dir, data.fetch_retries, data.fetch_timeout, data.fetch_backoff)
        result = score_pairs(scorer, data.source, split=data.split, limit=min(limits) if limits else None,
                             streaming=data.streaming, columns=data.columns, fetcher=fetcher)
        print(format_summary(result))
        text = json.dumps(result, indent=2) + "\n"
    else:
        result = {"scores": score_files(scorer, cfg.images, cfg.prompts or cfg.prompt)}
        text = "".join(f"{path}\t{value:.6f}\n" for path, value in zip(cfg.images, result["scores"]))
    if cfg.output:
        make_folder(Path(cfg.output).parent, "the folder of config key 'output'")
        atomic_write_text(cfg.output, text)
    return result


def score_files(scorer, paths: list[str], prompts: str | list[str] | None) -> list[float]:
    """Print ``path<TAB>score`` for each image file (as soon as its chunk is scored); return the scores.

    ``prompts``: one string for every image, one per path, or None for scorers that read no prompt.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    if scorer.needs_prompts and not prompts:
        raise InputError(f"scorer {scorer.name} reads prompts: give prompt=TEXT (or prompts=[...])")
    for path in paths:
        if not Path(path).is_file():
            raise InputError(f"image file {path} {not_a_file(path)}")
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
        chunk_prompts = prompts[start:start + _CHUNK] if isinstance(prompts, list) else prompts
        values = scorer.score(images, chunk_prompts).tolist()
        for path, value in zip(chunk, values):
            print(f"{path}\t{value:.6f}", flush=True)
        scores += values
        bar.update(len(chunk))
    bar.close()
    return scores


def score_pairs(scorer, source: str, *, split: str = "train", limit: int | None = None,
                streaming: bool = False, columns: ColumnMap | None = None,
                fetcher: ImageFetcher | None = None) -> dict:
    """Score both images of each pair with its caption; count how often the preferred one scores higher.

    Returns ``{"pairs", "ties", "decided", "agree", "accuracy", "score_ties"}``: ``ties`` are label ties
    (0.5/0.5), left out of ``decided``; ``agree`` counts pairs where the preferred image scores higher,
    plus half of the ``score_ties`` (equal scores); ``accuracy = agree / decided``.
    """
    from tqdm.auto import tqdm

    from diffusion_dpo.data import open_pairs

    rows = open_pairs(source, split=split, streaming=streaming, columns=columns)
    total = limit if limit is not None else (len(rows) if hasattr(rows, "__len__") else None)
    counts = {"pairs": 0, "ties": 0, "decided": 0, "agree": 0.0, "score_ties": 0}
    bar = tqdm(total=total, unit="pair", desc=f"agreement ({scorer.name})", file=sys.stderr)
    chunk: list[tuple[int, dict]] = []
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            break
        chunk.append((index, row))
        if len(chunk) == _CHUNK // 2:
            _count_chunk(scorer, chunk, f"{source} ({split})", counts, bar, fetcher)
    if chunk:
        _count_chunk(scorer, chunk, f"{source} ({split})", counts, bar, fetcher)
    bar.close()
    if counts["pairs"] == 0:
        raise InputError(f"{source} ({split}) has no pairs to score")
    counts["accuracy"] = counts["agree"] / counts["decided"] if counts["decided"] else float("nan")
    return counts


def _count_chunk(scorer, chunk: list[tuple[int, dict]], where: str, counts: dict, bar,
                 fetcher: ImageFetcher | None = None) -> None:
    """Score the pairs of ``chunk``, add them to ``counts`` and empty ``chunk``."""
    labels = [(_label(row, "label_0", f"row {i} of {where}"), _label(row, "label_1", f"row {i} of {where}"))
              for i, row in chunk]
    scores = score_pair_images(scorer, chunk, where, fetcher=fetcher)
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


def main(argv: list[str]) -> int:
    cfg = parse_args(ScoreConfig, argv, prog="diffusion-dpo score", description=__doc__.split("\n\n")[0],
                     positional="images")
    run(cfg)
    return 0
