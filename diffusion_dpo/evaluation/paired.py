"""A tuned denoiser against its base on a prompt set, paired by (prompt, seed): generate both, score every
image with every scorer, and report means per style, paired win rates with bootstrap intervals, grids and the
benchmarks' own tables. What ``diffusion-dpo evaluate`` runs, and what ``grpo`` and the demos call for their
held-out evaluations (see recipes/evaluate.py for the outputs).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from diffusion_dpo import config
from diffusion_dpo.config import at_least_one, non_negative, option, to_dict
from diffusion_dpo.engine.run_folder import claim_output_dir, releases_output_dir
from diffusion_dpo.errors import InputError
from diffusion_dpo.evaluation.prompts import Prompt, load_prompts, overlap_warning, styles_of, take_per_style
from diffusion_dpo.evaluation.reports import MODELS
from diffusion_dpo.evaluation.schema import ImplicitRewardAccuracy, ScorerComparison, ScoreRow
from diffusion_dpo.evaluation.video import (
    CONSISTENCY,
    frame_consistency,
    frames_of,
    per_sample,
    read_video,
    save_video,
    video_scores,
)
from diffusion_dpo.fileio import atomic_write, atomic_write_text, check_folder, make_folder
from diffusion_dpo.labeling.scoring import shown
from diffusion_dpo.pipeline_config import PipelineSection, SamplingSection
from diffusion_dpo.run_options import GenerationRunOptions

# Items (prompt, seed) held in memory per model between generating and scoring.
CHUNK_ITEMS = 64
# The j-th image of the prompt at position i of its style uses seed + SEED_STRIDE * j + i: stable when
# prompts are subsampled or seeds are added.
SEED_STRIDE = 100_000


@dataclass
class TunedConfig:
    pretrained: str | None = option(None, "a second checkpoint (hub id or folder) as the tuned model, instead of "
                                          "model.denoiser / model.lora")


@dataclass
class ImplicitRewardConfig:
    source: str | None = option(None, "held-out preference pairs (hub id, parquet folder or JSONL) for the "
                                      "implicit-reward accuracy; null skips it")
    split: str = option("validation", "split of the pairs source (a subfolder of a parquet folder, if present)")
    max_pairs: int = option(500, "at most this many pairs (the first ones); 0 = all", non_negative, "0 or more")
    beta_dpo: float = option(5000.0, "beta of the DPO implicit reward 0.5 * beta * (ref_mse - model_mse)")
    noise_draws: int = option(4, "noise/timestep draws per pair; the errors are averaged over them", at_least_one,
                              "at least 1")
    resolution: int | None = option(None, "images are resized and center-cropped to this many px "
                                          "(null: sampling.height or the checkpoint's default)")
    batch_size: int = option(8, "pairs per forward pass", at_least_one, "at least 1")
    convert_non_rgb: bool = option(True, "convert grayscale/palette/RGBA pair images to RGB instead of failing")
    seed: int = option(0, "seed of the noise and timesteps (the same for both UNets)")


@dataclass
class EvaluateConfig(GenerationRunOptions):
    output_dir: str = option("runs/evaluate", "where images, scores and the report go")
    model: PipelineSection = option(PipelineSection, "the base checkpoint and, by default, the tuned weights on top of it")
    tuned: TunedConfig = option(TunedConfig, "a second checkpoint as the tuned model")
    prompts: str = option("hpsv2", "prompt set: hpsv2[:style] (hub, or prompts_dir), hpsv2-offline[:style] "
                                   "(built in), a folder of <style>.json, or a .txt/.json/.tsv file[:style]")
    prompts_dir: str | None = option(None, "local folder with the official HPSv2 benchmark <style>.json files")
    max_prompts_per_style: int = option(0, "use only the first N prompts of each style; 0 = all", non_negative,
                                        "0 or more")
    seeds: int = option(1, "images per prompt and model", at_least_one, "at least 1")
    seed: int = option(0, "first seed; image j of the prompt at position i of its style uses "
                          "seed + 100000 * j + i, for both models")
    scorers: str | list[str] = option("pickscore", "scorer names, comma-separated (scorers=pickscore,hpsv2) "
                                                   "or a YAML list")
    scorer_options: dict[str, dict] = option({}, "options per scorer, e.g. {pickscore: {batch_size: 16}}")
    sampling: SamplingSection = option(SamplingSection, "sampler settings, identical for both models")
    batch_size: int = option(8, "images per generation batch", at_least_one, "at least 1")
    device: str | None = option(None, "device for models and scorers (null: this process's accelerator device)")
    n_boot: int = option(2000, "bootstrap resamples for the 95% intervals", at_least_one, "at least 1")
    grid_prompts: int = option(8, "prompts per style shown in the grid images (first seed)", non_negative,
                               "0 or more")
    grid_cell: int = option(192, "width in px of each image in the grids", lambda v: v >= 8, "at least 8 px")
    implicit_reward: ImplicitRewardConfig = option(ImplicitRewardConfig, "implicit-reward accuracy on held-out pairs")
    training_pairs: str | None = option(None, "the pairs the tuned model was trained on (its train config's "
                                        "data.source: a parquet folder or file, JSONL or hub id); a warning "
                                        "says how many evaluation prompts are among their captions")


# What an evaluation writes into output_dir besides config.yaml (overwrite=true removes them; the per-process
# parts of an interrupted run are found by name).
RUN_FILES = ("generation.json", "images", "scores.jsonl", "report.json", "report.md", "grids", "means.png",
             "implicit_reward.jsonl")


@dataclass
class EvaluateResult:
    """What ``run`` returns. On processes other than the main one only ``output_dir`` is set."""

    output_dir: str
    scorers: dict[str, ScorerComparison] = field(default_factory=dict)  # overall and per-style numbers
    rows: list[ScoreRow] = field(default_factory=list)  # per image and scorer, as in scores.jsonl
    implicit_reward: Optional[ImplicitRewardAccuracy] = None
    benchmarks: dict = field(default_factory=dict)  # scorer -> benchmark table (evaluation.benchmarks)
    n_prompts: int = 0
    n_seeds: int = 0
    n_images: int = 0  # both models together
    report_json: Optional[str] = None
    report_md: Optional[str] = None
    scores: Optional[str] = None  # scores.jsonl
    grids: dict[str, str] = field(default_factory=dict)  # style -> grid image
    chart: Optional[str] = None  # means.png


@dataclass(frozen=True)
class Item:
    prompt: Prompt
    seed: int

    def path(self, root: Path, model: str) -> Path:
        return root / "images" / model / safe_name(self.prompt.style) / f"{self.prompt.index}-{self.seed}.png"


def safe_name(style: str) -> str:
    """A style as a folder/file name (TSV categories may hold spaces or slashes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", style).strip("_") or "style"


def scorer_names(value: str | list[str]) -> list[str]:
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]
    names = [n for n in names if n]
    if not names:
        raise InputError("config key 'scorers': no scorer named (e.g. scorers=pickscore,hpsv2)")
    return list(dict.fromkeys(names))


