"""The pieces the offline demo (recipes/demo.py) and the online one (recipes/demo_online.py) share: the shipped
bases, the world's prompt files, the evaluation against the base, the pipeline a round hands to the next, and
the console's words. ``cfg`` is the demo's config (recipes/demo.py DemoConfig).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from diffusion_dpo import ASSETS
from diffusion_dpo.config import ConfigError
from diffusion_dpo.errors import InputError
from diffusion_dpo.evaluation.paired import EvaluateConfig, TunedConfig
from diffusion_dpo.pipeline_config import PipelineSection, SamplingSection
from diffusion_dpo.recipes.demo_config import FAMILY_WORLD

BASES = {"sd": ASSETS / "demo" / "base", "flow": ASSETS / "demo" / "flow_base",
         "video": ASSETS / "demo" / "video_base"}
DEFAULT_BASE = BASES["sd"]


def world(cfg) -> dict:
    """The family's scorer, evaluation scorers, prompts and sample shape (demo_config.FAMILY_WORLD). The still
    world's evaluation adds the shapes world as an offline GenEval (count, colour, shape, size, position,
    background checked on the world's exact geometry) beside the demo's scorer."""
    return FAMILY_WORLD[cfg.family]


def family_eval_seeds(cfg):
    """``cfg`` with ``eval_seeds`` set to the family's when it is null."""
    import dataclasses

    return dataclasses.replace(cfg, eval_seeds=cfg.eval_seeds or world(cfg)["eval_seeds"])


def num_frames(cfg) -> int:
    """Frames per sample: ``sampling.num_frames``, or the family's when null."""
    return cfg.sampling.num_frames or world(cfg)["num_frames"]


def sampling_section(cfg) -> SamplingSection:
    """label's and evaluate's sampler: the demo's steps and guidance, the family's frames and side."""
    s, side = cfg.sampling, world(cfg)["side"]
    return SamplingSection(num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                           height=side, width=side, num_frames=num_frames(cfg))


def evaluate_config(cfg, base: str, tuned: str, prompts_file: Path, out: Path, resume: str | None):
    s = cfg.sampling
    return EvaluateConfig(
        model=PipelineSection(pretrained=base), tuned=TunedConfig(pretrained=tuned),
        prompts=str(prompts_file), seeds=cfg.eval_seeds, seed=1000 * cfg.seed,
        scorers=world(cfg)["eval_scorers"], sampling=sampling_section(cfg),
        batch_size=s.batch_size, n_boot=cfg.n_boot, grid_prompts=0, output_dir=str(out), resume=resume,
        mixed_precision=cfg.mixed_precision,
    )


def consistency(evaluation) -> dict | None:
    """{"base": mean, "tuned": mean} of evaluate's frame_consistency (videos), or None (images)."""
    from diffusion_dpo.evaluation.video import CONSISTENCY

    c = evaluation.scorers.get(CONSISTENCY)
    return None if c is None else {"base": c.base_mean, "tuned": c.tuned_mean}


def check_base(cfg) -> str:
    """The base folder, checked: a diffusers pipeline of the family ``cfg.family`` names."""
    from diffusion_dpo.families import detect

    base = str(Path(cfg.base) if cfg.base else BASES[cfg.family])
    if not (Path(base) / "model_index.json").is_file():
        raise InputError(f"config key 'base': {base} is not a diffusers pipeline folder (no "
                         f"model_index.json); build one with scripts/train_demo_base.py --family {cfg.family}")
    family = detect(base)
    kind = "video" if getattr(family, "trains_videos", False) else "flow" if family.flow else "sd"
    if kind != cfg.family:
        expected = {"sd": "an SD1.x/2.x or SDXL", "flow": "an SD3 or FLUX", "video": "a Wan"}[cfg.family]
        raise InputError(f"config keys 'family' / 'base': family={cfg.family} but {base} is a {family.name} "
                         f"pipeline ({'flow matching' if family.flow else 'DDPM'}); expected {expected} pipeline")
    frames = num_frames(cfg)
    if (frames - 1) % 4 if world(cfg)["motion"] else frames != 1:
        raise ConfigError(f"config key 'sampling.num_frames': family={cfg.family} takes "
                          + ("4 k + 1 frames (5, 9, ...: the Wan VAE's)" if world(cfg)["motion"] else "1 (images)")
                          + f"; got {frames}")
    return base


def write_prompts(cfg, folder: Path) -> tuple[Path, Path]:
    """The world's train and held-out prompts as text files (one per line) in ``folder`` (family video: the
    moving-shapes world's)."""
    from scorers.shapes.motion import split_motion_prompts
    from scorers.shapes.world import split_prompts

    split = split_motion_prompts if world(cfg)["motion"] else split_prompts
    train, held_out = split(cfg.world.held_out_fraction, cfg.world.split_seed)
    train, held_out = train[:cfg.world.train_prompts], held_out[:cfg.world.held_out_prompts]
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.txt", folder / "held_out.txt"
    for path, prompts in zip(paths, (train, held_out)):
        path.write_text("".join(p + "\n" for p in prompts))
    return paths


def policy_pipeline(previous: str, final: Path, fmt: str, out: Path) -> str:
    """A full pipeline folder: ``previous`` with its denoiser (UNet or transformer) replaced by a training
    run's ``final/`` (a denoiser folder, or LoRA weights fused into ``previous``'s). The next round starts
    from it; evaluate and label load it like any checkpoint."""
    import torch

    from diffusion_dpo.families import detect
    from diffusion_dpo.sampling import load_pipeline

    name = detect(previous).denoiser_name

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # The pipeline's components only: not the denoiser, nor the base's own notes (samples.png, ...).
    top = Path(previous).resolve()
    shutil.copytree(previous, tmp, ignore=lambda folder, names: [
        n for n in names
        if Path(folder).resolve() == top and (n == name or n.endswith((".png", "summary.json")))
    ])
    if fmt == "lora":
        pipe = load_pipeline(previous, lora=str(final), device="cpu", dtype=torch.float32)
        pipe.unload_lora_weights()  # the fused weights stay; only the adapter modules go
        getattr(pipe, name).save_pretrained(str(tmp / name))
    else:
        shutil.copytree(final, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)


class Console:
    """The demo's own words on stdout: numbered stage announcements, and sentences (never raw JSON)."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def stage(self, text: str) -> str:
        """Announce the next stage; return its tag ("[k/N] <first word>") for the stage's progress bars."""
        self.done += 1
        tag = f"[{self.done}/{self.total}]"
        print(f"{tag} {text}", flush=True)
        return f"{tag} {text.split(':')[0]}"

    @staticmethod
    def say(text: str) -> None:
        print(f"      {text}", flush=True)


def timed(timings: dict, name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    timings[name] = round(time.perf_counter() - start, 1)
    return result
