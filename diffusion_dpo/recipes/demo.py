"""``diffusion-dpo demo``: the package's whole job, offline, on a CPU, in minutes.

The shapes world (diffusion_dpo/world.py) has a tiny base model that ships with the package
(assets/demo/base/) and a scorer that needs no weights (scorers/shapes.py). The demo runs, with the same
recipes a user runs on Stable Diffusion:

1. label: K candidates per training prompt from the current policy, scored by ``shapes``; the best and the
   worst of each prompt make a preference pair (``diffusion-dpo label``);
2. train: Diffusion-DPO on those pairs (``diffusion-dpo train``, full fine-tune or LoRA), and, in round 1,
   the paper's baseline: SFT on the winners of the same pairs;
3. evaluate: held-out prompts (never labelled or trained on), several seeds each, tuned vs the original
   base with the same seeds (``diffusion-dpo evaluate``);
4. report: win rate over the base with its 95% interval, mean scores, a side-by-side grid
   (``report.md``, ``report.json``, ``grid.png`` in ``output_dir``).

With ``rounds=N`` steps 1-3 repeat, each round labelling with the policy the previous round produced
and training from it (its reference is that policy too); every round is evaluated against the base.

    diffusion-dpo demo                                   # ~5 minutes on a 2-core laptop CPU
    diffusion-dpo demo seed=1 rounds=2 output_dir=runs/demo-r2
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion_dpo import ASSETS
from diffusion_dpo.config import (
    ConfigError,
    OptimSection,
    PreferenceLossSection,
    option,
    parse_args,
    save_config,
    to_dict,
)
from diffusion_dpo.errors import InputError

DEFAULT_BASE = ASSETS / "demo" / "base"


@dataclass
class WorldConfig:
    held_out_fraction: float = option(0.25, "share of the world's 252 prompts held out from labelling and "
                                      "training, for evaluation")
    split_seed: int = option(0, "seed of the train/held-out prompt split (0: the split the base was "
                             "evaluated on)")
    train_prompts: int | None = option(None, "use only the first N training prompts (null: all 189)")
    held_out_prompts: int | None = option(None, "evaluate on only the first N held-out prompts (null: all "
                                          "63)")


@dataclass
class SamplingConfig:
    num_inference_steps: int = option(20, "DDIM steps for every generated image (labelling and evaluation)")
    guidance_scale: float = option(4.0, "classifier-free guidance scale")
    batch_size: int = option(64, "images per generation batch")


@dataclass
class DemoTrainConfig:
    lora_rank: int = option(8, "0: full fine-tune of the UNet; r > 0: a rank-r LoRA adapter on the attention "
                            "projections")
    beta_dpo: float = option(5000.0, "Diffusion-DPO beta (the paper's scale)")
    learning_rate: float = option(3e-4, "DPO learning rate (not scaled by the batch); a full fine-tune "
                                  "(lora_rank=0) wants about 1e-5")
    max_steps: int = option(200, "DPO optimizer steps per round")
    batch_size: int = option(16, "pairs per DPO step")
    lr_warmup_steps: int = option(20, "linear warm-up steps (DPO and SFT)")
    caption_dropout: float = option(0.0, "probability a caption is dropped during tuning (DPO and SFT)")
    sft_learning_rate: float = option(3e-4, "SFT baseline learning rate")
    sft_max_steps: int = option(200, "SFT baseline optimizer steps")


@dataclass
class DemoConfig:
    base: str | None = option(None, "the base pipeline folder (null: the shipped assets/demo/base)")
    output_dir: str = option("runs/demo", "where every stage's files, report.md, report.json and grid.png go")
    seed: int = option(0, "seed of labelling candidates, training noise and evaluation images")
    rounds: int = option(1, "label -> train rounds, each from the previous round's policy")
    candidates_per_prompt: int = option(8, "K: candidates generated per training prompt, best vs worst kept")
    sft: bool = option(True, "also train the SFT baseline (winners only) on round 1's pairs and evaluate it")
    eval_seeds: int = option(4, "images per held-out prompt and model")
    world: WorldConfig = option(WorldConfig, "prompts of the shapes world")
    sampling: SamplingConfig = option(SamplingConfig, "sampler settings, the same for every model")
    train: DemoTrainConfig = option(DemoTrainConfig, "Diffusion-DPO and SFT settings")
    overwrite: bool = option(False, "replace an earlier demo's output in output_dir; false: refuse a folder "
                             "that is not empty (its images and pairs would otherwise be reused as if new)")
    threads: int = option(0, "CPU threads for torch (0: torch's default); on a CPU shared with other jobs "
                          "1 can be much faster than 2")
    n_boot: int = option(2000, "bootstrap resamples for the 95% intervals")
    grid_prompts: int = option(12, "held-out prompts shown in grid.png (first seed)")


def check_config(cfg: DemoConfig) -> None:
    checks = [
        ("rounds", cfg.rounds >= 1, "at least 1"),
        ("candidates_per_prompt", cfg.candidates_per_prompt >= 2, "at least 2"),
        ("eval_seeds", cfg.eval_seeds >= 1, "at least 1"),
        ("world.train_prompts", cfg.world.train_prompts is None or cfg.world.train_prompts >= 1,
         "null or >= 1"),
        ("world.held_out_prompts", cfg.world.held_out_prompts is None or cfg.world.held_out_prompts >= 1,
         "null or >= 1"),
        ("threads", cfg.threads >= 0, "0 (torch's default) or a positive number"),
        ("grid_prompts", cfg.grid_prompts >= 0, "0 or more"),
    ]
    for key, ok, expected in checks:
        if not ok:
            value = dataclasses.asdict(cfg)
            for part in key.split("."):
                value = value[part]
            raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")


# ------------------------------------------------------------------------------------------ stage configs

def label_config(cfg: DemoConfig, policy: str, prompts_file: Path, out: Path, round_: int):
    from diffusion_dpo.recipes import label

    s = cfg.sampling
    return label.LabelConfig(
        model=label.ModelConfig(pretrained=policy), prompts=str(prompts_file),
        scorer=label.ScorerConfig(name="shapes"), candidates_per_prompt=cfg.candidates_per_prompt,
        pairing="best_worst",
        sampling=label.SamplingConfig(num_inference_steps=s.num_inference_steps,
                                      guidance_scale=s.guidance_scale),
        batch_size=s.batch_size, seed=1000 * cfg.seed + round_, output_dir=str(out),
        prompts_per_shard=10_000,  # one shard: the whole round is one unit of work
    )


def train_config(cfg: DemoConfig, method: str, policy: str, pairs: Path, out: Path, round_: int):
    from diffusion_dpo.data import DataConfig
    from diffusion_dpo.recipes import train

    t = cfg.train
    dpo = method == "dpo"
    return train.TrainConfig(
        method=method,
        model=train.ModelConfig(pretrained=policy, lora_rank=t.lora_rank),
        data=DataConfig(source=str(pairs), resolution=_resolution(policy), random_flip=True,
                        caption_dropout=t.caption_dropout),
        loss=PreferenceLossSection(beta=t.beta_dpo),
        optim=OptimSection(
            learning_rate=t.learning_rate if dpo else t.sft_learning_rate, scale_lr=False,
            scheduler="constant_with_warmup", warmup_steps=t.lr_warmup_steps, batch_size=t.batch_size,
            max_steps=t.max_steps if dpo else t.sft_max_steps, seed=1000 * cfg.seed + round_),
        precompute=True, output_dir=str(out), checkpoint_every=0, log_every=10,
    )


def evaluate_config(cfg: DemoConfig, base: str, tuned: str, prompts_file: Path, out: Path):
    from diffusion_dpo.recipes import evaluate

    s = cfg.sampling
    return evaluate.EvaluateConfig(
        model=evaluate.ModelConfig(pretrained=base), tuned=evaluate.TunedConfig(pretrained=tuned),
        prompts=str(prompts_file), seeds=cfg.eval_seeds, seed=1000 * cfg.seed, scorers="shapes",
        sampling=evaluate.SamplingConfig(num_inference_steps=s.num_inference_steps,
                                         guidance_scale=s.guidance_scale),
        batch_size=s.batch_size, n_boot=cfg.n_boot, grid_prompts=0, output_dir=str(out),
    )


def _resolution(pipeline: str) -> int:
    """Image side in px of a pipeline folder: UNet sample size x VAE downsampling factor."""
    unet = json.loads((Path(pipeline) / "unet" / "config.json").read_text())
    vae = json.loads((Path(pipeline) / "vae" / "config.json").read_text())
    return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


# ---------------------------------------------------------------------------------------------- pieces

def write_prompts(cfg: DemoConfig, folder: Path) -> tuple[Path, Path]:
    """The world's train and held-out prompts as text files (one per line) in ``folder``."""
    from diffusion_dpo.world import split_prompts

    train, held_out = split_prompts(cfg.world.held_out_fraction, cfg.world.split_seed)
    train, held_out = train[:cfg.world.train_prompts], held_out[:cfg.world.held_out_prompts]
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.txt", folder / "held_out.txt"
    for path, prompts in zip(paths, (train, held_out)):
        path.write_text("".join(p + "\n" for p in prompts))
    return paths


