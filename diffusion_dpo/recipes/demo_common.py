"""The pieces the offline demo (recipes/demo.py) and the online one (recipes/demo_online.py) share: the shipped
bases, the world's prompt files, the evaluation against the base, the pipeline a round hands to the next, and
the console's words. ``cfg`` is the demo's config (recipes/demo.py DemoConfig).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from diffusion_dpo import ASSETS
from diffusion_dpo.errors import InputError
from diffusion_dpo.evaluation.paired import EvaluateConfig, TunedConfig
from diffusion_dpo.pipeline_config import PipelineSection, SamplingSection

BASES = {"sd": ASSETS / "demo" / "base", "flow": ASSETS / "demo" / "flow_base"}
DEFAULT_BASE = BASES["sd"]

# The demo's scorer, and the shapes world as an offline GenEval (count, colour, shape, size, position,
# background checked on the world's exact geometry), reported beside it.
EVAL_SCORERS = "shapes,shapes_geneval"


def evaluate_config(cfg, base: str, tuned: str, prompts_file: Path, out: Path, resume: str | None):
    s = cfg.sampling
    return EvaluateConfig(
        model=PipelineSection(pretrained=base), tuned=TunedConfig(pretrained=tuned),
        prompts=str(prompts_file), seeds=cfg.eval_seeds, seed=1000 * cfg.seed, scorers=EVAL_SCORERS,
        sampling=SamplingSection(num_inference_steps=s.num_inference_steps,
                                         guidance_scale=s.guidance_scale),
        batch_size=s.batch_size, n_boot=cfg.n_boot, grid_prompts=0, output_dir=str(out), resume=resume,
        mixed_precision=cfg.mixed_precision,
    )


def check_base(cfg) -> str:
    """The base folder, checked: a diffusers pipeline of the family ``cfg.family`` names."""
    from diffusion_dpo.families import detect

    base = str(Path(cfg.base) if cfg.base else BASES[cfg.family])
    if not (Path(base) / "model_index.json").is_file():
        raise InputError(f"config key 'base': {base} is not a diffusers pipeline folder (no "
                         f"model_index.json); build one with scripts/train_demo_base.py --family {cfg.family}")
    family = detect(base)
    if family.flow != (cfg.family == "flow"):
        raise InputError(f"config keys 'family' / 'base': family={cfg.family} but {base} is a {family.name} "
                         f"pipeline ({'flow matching' if family.flow else 'DDPM'}); expected "
                         f"{'an SD3 or FLUX' if cfg.family == 'flow' else 'an SD1.x/2.x or SDXL'} pipeline")
    return base


def write_prompts(cfg, folder: Path) -> tuple[Path, Path]:
    """The world's train and held-out prompts as text files (one per line) in ``folder``."""
    from scorers.shapes.world import split_prompts

    train, held_out = split_prompts(cfg.world.held_out_fraction, cfg.world.split_seed)
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