def make_items(prompts: list[Prompt], n_seeds: int, seed: int) -> list[Item]:
    return [Item(p, seed + SEED_STRIDE * j + p.index) for p in prompts for j in range(n_seeds)]


def tuned_description(cfg: EvaluateConfig) -> str:
    given = {k: v for k, v in (("model.denoiser", cfg.model.denoiser), ("model.lora", cfg.model.lora),
                               ("tuned.pretrained", cfg.tuned.pretrained)) if v}
    if len(given) != 1:
        raise InputError(
            "set exactly one of model.denoiser, model.lora (tuned weights on the base) or tuned.pretrained "
            f"(a second checkpoint); got {', '.join(f'{k}={v}' for k, v in given.items()) or 'none'}"
        )
    (key, value), = given.items()
    return f"{cfg.model.pretrained} + {key}={value}" if key.startswith("model.") else value


def _load_scorers(cfg: EvaluateConfig, device) -> dict:
    from scorers import load_scorer

    unknown = sorted(set(cfg.scorer_options) - set(scorer_names(cfg.scorers)))
    if unknown:
        raise InputError(f"config key 'scorer_options.{unknown[0]}': {unknown[0]!r} is not among scorers "
                         f"({', '.join(scorer_names(cfg.scorers))})")
    loaded = {}
    for name in scorer_names(cfg.scorers):
        options = dict(cfg.scorer_options.get(name) or {})
        options.setdefault("device", str(device))
        try:
            loaded[name] = load_scorer(name, **options)
        except InputError:
            raise
        except Exception as e:  # missing weights, no network, a wrong option: the user's to fix
            raise InputError(f"scorer {name!r} cannot load with options {shown(options)}: {type(e).__name__}: "
                             f"{e}") from None
    return loaded