DEMO_OUTPUTS = ("config.yaml", "prompts", "report.md", "report.json", "grid.png")


def prepare_output(out: Path, overwrite: bool) -> None:
    """An empty ``out``. The stages resume from what their folders hold (label and evaluate reuse pairs
    and images made with the same settings and paths), so an earlier demo's files there, made perhaps
    from other base weights at the same path, are removed (``overwrite``) or refused, never reused."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"output_dir {out} is not empty (an earlier demo?); pass overwrite=true to "
                             "replace its results, or choose another output_dir")
        strangers = sorted(p.name for p in out.iterdir()
                           if p.name not in DEMO_OUTPUTS and not p.name.startswith("round-"))
        if strangers:
            raise InputError(f"output_dir {out} holds files the demo did not write "
                             f"({', '.join(strangers[:3])}); overwrite=true only replaces a demo's own output: "
                             "choose another output_dir")
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def policy_pipeline(previous: str, final: Path, fmt: str, out: Path) -> str:
    """A full pipeline folder: ``previous`` with its UNet replaced by a training run's ``final/`` (a UNet
    folder, or LoRA weights fused into ``previous``'s UNet). The next round starts from it; evaluate and
    label load it like any checkpoint."""
    import torch

    from diffusion_dpo.sampling import load_pipeline

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # The pipeline's components only: not the UNet, nor the base's own notes (samples.png, ...).
    top = Path(previous).resolve()
    shutil.copytree(previous, tmp, ignore=lambda folder, names: [
        n for n in names
        if Path(folder).resolve() == top and (n == "unet" or n.endswith((".png", "summary.json")))
    ])
    if fmt == "lora":
        pipe = load_pipeline(previous, lora=str(final), device="cpu", dtype=torch.float32)
        pipe.unload_lora_weights()  # the fused weights stay; only the adapter modules go
        pipe.unet.save_pretrained(str(tmp / "unet"))
    else:
        shutil.copytree(final, tmp / "unet")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)


def reuse_base_images(source: Path, target: Path) -> None:
    """Copy the base model's evaluation images into another evaluation folder, so evaluate reads them
    instead of generating them again (same base, prompts, seeds and sampler)."""
    if (source / "images" / "base").is_dir() and not (target / "images" / "base").exists():
        shutil.copytree(source / "images" / "base", target / "images" / "base")


def _timed(timings: dict, name: str, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    timings[name] = round(time.perf_counter() - start, 1)
    return result


def comparison(evaluation: dict) -> dict[str, Any]:
    """The numbers of one tuned-vs-base evaluation that the report shows."""
    report = json.loads(Path(evaluation["report"]).read_text())
    r = report["scorers"]["shapes"]
    return {
        "win_rate": r["win_rate"], "win_rate_ci": r["win_rate_ci"],
        "base_mean": r["base_mean"], "base_mean_ci": r["base_mean_ci"],
        "tuned_mean": r["tuned_mean"], "tuned_mean_ci": r["tuned_mean_ci"],
        "n_prompts": r["n_prompts"], "n_images": r["n_images"], "eval_dir": evaluation["output_dir"],
    }


# ---------------------------------------------------------------------------------------------- report

def comparison_grid(rows: list[tuple[str, list]], columns: list[str], path: Path, cell: int = 96) -> Path:
    """Held-out prompts down, models across (each image with its shapes score under it)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    label_w, pad, caption = 250, 6, 14
    width = label_w + len(columns) * (cell + pad) + pad
    height = 20 + len(rows) * (cell + caption + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        draw.text((label_w + pad + j * (cell + pad), 4), name, fill="black", font=font)
    for i, (prompt, cells) in enumerate(rows):
        y = 20 + i * (cell + caption + pad)
        draw.text((pad, y + cell // 2 - 6), prompt.removeprefix("a "), fill="black", font=font)
        for j, (image, score) in enumerate(cells):
            x = label_w + pad + j * (cell + pad)
            canvas.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
            draw.text((x, y + cell + 1), f"{score:.3f}", fill="black", font=font)
    canvas.save(path)
    return path


def grid_rows(evals: list[dict], n_prompts: int) -> list[tuple[str, list]]:
    """For ``n_prompts`` held-out prompts (first seed): the base image, then each evaluation's
    tuned image, with their scores (from the evaluations' scores.jsonl)."""
    from PIL import Image

    def first_seed_rows(ev: dict) -> dict[tuple[int, str], dict]:
        rows = [json.loads(line) for line in (Path(ev["eval_dir"]) / "scores.jsonl").read_text().splitlines()]
        first = min(r["seed"] - r["index"] for r in rows)
        return {(r["index"], r["model"]): r for r in rows if r["seed"] - r["index"] == first}

    tables = [first_seed_rows(ev) for ev in evals]
    every = sorted({i for i, _ in tables[0]})
    # Evenly spread over the (sorted) held-out prompts, so both sizes and all shapes show up.
    indices = sorted({every[k * len(every) // n_prompts] for k in range(min(n_prompts, len(every)))})
    out = []
    for i in indices:
        base = tables[0][(i, "base")]
        cells = [(Image.open(Path(evals[0]["eval_dir"]) / base["image"]).convert("RGB"), base["score"])]
        for ev, table in zip(evals, tables):
            r = table[(i, "tuned")]
            cells.append((Image.open(Path(ev["eval_dir"]) / r["image"]).convert("RGB"), r["score"]))
        out.append((base["prompt"], cells))
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown_report(summary: dict) -> str:
    cfg, rounds = summary["config"], summary["rounds"]
    first = rounds[0]["dpo"]
    lines = [
        "# Diffusion-DPO demo: the shapes world",
        "",
        f"Base `{summary['base']}`; {summary['train_prompts']} training prompts x "
        f"{cfg['candidates_per_prompt']} candidates, best vs worst by the `shapes` scorer; evaluation on "
        f"{summary['held_out_prompts']} held-out "
        f"prompts x {cfg['eval_seeds']} seeds, tuned vs base with the same seeds. Seed {cfg['seed']}.",
        "",
        "| model | mean shapes score [95% CI] | win rate over base [95% CI] |",
        "|---|---|---|",
        f"| base | {first['base_mean']:.3f} [{first['base_mean_ci'][0]:.3f}, "
        f"{first['base_mean_ci'][1]:.3f}] | - |",
    ]
    rows = [("SFT on winners (round 1 pairs)", summary["sft"])] if summary.get("sft") else []
    rows += [(f"Diffusion-DPO round {r['round']}", r["dpo"]) for r in rounds]
    for name, c in rows:
        lines.append(f"| {name} | {c['tuned_mean']:.3f} [{c['tuned_mean_ci'][0]:.3f}, "
                     f"{c['tuned_mean_ci'][1]:.3f}] "
                     f"| {_pct(c['win_rate'])} [{_pct(c['win_rate_ci'][0])}, {_pct(c['win_rate_ci'][1])}] |")
    verdict = "entirely above" if first["win_rate_ci"][0] > 0.5 else "not entirely above"
    lines += [
        "",
        f"Round 1 Diffusion-DPO beats the base on {_pct(first['win_rate'])} of held-out (prompt, seed) "
        "pairs; "
        f"its 95% interval is {verdict} 50%.",
        "",
        "| round | pairs | mean winner score | mean loser score | DPO loss (last) "
        "| implicit accuracy (last) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rounds:
        m = r["train_metrics"]
        lines.append(f"| {r['round']} | {r['pairs']} | {r['mean_winner_score']:.3f} "
                     f"| {r['mean_loser_score']:.3f} "
                     f"| {m.get('loss', float('nan')):.4f} | {m.get('implicit_acc', float('nan')):.2f} |")
    lines += [
        "",
        "![base | SFT | DPO rounds](grid.png)",
        "",
        "Win rate: share of (prompt, seed) pairs where the tuned image scores higher than the base's, ties "
        "half; intervals: bootstrap over prompts. Timings (s): "
        + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- run

def run(cfg: DemoConfig) -> dict[str, Any]:
    """Label, train (DPO and SFT), evaluate and report into ``cfg.output_dir``; return the summary."""
    import torch

    from diffusion_dpo.recipes import evaluate, label, train

    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base = str(Path(cfg.base) if cfg.base else DEFAULT_BASE)
    if not (Path(base) / "model_index.json").is_file():
        raise InputError(f"config key 'base': {base} is not a diffusers pipeline folder (no "
                         "model_index.json); "
                         "build one with scripts/train_demo_base.py")
    out = Path(cfg.output_dir)
    prepare_output(out, cfg.overwrite)
    save_config(cfg, out / "config.yaml")
    train_file, held_out_file = write_prompts(cfg, out / "prompts")
    start = time.perf_counter()
    seconds: dict[str, float] = {}

    rounds, policy, sft = [], base, None
    for r in range(1, cfg.rounds + 1):
        rdir = out / f"round-{r}"
        labelled = _timed(seconds, f"label_{r}", label.run,
                          label_config(cfg, policy, train_file, rdir / "pairs", r))
        trained = _timed(seconds, f"train_dpo_{r}", train.run,
                         train_config(cfg, "dpo", policy, rdir / "pairs", rdir / "dpo", r))
        if r == 1 and cfg.sft:
            sft_run = _timed(seconds, "train_sft", train.run,
                             train_config(cfg, "sft", policy, rdir / "pairs", rdir / "sft", r))
        new_policy = policy_pipeline(policy, Path(trained.final), trained.format, rdir / "policy")
        if r > 1:
            reuse_base_images(out / "round-1" / "eval", rdir / "eval")
        evaluation = _timed(seconds, f"evaluate_{r}", evaluate.run,
                            evaluate_config(cfg, base, new_policy, held_out_file, rdir / "eval"))
        if r == 1 and cfg.sft:
            sft_policy = policy_pipeline(policy, Path(sft_run.final), sft_run.format,
                                         rdir / "sft_policy")
            reuse_base_images(rdir / "eval", rdir / "sft_eval")
            sft = comparison(_timed(seconds, "evaluate_sft", evaluate.run,
                                    evaluate_config(cfg, base, sft_policy, held_out_file, rdir / "sft_eval")))
        rounds.append({
            "round": r, "policy": new_policy, "pairs": labelled["pairs_written"],
            "mean_winner_score": labelled["mean_winner_score"],
            "mean_loser_score": labelled["mean_loser_score"],
            "train_metrics": trained.last_metrics, "dpo": comparison(evaluation),
        })
        policy = new_policy
    seconds["total"] = round(time.perf_counter() - start, 1)

    summary = {
        "base": base, "output_dir": str(out), "config": to_dict(cfg),
        "train_prompts": len(train_file.read_text().splitlines()),
        "held_out_prompts": len(held_out_file.read_text().splitlines()),
        "rounds": rounds, "sft": sft, "seconds": seconds,
        "dpo_win_rate": rounds[0]["dpo"]["win_rate"], "dpo_win_rate_ci": rounds[0]["dpo"]["win_rate_ci"],
        "report": str(out / "report.md"), "grid": None,
    }
    if cfg.grid_prompts:
        evals = ([sft] if sft else []) + [r["dpo"] for r in rounds]
        columns = ["base"] + (["SFT"] if sft else []) + [f"DPO round {r['round']}" for r in rounds]
        summary["grid"] = str(comparison_grid(grid_rows(evals, cfg.grid_prompts), columns, out / "grid.png"))
    (out / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "report.md").write_text(markdown_report(summary))
    return summary


def main(argv: list[str]) -> int:
    cfg = parse_args(DemoConfig, argv, prog="diffusion-dpo demo", description=__doc__.split("\n\n")[0])
    summary = run(cfg)
    print(Path(summary["report"]).read_text())
    print(f"everything is in {summary['output_dir']}/ (report.md, report.json, grid.png)")
    return 0
