"""``diffusion-dpo label``: AI-feedback preference pairs in the Pick-a-Pic schema.

Generate mode (default): for each prompt, K candidates from a checkpoint, each with its own recorded seed;
every candidate scored by a registry scorer; pairs formed (best_worst, all or random) and those under
``min_margin`` dropped. A video family (Wan) at ``sampling.num_frames`` > 1 generates videos, each scored by
its frames' mean and stored as lossless animated WebP bytes in the image columns (``train`` reads them back as
video pairs; ``precompute`` caches their latents as it does images'). Relabel mode (``relabel.source`` set): the two images of each existing pair scored
and the labels replaced by the scorer's preference, the original labels kept beside them.

Output: ``output_dir/train-NNNNN.parquet`` shards (readable as ``data.source=output_dir``), written
atomically by whichever process owns them (shard i: process i % num_processes), ``manifest.json`` (the
configuration fingerprint and the finished shards), ``config.yaml`` and ``summary.json``. A rerun with the
same configuration (resume=auto, the default) writes only the missing shards; one with another configuration is
refused; resume=null refuses a folder holding a run and overwrite=true replaces it. ``run`` returns a
:class:`LabelResult`.

    diffusion-dpo label model.pretrained=tiny-sd prompts=prompts.txt scorer.name=jpeg_compressibility \\
        sampling.num_inference_steps=4 output_dir=runs/label
    accelerate launch -m diffusion_dpo label --config my_label.yaml     # one share of the shards per GPU
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import pyarrow as pa

from diffusion_dpo import config
from diffusion_dpo.config import ConfigError, at_least_one, non_negative, option, parse_args, to_dict
from diffusion_dpo.data.videos import pack_frames
from diffusion_dpo.engine.run_folder import claim_output_dir, releases_output_dir
from diffusion_dpo.errors import InputError
from diffusion_dpo.evaluation.video import is_video, video_scores
from diffusion_dpo.fileio import atomic_write_text, check_folder, make_folder, read_text
from diffusion_dpo.labeling.pairing import candidate_seed, columns, make_pairs, prompt_rng
from diffusion_dpo.labeling.records import GENERATE_SCHEMA, encode, summarise_generate, summarise_relabel
from diffusion_dpo.labeling.relabel import relabel_rows, shard_rows, source_size
from diffusion_dpo.labeling.scoring import ScorerConfig, load_scorer, scorer_identity
from diffusion_dpo.labeling.shards import ShardSet, owned_by
from diffusion_dpo.pipeline_config import PipelineSection, SamplingSection
from diffusion_dpo.run_options import GenerationRunOptions


@dataclass
class RelabelConfig:
    source: str | None = option(None, "relabel mode when set: a pairs dataset (a hub id "
                                "in the Pick-a-Pic schema, local parquet folder or file, or JSONL) whose "
                                "pairs are scored and relabeled; null: generate mode")
    split: str = option("train", "split of relabel.source to read")
    streaming: bool = option(False, "stream relabel.source instead of loading it (for hub datasets too "
                             "large to download)")
    max_pairs: int | None = option(None, "relabel only the first N pairs of the source; null: all",
                                   lambda v: v is None or v >= 1, "null or at least 1")
    pairs_per_shard: int = option(1000, "pairs per output shard in relabel mode", at_least_one, "at least 1")


@dataclass
class LabelConfig(GenerationRunOptions):
    output_dir: str = option("runs/label", "folder of the output shards, manifest.json and summary.json")
    model: PipelineSection = option(PipelineSection, "the checkpoint that generates candidates (generate mode)")
    prompts: str = option("hpsv2-offline", "prompt set name (hpsv2, hpsv2-offline, optionally :<style>; "
                          "hpdv2-train: HPDv2's train prompts less the hpsv2 benchmark's), a text file (one per "
                          "line), a JSON list or a TSV; with prompts_column, a dataset")
    prompts_dir: str | None = option(None, "local copy of a hub prompt set instead of the hub: for hpsv2 the "
                                     "benchmark <style>.json files, for hpdv2-train HPDv2's train.json and "
                                     "benchmark/")
    prompts_column: str | None = option(None, "read prompts from this column of the dataset named by "
                                        "prompts (hub id, parquet folder/file, JSONL); repeats kept once")
    max_prompts: int | None = option(None, "use only the first N prompts; null: all",
                                     lambda v: v is None or v >= 1, "null or at least 1")
    scorer: ScorerConfig = option(ScorerConfig, "the preference scorer")
    candidates_per_prompt: int = option(4, "K: images generated per prompt", lambda v: v >= 2, "at least 2")
    pairing: Literal["best_worst", "all", "random"] = option(
        "best_worst", "best_worst: best vs worst candidate (1 pair/prompt); all: every pair of candidates "
        "once (K(K-1)/2 per prompt); random: one random pair per prompt")
    min_margin: float = option(0.0, "drop a generated pair whose score margin is below this (score units); "
                               "in relabel mode, a margin below it is a tie (0.5/0.5)", non_negative, "0 or more")
    sampling: SamplingSection = option(SamplingSection, "sampler settings (generate mode)")
    batch_size: int = option(8, "images generated per forward pass (prompts are batched together)",
                             at_least_one, "at least 1")
    seed: int = option(0, "base seed; candidate k of prompt i uses pairing.candidate_seed(seed, i, k)")
    relabel: RelabelConfig = option(RelabelConfig, "relabel mode: score existing pairs instead of generating")
    image_format: Literal["png", "jpeg"] = option("png", "encoding of generated images (jpeg at quality 95)")
    prompts_per_shard: int = option(64, "prompts per output shard in generate mode (the unit of resumption)",
                                    at_least_one, "at least 1")


@dataclass
class LabelResult:
    """What ``run`` returns (and ``summary.json`` holds): counts over every shard of the run, whether this
    process wrote them or an earlier, interrupted run did. Keys of the other mode are null."""

    mode: Literal["generate", "relabel"]
    output_dir: str
    shards: int
    files: list[str]  # the shards, in order
    pairs_written: int
    mean_winner_score: Optional[float]  # over pairs with a winner (scorer units)
    mean_loser_score: Optional[float]
    this_run: dict[str, Any]  # what this invocation did: shards, images or pairs, seconds, rates
    # generate mode
    prompts: Optional[int] = None
    images_generated: Optional[int] = None
    pairs_dropped_for_margin: Optional[int] = None
    # relabel mode
    original_ties: Optional[int] = None
    scorer_ties: Optional[int] = None  # pairs whose score margin is below min_margin
    pairs_compared: Optional[int] = None  # neither label a tie
    pairs_agreeing: Optional[int] = None
    agreement: Optional[float] = None  # pairs_agreeing / pairs_compared


# ------------------------------------------------------------------------------------------------ pieces

def load_prompt_list(cfg: LabelConfig) -> tuple[list[str], list[str]]:
    """(texts, styles) of the prompts to label, in order; the position in the list is the prompt index."""
    if cfg.prompts_column:
        texts = _dataset_column(cfg.prompts, cfg.prompts_column, cfg.max_prompts)
        styles = [cfg.prompts_column] * len(texts)
    else:
        from diffusion_dpo.evaluation.prompts import load_prompts

        loaded = load_prompts(cfg.prompts, prompts_dir=cfg.prompts_dir)[:cfg.max_prompts]
        texts, styles = [p.text for p in loaded], [p.style for p in loaded]
    if not texts:
        raise InputError(f"prompts {cfg.prompts!r} hold no prompt")
    return texts, styles


def _dataset_column(source: str, column: str, limit: int | None) -> list[str]:
    """The distinct non-empty strings of ``column`` of a dataset, in order of first appearance."""
    import datasets

    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.parquet"))
        ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True) if files else None
    elif path.is_file():
        builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}.get(path.suffix)
        if builder is None:
            raise InputError(f"prompts {source}: expected a parquet, JSONL or CSV file with prompts_column")
        if builder != "parquet":  # datasets would fail on a byte that is not UTF-8 without naming the line
            read_text(path, "prompts file")
        ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)
    else:
        try:
            ds = datasets.load_dataset(source, split="train", streaming=True)
        except Exception as e:  # no such dataset, offline, auth: the user needs the same advice
            raise InputError(f"prompts {source!r}: cannot open it as a dataset (local path or hub id): {e}") from None
    if ds is None:
        raise InputError(f"prompts {source}: the folder holds no *.parquet files")
    first = next(iter(ds), None)
    if first is None or column not in first:
        raise InputError(f"prompts {source}: no column {column!r}; columns: {', '.join(first or []) or '(none)'}")
    seen: dict[str, None] = {}
    for row in ds.select_columns([column]):
        text = row[column]
        if isinstance(text, str) and text.strip():
            seen.setdefault(text.strip(), None)
            if limit is not None and len(seen) >= limit:
                break
    return list(seen)


def model_id(cfg: LabelConfig) -> str:
    """The model column: the base checkpoint, plus the tuned weights on top of it."""
    parts = [cfg.model.pretrained]
    if cfg.model.denoiser:
        parts.append(f"denoiser={cfg.model.denoiser}")
    if cfg.model.lora:
        parts.append(f"lora={cfg.model.lora}")
    return " + ".join(parts)


# ----------------------------------------------------------------------------------------- generate mode

class _PromptRate:
    """A tqdm bar counting images (its rate is images/s) that also shows prompts/s after every batch."""

    def __init__(self, bar, candidates_per_prompt: int):
        self.bar, self.k, self.images, self.start = bar, candidates_per_prompt, 0, time.perf_counter()

    def update(self, n: int) -> None:
        self.images += n
        rate = self.images / self.k / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(prompts_per_s=f"{rate:.3g}", refresh=False)
        self.bar.update(n)


def generate_shard(pipe, scorer, cfg: LabelConfig, texts: list[str], styles: list[str],
                   prompt_indices: list[int], progress=None) -> tuple[pa.Table, dict]:
    """Generate, score and pair the prompts ``prompt_indices``; return the shard's rows and its stats.

    All K candidates of all the shard's prompts go through ``generate`` together, so batches span prompts.
    """
    from diffusion_dpo.sampling import generate

    k = cfg.candidates_per_prompt
    flat_prompts = [texts[p] for p in prompt_indices for _ in range(k)]
    flat_seeds = [candidate_seed(cfg.seed, p, c) for p in prompt_indices for c in range(k)]
    s = cfg.sampling
    images = generate(pipe, flat_prompts, flat_seeds, num_inference_steps=s.num_inference_steps,
                      guidance_scale=s.guidance_scale, height=s.height, width=s.width,
                      batch_size=cfg.batch_size, progress=progress, num_frames=s.num_frames)
    # a video's score is its frames' mean (evaluation.video); an image's the scorer's own
    scores = [float(x) for x in video_scores(scorer, images, flat_prompts).tolist()]

    rows: list[dict[str, Any]] = []
    stats = {"prompts": len(prompt_indices), "images": len(images), "pairs": 0, "dropped": 0,
             "winner_score_sum": 0.0, "loser_score_sum": 0.0}
    model = model_id(cfg)
    for j, p in enumerate(prompt_indices):
        cand = slice(j * k, (j + 1) * k)
        cand_scores, cand_images, cand_seeds = scores[cand], images[cand], flat_seeds[cand]
        rng = prompt_rng(cfg.seed, p)
        pairs, dropped = make_pairs(cand_scores, cfg.pairing, cfg.min_margin, rng)
        stats["dropped"] += dropped
        encoded: dict[int, bytes] = {}
        for pair in pairs:
            # The winner's column is a coin flip from the prompt's rng, as in Pick-a-Pic, so no consumer
            # can learn anything from the column position; label_0/label_1 say which image won.
            c0, c1, label_0, label_1 = columns(pair, winner_first=rng.random() < 0.5)
            for c in (c0, c1):
                if c not in encoded:  # a video: its frames as lossless animated WebP bytes (data.videos)
                    encoded[c] = (pack_frames(cand_images[c]) if is_video(cand_images[c])
                                  else encode(cand_images[c], cfg.image_format))
            width, height = (cand_images[c0][0] if is_video(cand_images[c0]) else cand_images[c0]).size
            rows.append({
                "caption": texts[p], "jpg_0": encoded[c0], "jpg_1": encoded[c1],
                "label_0": label_0, "label_1": label_1,
                "score_0": cand_scores[c0], "score_1": cand_scores[c1], "scorer": cfg.scorer.name,
                "model_0": model, "model_1": model, "seed_0": cand_seeds[c0], "seed_1": cand_seeds[c1],
                "prompt_index": p, "style": styles[p], "sampler": type(pipe.scheduler).__name__,
                "num_inference_steps": s.num_inference_steps, "guidance_scale": s.guidance_scale,
                "height": height, "width": width,
            })
            stats["pairs"] += 1
            stats["winner_score_sum"] += cand_scores[pair.winner]
            stats["loser_score_sum"] += cand_scores[pair.loser]
    return pa.Table.from_pylist(rows, schema=GENERATE_SCHEMA), stats


def _run_generate(cfg: LabelConfig, state, on_shard, desc: str) -> LabelResult:
    from tqdm.auto import tqdm

    from diffusion_dpo.sampling import load_pipeline, pipeline_family, precision_dtype

    texts, styles = load_prompt_list(cfg)
    dtype = precision_dtype(cfg.mixed_precision, state.device)
    s = cfg.sampling
    identity = {
        "mode": "generate", "model": to_dict(cfg.model),
        "prompts": {"count": len(texts),
                    "sha256": hashlib.sha256(json.dumps([texts, styles]).encode()).hexdigest()},
        "scorer": scorer_identity(cfg.scorer), "candidates_per_prompt": cfg.candidates_per_prompt,
        "pairing": cfg.pairing, "min_margin": cfg.min_margin, "seed": cfg.seed,
        "sampling": {"num_inference_steps": s.num_inference_steps, "guidance_scale": s.guidance_scale,
                     "height": s.height, "width": s.width, "scheduler": s.scheduler, "dtype": str(dtype),
                     # images: the fingerprint of the runs from before sampling.num_frames
                     **({"num_frames": s.num_frames} if s.num_frames > 1 else {})},
        "image_format": cfg.image_format, "prompts_per_shard": cfg.prompts_per_shard,
    }
    shards = ShardSet(cfg.output_dir, identity)
    _claim_output_dir(cfg, shards, state)
    shards.check()
    per = cfg.prompts_per_shard
    num_shards = -(-len(texts) // per)
    todo = shards.missing(owned_by(range(num_shards), state.process_index, state.num_processes))

    pipe = scorer = None
    if todo:  # everything that can fail on bad input is loaded before anything is written
        scorer = load_scorer(cfg.scorer, state.device)
        pipe = load_pipeline(cfg.model.pretrained, denoiser=cfg.model.denoiser, lora=cfg.model.lora,
                             device=state.device, dtype=dtype, scheduler=s.scheduler)
        if s.num_frames > 1:  # a video family, and t k + 1 frames for its VAE, before anything is written
            pipeline_family(pipe).latent_shape(pipe.vae.config, 8, s.num_frames)
    _prepare_output(cfg, shards, state, num_shards)

    start = time.perf_counter()
    n_images = cfg.candidates_per_prompt * sum(min(per, len(texts) - t * per) for t in todo)
    bar = tqdm(total=n_images, unit="img", desc=_bar_desc(desc, state),
               disable=not state.is_local_main_process)
    progress = _PromptRate(bar, cfg.candidates_per_prompt)
    prompts_done = 0
    for index in todo:
        indices = list(range(index * per, min((index + 1) * per, len(texts))))
        table, stats = generate_shard(pipe, scorer, cfg, texts, styles, indices, progress=progress)
        # Provenance: which prompts, and which process made them (a multi-process run can be audited).
        stats.update(first_prompt=indices[0], process_index=state.process_index)
        shards.write(index, table, stats)
        prompts_done += len(indices)
        if on_shard is not None:
            on_shard(index)
    bar.close()
    this_run = {"shards": len(todo), "images": prompts_done * cfg.candidates_per_prompt,
                "seconds": time.perf_counter() - start}
    return _finish(cfg, shards, state, num_shards, "generate", this_run)


# ------------------------------------------------------------------------------------------ relabel mode

def _run_relabel(cfg: LabelConfig, state, on_shard, desc: str) -> LabelResult:
    from tqdm.auto import tqdm

    from diffusion_dpo.data import open_pairs

    r = cfg.relabel
    ds = open_pairs(r.source, split=r.split, streaming=r.streaming)
    identity = {"mode": "relabel", "source": r.source, "split": r.split, "max_pairs": r.max_pairs,
                "scorer": scorer_identity(cfg.scorer), "min_margin": cfg.min_margin, "image_format": cfg.image_format,
                "pairs_per_shard": r.pairs_per_shard}
    shards = ShardSet(cfg.output_dir, identity)
    _claim_output_dir(cfg, shards, state)
    shards.check()
    size = source_size(ds, r.max_pairs)
    if size == 0:
        raise InputError(f"relabel.source {r.source} (split {r.split}) holds no pairs")
    num_shards = None if size is None else -(-size // r.pairs_per_shard)
    manifest = shards.read_manifest()
    if num_shards is None and manifest and manifest.get("fingerprint") == shards.fingerprint:
        num_shards = manifest.get("num_shards")  # a finished streamed run knows its shard count
    done = shards.completed()
    mine = lambda i: i % state.num_processes == state.process_index and i not in done  # noqa: E731
    finished = num_shards is not None and all(i in done for i in range(num_shards))

    scorer = None if finished else load_scorer(cfg.scorer, state.device)
    _prepare_output(cfg, shards, state, num_shards)

    start = time.perf_counter()
    bar = tqdm(total=size, unit="pair", desc=_bar_desc(desc, state),
               disable=not state.is_local_main_process)
    written, pairs, seen = 0, 0, {"rows": 0}
    if not finished:
        for index, rows in shard_rows(ds, r.pairs_per_shard, r.max_pairs, mine, seen):
            table, stats = relabel_rows(scorer, rows, r.source, scorer_name=cfg.scorer.name,
                                        min_margin=cfg.min_margin, image_format=cfg.image_format)
            stats.update(first_row=rows[0][0], process_index=state.process_index)
            shards.write(index, table, stats)
            written += 1
            pairs += len(rows)
            bar.update(len(rows))
            if on_shard is not None:
                on_shard(index)
    bar.close()
    if num_shards is None:  # streamed: every process read the whole stream, so each knows its length
        if seen["rows"] == 0:
            raise InputError(f"relabel.source {r.source} (split {r.split}) holds no pairs")
        num_shards = -(-seen["rows"] // r.pairs_per_shard)
    this_run = {"shards": written, "pairs": pairs, "seconds": time.perf_counter() - start}
    return _finish(cfg, shards, state, num_shards, "relabel", this_run)


# ------------------------------------------------------------------------------------------ shared steps

def _claim_output_dir(cfg: LabelConfig, shards: ShardSet, state) -> None:
    """The one folder rule (engine.run_folder), before the shards are checked: overwrite=true removes the
    run there (its shards, manifest and summary) whatever ``resume`` says."""
    if state.is_main_process:
        out = check_folder(cfg.output_dir)  # a path that cannot be a folder is said before it is looked into
        claim_output_dir(out, owner="label", resume=None if cfg.overwrite else cfg.resume,
                         overwrite=cfg.overwrite, run_files=("manifest.json", "summary.json",
                                                             f"{shards.prefix}-*.parquet*"),
                         marks=("manifest.json",))
    state.wait_for_everyone()


def _bar_desc(desc: str, state) -> str:
    return f"{desc} [process {state.process_index}]" if state.num_processes > 1 else desc


def _prepare_output(cfg: LabelConfig, shards: ShardSet, state, num_shards: int | None) -> None:
    """Main process: clear stale temporaries, write config.yaml and the manifest; then all processes go."""
    if state.is_main_process:
        make_folder(cfg.output_dir)
        shards.clean_tmp()
        config.save_config(cfg, Path(cfg.output_dir) / "config.yaml")
        shards.write_manifest(num_shards)
    state.wait_for_everyone()


def _finish(cfg, shards: ShardSet, state, num_shards: int, mode: str, this_run: dict) -> LabelResult:
    """After every process is done: summary from the shards' own stats (so an interrupted-and-resumed run
    summarises exactly like an uninterrupted one), written by the main process."""
    from accelerate.utils import gather_object

    runs = gather_object([this_run])
    state.wait_for_everyone()
    done = shards.completed()
    missing = [i for i in range(num_shards) if i not in done]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} of {cfg.output_dir} are missing after every process finished")
    seconds = max(run["seconds"] for run in runs)
    this = {key: sum(run[key] for run in runs) for key in runs[0] if key != "seconds"}
    this["seconds"] = seconds
    rate = lambda n: n / seconds if seconds > 0 and n else None  # noqa: E731
    if "images" in this:
        this["images_per_s"] = rate(this["images"])
        this["prompts_per_s"] = rate(this["images"] / cfg.candidates_per_prompt)
    if "pairs" in this:
        this["pairs_per_s"] = rate(this["pairs"])
    summarise = summarise_generate if mode == "generate" else summarise_relabel
    result = LabelResult(mode=mode, output_dir=str(cfg.output_dir), shards=num_shards,
                         files=[str(shards.path(i)) for i in range(num_shards)], this_run=this, **summarise(done))
    if state.is_main_process:
        shards.write_manifest(num_shards)
        path = Path(cfg.output_dir) / "summary.json"
        atomic_write_text(path, json.dumps(dataclasses.asdict(result), indent=2) + "\n")
    state.wait_for_everyone()
    return result


@releases_output_dir
def run(cfg: LabelConfig, on_shard: Callable[[int], None] | None = None, *, desc: str = "label") -> LabelResult:
    """Label (or relabel) into ``cfg.output_dir``; return the result (also written to summary.json).

    ``on_shard(index)`` is called after each shard this process wrote (progress hooks, tests); ``desc`` names
    the progress bar.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    config.validate(cfg)
    if cfg.sampling.num_frames != 1 and cfg.relabel.source:
        raise ConfigError(f"config key 'sampling.num_frames': relabel mode scores the pairs it reads and "
                          f"generates nothing; expected 1, got {cfg.sampling.num_frames}")
    # cpu=True lets processes started by torchrun on a machine without a GPU form a gloo group.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    if cfg.relabel.source:
        return _run_relabel(cfg, state, on_shard, desc)
    return _run_generate(cfg, state, on_shard, desc)


def main(argv: list[str]) -> int:
    cfg = parse_args(LabelConfig, argv, prog="diffusion-dpo label", description=__doc__.split("\n\n")[0])
    from accelerate import PartialState

    result = run(cfg)
    if PartialState().is_main_process:
        print(describe(result))
    return 0


def describe(result: LabelResult) -> str:
    """The result in sentences, for the console."""
    def score(x: float | None) -> str:
        return "-" if x is None else f"{x:.4g}"

    if result.mode == "generate":
        text = (f"{result.pairs_written} pairs from {result.prompts} prompts ({result.images_generated} images; "
                f"{result.pairs_dropped_for_margin} pairs dropped under min_margin)")
    else:
        agreement = "-" if result.agreement is None else f"{100 * result.agreement:.1f}%"
        text = (f"{result.pairs_written} pairs relabelled; the scorer agrees with the original labels on "
                f"{agreement} of the {result.pairs_compared} pairs neither calls a tie")
    return (f"{text}; mean winner score {score(result.mean_winner_score)}, mean loser score "
            f"{score(result.mean_loser_score)}.\nThe {result.shards} shards are in {result.output_dir}/ (read "
            f"them with data.source={result.output_dir}); this run took {result.this_run['seconds']:.1f} s.")