def _check_resume(out: Path, fingerprint: dict) -> None:
    """Images already in ``out`` must come from the same models, prompts and sampler, or they would be
    silently mixed with new ones."""
    path = out / "generation.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    changed = [k for k in fingerprint if old.get(k) != fingerprint[k]]
    if changed:
        k = changed[0]
        raise InputError(f"{out} holds images made with other settings ({k}: {old.get(k)!r} then, "
                         f"{fingerprint[k]!r} now); use a new output_dir or delete {out / 'images'}")


def _save_png(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Neither a killed run nor a power cut leaves a half-written image that a rerun would trust.
    atomic_write(path, functools.partial(image.save, format="PNG"))


def _read_png(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _images_for(pipe, items: list[Item], out: Path, model: str, cfg: EvaluateConfig, progress) -> list:
    """The images of ``items`` for ``model``: read from disk when there, generated and saved otherwise.

    A batch (``cfg.batch_size`` items) with any image missing is generated whole, as an uninterrupted run
    generates it: batched kernels round differently for another batch, so a resumed run's images (and scores,
    report) equal an uninterrupted run's bit for bit.
    """
    from diffusion_dpo.sampling import batched, generate

    s = cfg.sampling
    video = s.num_frames > 1  # each sample a list of frames (evaluation.video)
    images: list = []
    for batch in batched(items, cfg.batch_size):
        paths = [item.path(out, model) for item in batch]
        if all(path.exists() and (not video or path.with_suffix(".webp").exists()) for path in paths):
            images += [read_video(path) if video else _read_png(path) for path in paths]
            progress.update(len(batch))
            continue
        new = generate(pipe, [item.prompt.text for item in batch], [item.seed for item in batch],
                       num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                       height=s.height, width=s.width, batch_size=cfg.batch_size, progress=progress,
                       num_frames=s.num_frames)
        for image, path in zip(new, paths):
            if video and not (path.exists() and path.with_suffix(".webp").exists()):
                save_video(image, path)
            elif not video and not path.exists():
                _save_png(image, path)
        images += new
    return images


@releases_output_dir
def run(cfg: EvaluateConfig, *, desc: str = "evaluate") -> EvaluateResult:
    """Generate, score and report into ``cfg.output_dir``; ``desc`` names the progress bar."""
    import torch
    from accelerate import PartialState

    from diffusion_dpo.sampling import load_pipeline, precision_dtype

    # Everything that can be wrong with the input is found before the first image: the config, the output
    # folder (its one rule), the prompt set, the scorers, both models.
    config.validate(cfg)
    tuned_name = tuned_description(cfg)
    prompts = take_per_style(load_prompts(cfg.prompts, prompts_dir=cfg.prompts_dir), cfg.max_prompts_per_style)
    items = make_items(prompts, cfg.seeds, cfg.seed)
    # Without cpu=True, accelerate ignores a multi-process launch on a machine without GPUs.
    state = PartialState(cpu=not torch.cuda.is_available() or str(cfg.device).startswith("cpu"))
    device = torch.device(cfg.device) if cfg.device else state.device
    if cfg.training_pairs and state.is_main_process:
        warning = overlap_warning(prompts, training_captions(cfg.training_pairs), cfg.training_pairs)
        if warning:
            print(warning, flush=True)
    out = Path(cfg.output_dir)
    if state.is_main_process:
        check_folder(out)  # a path that cannot be a folder is said before it is looked into
        claim_output_dir(out, owner="evaluate", resume=None if cfg.overwrite else cfg.resume,
                         overwrite=cfg.overwrite, run_files=RUN_FILES + ("*.part*.json*",),
                         marks=("generation.json",))
    state.wait_for_everyone()
    scorers = _load_scorers(cfg, device)
    for scorer in scorers.values():  # a scorer that reads prompt metadata (geneval) refuses others now
        if hasattr(scorer, "check_prompts"):
            scorer.check_prompts([p.text for p in prompts])
    dtype = precision_dtype(cfg.mixed_precision, device)
    pipes = {
        "base": load_pipeline(cfg.model.pretrained, device=device, dtype=dtype, scheduler=cfg.sampling.scheduler),
        "tuned": load_pipeline(cfg.tuned.pretrained or cfg.model.pretrained, denoiser=cfg.model.denoiser,
                               lora=cfg.model.lora, device=device, dtype=dtype, scheduler=cfg.sampling.scheduler),
    }
    pairs_source = None
    if cfg.implicit_reward.source:
        pairs_source = _open_held_out_pairs(cfg.implicit_reward)

    sampling = to_dict(cfg.sampling)
    if sampling["num_frames"] == 1:  # images: the fingerprint of the runs from before sampling.num_frames
        del sampling["num_frames"]
    fingerprint = {"base": cfg.model.pretrained, "tuned": tuned_name, "prompts": cfg.prompts,
                   "prompts_dir": cfg.prompts_dir, "seed": cfg.seed, "sampling": sampling}
    _check_resume(out, fingerprint)
    state.wait_for_everyone()
    if state.is_main_process:
        make_folder(out)
        config.save_config(cfg, out / "config.yaml")
        atomic_write_text(out / "generation.json", json.dumps(fingerprint, indent=1))
    state.wait_for_everyone()

    _score_share(pipes, scorers, items[state.process_index::state.num_processes], cfg, state, desc)
    implicit = None
    if pairs_source is not None:
        implicit = implicit_reward_accuracy(pipes, pairs_source, cfg, device, state, desc)
    state.wait_for_everyone()
    if not state.is_main_process:
        return EvaluateResult(output_dir=str(out))
    names = row_names(scorers) + ([CONSISTENCY] if cfg.sampling.num_frames > 1 else [])
    rows = _merged_rows(out, items, names, state.num_processes)
    return _report(cfg, rows, scorers, implicit, prompts, items, tuned_name)


def _score_share(pipes: dict, scorers: dict, mine: list[Item], cfg: EvaluateConfig, state, desc: str) -> None:
    """Generate (or read) and score this process's items; rows go to ``scores.part<rank>.jsonl``."""
    from tqdm.auto import tqdm

    from diffusion_dpo.sampling import batched

    out = Path(cfg.output_dir)
    part = out / f"scores.part{state.process_index}.jsonl"
    bar = tqdm(total=2 * len(mine), desc=desc, unit="img", disable=not state.is_main_process)
    with part.open("w") as f:
        for chunk in batched(mine, CHUNK_ITEMS):
            texts = [item.prompt.text for item in chunk]
            for model in MODELS:
                images = _images_for(pipes[model], chunk, out, model, cfg, bar)
                scores = {k: v for name, scorer in scorers.items() for k, v in _scores(name, scorer, images,
                                                                                        texts).items()}
                if cfg.sampling.num_frames > 1:  # scorer-free, beside the frame-mean scores
                    scores[CONSISTENCY] = frame_consistency(images).tolist()
                for row_name, values in scores.items():
                    for item, value in zip(chunk, values):
                        f.write(json.dumps(ScoreRow(
                            style=item.prompt.style, index=item.prompt.index, prompt=item.prompt.text,
                            seed=item.seed, model=model, scorer=row_name, score=value,
                            image=str(item.path(out, model).relative_to(out)),
                        )) + "\n")
    bar.close()


def _scores(name: str, scorer, images: list, texts: list[str]) -> dict[str, list[float]]:
    """Row name -> one score per image: the scorer's own, and ``name/task`` for each task of a scorer that
    checks several (``shapes_geneval``: counting, colors, ...)."""
    if not getattr(scorer, "tasks", None):
        return {name: video_scores(scorer, images, texts).float().tolist()}
    frames, frame_texts, n = frames_of(images, texts)  # a video's task score: its frames' mean
    tasks = {t: per_sample(v, n) for t, v in scorer.score_tasks(frames, frame_texts).items()}
    overall = [float(all(v)) for v in zip(*(tasks[t].tolist() for t in scorer.tasks))]
    return {name: overall, **{f"{name}/{t}": tasks[t].float().tolist() for t in scorer.tasks}}


def row_names(scorers: dict) -> list[str]:
    """Every scorer name the rows of ``scorers`` carry, in report order."""
    return [n for name, scorer in scorers.items()
            for n in (name, *(f"{name}/{t}" for t in getattr(scorer, "tasks", None) or ()))]


def _merged_rows(out: Path, items: list[Item], names: list[str], num_processes: int) -> list[ScoreRow]:
    """Every process's rows, in item order (then model, then scorer), written to scores.jsonl."""
    rows: list[ScoreRow] = []
    for rank in range(num_processes):
        path = out / f"scores.part{rank}.jsonl"
        rows.extend(json.loads(line) for line in path.read_text().splitlines())
        path.unlink()
    order = {(it.prompt.style, it.prompt.index, it.seed): k for k, it in enumerate(items)}
    rows.sort(key=lambda r: (order[(r["style"], r["index"], r["seed"])], MODELS.index(r["model"]),
                             names.index(r["scorer"])))
    atomic_write_text(out / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _report(cfg: EvaluateConfig, rows: list[ScoreRow], scorers: dict, implicit: ImplicitRewardAccuracy | None,
            prompts: list[Prompt], items: list[Item], tuned_name: str) -> EvaluateResult:
    """report.json, report.md, the grids and the chart (main process); the result that names them."""
    from diffusion_dpo.evaluation.benchmarks import benchmark_tables
    from diffusion_dpo.evaluation.reports import bar_chart, build_report, markdown_table, pair_grid

    out = Path(cfg.output_dir)
    scales = {name: getattr(scorer, "report_scale", 1.0) for name, scorer in scorers.items()}
    report = build_report(rows, n_seeds=cfg.seeds, scales=scales, n_boot=cfg.n_boot, seed=cfg.seed)
    report.models = {"base": cfg.model.pretrained, "tuned": tuned_name}
    report.prompts = cfg.prompts
    report.sampling = to_dict(cfg.sampling)
    report.seeds = {"first": cfg.seed, "rule": f"seed + {SEED_STRIDE} * j + prompt index"}
    report.implicit_reward = implicit
    report.benchmarks = benchmark_tables(report, scorers)
    document = report.to_json()
    atomic_write_text(out / "report.json", json.dumps(document, indent=1))
    atomic_write_text(out / "report.md", markdown_table(document))

    grids = {}
    if cfg.grid_prompts:
        (out / "grids").mkdir(exist_ok=True)
        first_seed = [it for it in items if it.seed == cfg.seed + it.prompt.index]
        for style in styles_of(prompts):
            shown = [it for it in first_seed if it.prompt.style == style][:cfg.grid_prompts]
            triples = [(_read_png(it.path(out, "base")), _read_png(it.path(out, "tuned")), it.prompt.text)
                       for it in shown]
            grids[style] = str(out / "grids" / f"{safe_name(style)}.png")
            grid = pair_grid(triples, title=style, cell=cfg.grid_cell)
            atomic_write(Path(grids[style]), functools.partial(grid.save, format="PNG"))
    chart = bar_chart(document, out / "means.png")
    return EvaluateResult(
        output_dir=str(out), scorers=report.scorers, rows=rows, implicit_reward=implicit, benchmarks=report.benchmarks,
        n_prompts=report.n_prompts, n_seeds=cfg.seeds, n_images=2 * len(items),
        report_json=str(out / "report.json"), report_md=str(out / "report.md"), scores=str(out / "scores.jsonl"),
        grids=grids, chart=str(chart))


def training_captions(source: str) -> set[str]:
    """The distinct captions of the pairs in ``source`` (its ``train/`` subfolder when there is one); a local
    parquet folder or file is read by its caption column alone, without the images."""
    path = Path(source)
    if not (path.is_dir() or path.suffix == ".parquet"):
        from diffusion_dpo.data import open_pairs

        rows = open_pairs(source, split="train", streaming=True)
        return {str(row["caption"]).strip() for row in rows if row.get("caption")}
    import pyarrow.parquet as pq

    where = path / "train" if (path / "train").is_dir() else path
    files = [path] if path.is_file() else sorted(where.glob("*.parquet"))
    if not files:
        raise InputError(f"training_pairs {source}: no *.parquet files in {where}")
    captions = set()
    for f in files:
        try:
            column = pq.read_table(f, columns=["caption"]).column("caption").to_pylist()
        except (KeyError, ValueError, OSError) as e:
            raise InputError(f"training_pairs {source}: cannot read the caption column of {f}: {e}") from None
        captions.update(str(c).strip() for c in column if c)
    return captions


def _open_held_out_pairs(icfg: ImplicitRewardConfig):
    from diffusion_dpo.data import open_pairs

    # Streaming reads only the rows it needs (a hub split is not downloaded whole).
    return open_pairs(icfg.source, split=icfg.split, streaming=True)


def implicit_reward_accuracy(pipes: dict, pairs_source, cfg: EvaluateConfig, device, state,
                             desc: str = "evaluate") -> ImplicitRewardAccuracy | None:
    """Score this process's share of the held-out pairs, then (main process) merge all shares into
    ``implicit_reward.jsonl`` and return the accuracy with its 95% bootstrap interval."""
    from tqdm.auto import tqdm

    from diffusion_dpo.evaluation.implicit_reward import labelled_pairs, score_pairs
    from diffusion_dpo.evaluation.stats import bootstrap_ci
    from diffusion_dpo.sampling import native_size

    icfg, out = cfg.implicit_reward, Path(cfg.output_dir)
    base = pipes["base"]
    resolution = icfg.resolution or cfg.sampling.height or native_size(base)
    pairs, counts = labelled_pairs(pairs_source, icfg.max_pairs, icfg.source, resolution=resolution,
                                   rank=state.process_index, world_size=state.num_processes,
                                   convert_non_rgb=icfg.convert_non_rgb)
    bar = tqdm(total=len(pairs), desc=f"{desc}: implicit reward", unit="pair", disable=not state.is_main_process)
    scores = score_pairs(pipes["tuned"], base, pairs, beta_dpo=icfg.beta_dpo, noise_draws=icfg.noise_draws,
                         batch_size=icfg.batch_size, seed=icfg.seed, device=device, dtype=base.vae.dtype,
                         progress=bar)
    bar.close()
    part = out / f"implicit_reward.part{state.process_index}.json"
    part.write_text(json.dumps({"scores": [asdict(s) for s in scores], "counts": counts}))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    rows = []
    for rank in range(state.num_processes):
        path = out / f"implicit_reward.part{rank}.json"
        shard = json.loads(path.read_text())
        rows.extend(shard["scores"])
        if rank:  # ties and bad rows are counted by every process, bad images by the one that decoded them
            counts["bad_images"] += shard["counts"]["bad_images"]
            counts["first_bad"] = counts["first_bad"] or shard["counts"]["first_bad"]
        path.unlink()
    rows.sort(key=lambda r: r["index"])
    atomic_write_text(out / "implicit_reward.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    if not rows:
        raise InputError(f"implicit_reward.source {icfg.source}: no usable pair with a winner ({counts['ties']} "
                         f"ties, {counts['bad_rows'] + counts['bad_images']} bad rows; first bad: "
                         f"{counts['first_bad']})")
    correct = [r["correct"] for r in rows]
    return ImplicitRewardAccuracy(
        source=icfg.source, split=icfg.split, n_pairs=len(rows), n_ties_skipped=counts["ties"],
        n_bad_skipped=counts["bad_rows"] + counts["bad_images"], first_bad=counts["first_bad"],
        accuracy=sum(correct) / len(correct),
        accuracy_ci=list(bootstrap_ci(correct, "mean", n_boot=cfg.n_boot, seed=icfg.seed)),
        mean_reward_margin=sum(r["reward_w"] - r["reward_l"] for r in rows) / len(rows),
        beta_dpo=icfg.beta_dpo, noise_draws=icfg.noise_draws, resolution=resolution)


def reuse_base_images(source: Path, target: Path) -> None:
    """Copy the base model's evaluation images into another evaluation folder, so an evaluation reads them
    instead of generating them again (same base, prompts, seeds and sampler)."""
    import shutil

    if (source / "images" / "base").is_dir() and not (target / "images" / "base").exists():
        shutil.copytree(source / "images" / "base", target / "images" / "base")
