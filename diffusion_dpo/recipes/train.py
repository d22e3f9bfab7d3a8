"""``diffusion-dpo train``: Diffusion-DPO (or SFT) fine-tuning of a text-to-image denoiser on preference pairs.

Offline, on a tiny pipeline and pair set the package builds itself:

    diffusion-dpo train --config assets/configs/tiny.yaml

Real checkpoints (SD1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1, detected from the pipeline), full fine-tune or LoRA,
one GPU or many, on
pairs that ``diffusion-dpo label`` wrote (or any preference set mapped with data.columns):

    diffusion-dpo train --config sd15_train
    accelerate launch --num_processes 16 -m diffusion_dpo train --config sdxl_train

Writes into ``output_dir``: config.yaml (resolved), metrics.jsonl, tensorboard logs under logs/,
checkpoints/step-N/ (exact resume), and final/ (a UNet or transformer folder, or LoRA weights for
pipe.load_lora_weights).

The step, for B pairs (Wallace et al. 2023, eq. 14): encode both images with the frozen VAE and the caption
with the frozen text encoder(s) as the model's family does; draw one noise and one time per pair (DDPM
timestep, or flow-matching sigma); the policy's and the reference's denoising errors of winner and loser
give the loss -log sigmoid(-beta/2 [(e_w - e_ref_w) - (e_l - e_ref_l)]).
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from diffusion_dpo import models
from diffusion_dpo.config import ConfigError, option, parse_args, to_dict
from diffusion_dpo.data import DataConfig, PreferencePairs, missing_source_error
from diffusion_dpo.denoising import (
    draw_pair_noise,
    pair_seeds,
)
from diffusion_dpo.engine import Engine, StepContext, StepOutput, releases_output_dir
from diffusion_dpo.errors import InputError
from diffusion_dpo.families import NoiseConfig
from diffusion_dpo.fileio import atomic_write_text
from diffusion_dpo.latent_cache import CachedPairs, OnlinePairs, build_latent_cache
from diffusion_dpo.objectives import OBJECTIVES
from diffusion_dpo.pipeline_config import ModelConfig
from diffusion_dpo.reference import AdapterOff
from diffusion_dpo.run_options import OptimSection, PreferenceLossSection, TrainingRunOptions
from diffusion_dpo.tiny import TINY

Tensor = torch.Tensor
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")


@dataclass
class TrainConfig(TrainingRunOptions):
    output_dir: str = option("runs/train", "where config.yaml, metrics.jsonl, logs/, checkpoints/ and final/ go")
    method: Literal["dpo", "sft"] = option("dpo", "dpo: Diffusion-DPO on pairs; sft: plain denoising loss on "
                                           "the winners only (the paper's SFT baseline)")
    model: ModelConfig = option(ModelConfig, "the checkpoint to tune and how (full or LoRA)")
    data: DataConfig = option(DataConfig, "preference pairs; 'tiny' builds a tiny pair set into <output_dir>/tiny/")
    loss: PreferenceLossSection = option(
        PreferenceLossSection(beta=5000.0), "the preference loss on the error margin; loss.beta is the paper's "
        "beta_dpo, on the same scale as its code (5000 for SD1.5 and SDXL; larger stays closer to the reference; "
        "flow-matching models: see docs/train.md, 'beta')")
    noise: NoiseConfig = option(NoiseConfig, "the time draw of flow-matching models and the error's reduction")
    optim: OptimSection = option(
        OptimSection(learning_rate=1e-8, scale_lr=True, weight_decay=1e-2, scheduler="constant_with_warmup",
                     warmup_steps=500, batch_size=1, max_steps=2000),
        "optimizer and schedule; pairs per step = batch_size x gradient_accumulation_steps x processes (the "
        "paper: 1 x 128 x 16 = 2048, lr 1e-8 scaled by it = 2.048e-5)")
    precompute: bool = option(False, "encode every pair once (VAE posterior, text) into <output_dir>/"
                              "latent_cache/ and train from it without the VAE and text encoders (freed)")
    log_rows: bool = option(False, "append the data row ids each process trained on to output_dir/rows/")

    def check(self) -> None:
        if self.optim.max_steps is None:
            raise ConfigError("config key 'optim.max_steps': expected a number of steps (a stream has no epochs)")


@dataclass
class TrainResult:
    output_dir: str
    final: str  # final/: a denoiser folder or LoRA weights
    format: Literal["unet", "transformer", "lora"]
    pretrained: str  # the pipeline that was tuned (a tiny one's folder when built)
    steps: int
    resumed_from: Optional[str]  # the checkpoint this run continued from
    pairs_per_step: int  # batch_size x gradient_accumulation_steps x processes
    learning_rate: float  # the peak learning rate after scale_lr
    last_metrics: dict[str, float]
    data: dict[str, Any]  # pairs used, ties, bad rows by reason
    weight_digests: list[str]  # one per process: equal under data parallelism
    num_processes: int = 1
    process_index: int = 0

# -------------------------------------------------------------------------------------------- set-up

def check_inputs(cfg: TrainConfig) -> None:
    """A missing data.source and local paths that do not exist fail here, before a tiny pipeline is built or
    output_dir is made."""
    if not cfg.data.source:
        raise missing_source_error()
    for key, value, built in (("model.pretrained", cfg.model.pretrained, TINY),
                              ("data.source", cfg.data.source, ("tiny",))):
        path = Path(value).expanduser()
        is_hub_id = _HUB_ID.match(value) and not Path(value.split("/")[0]).is_dir()
        if value not in built and not path.exists() and not is_hub_id:
            raise InputError(f"config key '{key}': {value} does not exist (expected a local folder or file, a "
                             f"hub id of the form owner/name, or {' / '.join(map(repr, built))})")


def build_tiny_inputs(cfg: TrainConfig, out: Path, build: bool) -> tuple[str, str]:
    """The tiny pipeline / pair set that model.pretrained / data.source name 'tiny', built once into
    ``out/tiny/`` when ``build``; return the paths to load (other values pass through)."""
    from diffusion_dpo.tiny import build_tiny_pipeline, write_tiny_pairs

    pretrained, source = cfg.model.pretrained, cfg.data.source
    if pretrained in TINY:
        folder = out / "tiny" / pretrained
        if build and not (folder / "model_index.json").is_file():
            build_tiny_pipeline(folder, family=TINY[pretrained], resolution=cfg.data.resolution)
        pretrained = str(folder)
    if source == "tiny":
        folder = out / "tiny" / "pairs"
        if build and not any(folder.glob("*.parquet")):
            write_tiny_pairs(folder, n_pairs=64, size=cfg.data.resolution)
        source = str(folder)
    return pretrained, source


@dataclass
class Models:
    components: models.Components
    policy: torch.nn.Module  # the denoiser being trained (unwrapped)
    reference: Any  # FrozenCopy or AdapterOff (None for SFT of a full fine-tune)
    is_lora: bool
    noise: Any  # the family's noise process (families.base.DDPMNoise or FlowNoise)


def setup_models(cfg: TrainConfig, pretrained: str, engine: Engine) -> Models:
    """Frozen VAE and text encoders in the compute dtype; the trained weights in fp32; the reference. Under
    parallel.strategy=fsdp the denoiser is sharded by its family's blocks (its frozen base of a LoRA run kept
    fp32: the shards are cast to the compute dtype block by block) and the reference kept as parallel.frozen
    says."""
    m, device, dtype = cfg.model, engine.device, engine.compute_dtype
    comps = models.load_components(pretrained, revision=m.revision, variant=m.variant, vae=m.vae,
                                   expert=m.expert)
    noise = comps.family.noise_process(comps.noise_scheduler, cfg.noise)
    models.freeze_to(comps, device, dtype)
    unet = comps.denoiser
    is_lora = m.lora_rank > 0
    if is_lora:  # the base denoiser is frozen in the compute dtype; only the adapter trains, in fp32
        models.move(unet, device, torch.float32 if engine.sharded else dtype)
        models.attach_lora(unet, m.lora_rank, m.lora_alpha, m.lora_targets or list(comps.family.lora_targets))
        for p in models.trainable_parameters(unet):
            p.data = p.data.float()
        reference = AdapterOff(unet)
    else:
        unet.to(device)
        reference = None
        if cfg.method == "dpo":
            copy = models.frozen_copy(unet, dtype)
            reference = engine.keep_frozen(copy, comps.family.shard_blocks(copy))
    if m.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    unet = engine.shard(unet, comps.family.shard_blocks(unet))  # before the optimizer sees its parameters
    return Models(comps, unet, reference, is_lora, noise)


def setup_data(cfg: TrainConfig, source: str, pretrained: str, comps: models.Components, engine: Engine):
    """The feed of PairBatches: online encoding, or the latent cache (built once) when ``precompute``; and
    the bytes of frozen parameters (VAE, text encoders) the cache let the run free (0 online)."""
    data_cfg = dataclasses.replace(cfg.data, source=source)
    seed = cfg.optim.seed
    data = PreferencePairs(data_cfg, seed=seed, process_index=engine.rank, num_processes=engine.world)
    if not cfg.precompute:
        return OnlinePairs(data, comps, engine.device), 0
    # What the cached latents depend on; the per-step augmentation and how images are fetched do not count.
    unrelated = ("caption_dropout", "num_workers", "image_cache_dir", "fetch_retries", "fetch_timeout",
                 "fetch_backoff")
    fingerprint = {"pretrained": pretrained, "family": comps.family.name, "revision": cfg.model.revision,
                   "variant": cfg.model.variant, "vae": cfg.model.vae, "dtype": str(engine.compute_dtype),
                   "world_size": engine.world, "seed": seed,
                   "data": {k: v for k, v in to_dict(data_cfg).items() if k not in unrelated}}
    build_latent_cache(comps, data_cfg, engine.out / "latent_cache", seed=seed, fingerprint=fingerprint,
                       rank=engine.rank, world_size=engine.world, barrier=engine.accelerator.wait_for_everyone,
                       progress=engine.is_main)
    feed = CachedPairs(engine.out / "latent_cache", data, seed=seed, caption_dropout=data_cfg.caption_dropout,
                       random_flip=data_cfg.random_flip, device=engine.device)
    freed = sum(p.numel() * p.element_size() for m in [comps.vae, *comps.text_encoders] for p in m.parameters())
    comps.vae, comps.text_encoders = None, []  # the cache replaces them (T5 included): free their memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return feed, freed


def keep_rows_before(path: Path, step: int) -> None:
    """The row log of a resumed run keeps the steps before its checkpoint (they are logged again after it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text().splitlines() if path.exists() else []
    atomic_write_text(path, "".join(line + "\n" for line in lines if int(line.split()[0]) < step))


def make_step(cfg: TrainConfig, unet, built: Models, vae_config, engine: Engine):
    """The step function: shared noise and time per pair (seeded by step, process and position, so a
    resumed run draws the same), then the objective through the family's denoiser call."""
    process, forward = built.noise, built.components.family.forward
    objective, seed, batch_size = OBJECTIVES[cfg.method], cfg.optim.seed, cfg.optim.batch_size

    def step(batch, ctx: StepContext) -> StepOutput:
        latent_shape = (batch.moments.shape[2] // 2, *batch.moments.shape[3:])
        noise = draw_pair_noise(pair_seeds(seed, ctx.step, ctx.rank, batch_size, ctx.micro * batch_size, engine.world),
                                latent_shape, process.draw_time, engine.device)
        if cfg.log_rows:
            with open(engine.out / "rows" / f"rank-{ctx.rank}.txt", "a") as f:
                f.write(f"{ctx.step} {ctx.micro} {' '.join(map(str, batch.row_indices.tolist()))}\n")
        return objective(unet, built.reference, models.pair_inputs(vae_config, batch, noise), batch.is_tie,
                         process, cfg.loss, forward)

    return step


# ---------------------------------------------------------------------------------------------- run

@releases_output_dir
def run(cfg: TrainConfig, *, desc: str = "train") -> TrainResult:
    """Train as ``cfg`` says: set up models, optimizer and data, train, save final/; return the result.
    ``desc`` names the progress bar (the demo's stages)."""
    from accelerate.utils import set_seed

    from diffusion_dpo.engine import build_optimizer, peak_learning_rate

    engine = Engine(cfg, seed=cfg.optim.seed, gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
                    unit="pairs", name="train", desc=desc, before_write=lambda: check_inputs(cfg))
    cfg, out = engine.cfg, engine.out
    if engine.is_main:
        build_tiny_inputs(cfg, out, build=True)
    engine.accelerator.wait_for_everyone()
    pretrained, source = build_tiny_inputs(cfg, out, build=False)
    set_seed(cfg.optim.seed)  # LoRA init and data draw from here, after any tiny pipeline was built

    built = setup_models(cfg, pretrained, engine)
    vae_config = built.components.vae.config
    optimizer, scheduler = build_optimizer(built.policy.parameters(), cfg.optim, cfg.optim.max_steps, engine.world)
    unet, optimizer = engine.prepare(built.policy, optimizer)  # the schedule steps once per optimizer step
    precompute_start = time.perf_counter()
    feed, freed_bytes = setup_data(cfg, source, pretrained, built.components, engine)
    precompute_s = time.perf_counter() - precompute_start
    engine.resume(built.policy, optimizer, scheduler, feed)
    if cfg.log_rows:
        keep_rows_before(out / "rows" / f"rank-{engine.rank}.txt", engine.step)

    last = engine.fit(model=unet, policy=built.policy, optimizer=optimizer, scheduler=scheduler, feed=feed,
                      batch_size=cfg.optim.batch_size, step_fn=make_step(cfg, unet, built, vae_config, engine),
                      max_steps=cfg.optim.max_steps, max_grad_norm=cfg.optim.max_grad_norm)

    family = built.components.family
    final = engine.save_final(built.policy, lambda folder: family.save_final(built.policy, folder, built.is_lora))
    result = TrainResult(output_dir=str(out), final=str(final),
                         format="lora" if built.is_lora else family.denoiser_name,
                         pretrained=pretrained, steps=engine.step,
                         resumed_from=str(engine.resume_from) if engine.resume_from else None,
                         pairs_per_step=cfg.optim.batch_size * cfg.optim.gradient_accumulation_steps * engine.world,
                         learning_rate=peak_learning_rate(cfg.optim, engine.world), last_metrics=last,
                         data=feed.stats(), weight_digests=engine.digests(built.policy), num_processes=engine.world)
    summary = engine.finish(dataclasses.asdict(result) | {"precompute_s": precompute_s,
                                                          "precompute_freed_bytes": freed_bytes,
                                                          "metrics": str(engine.metrics_path)})
    return dataclasses.replace(result, process_index=summary["process_index"])


def describe_data(data: dict[str, Any]) -> str:
    """What the data did, as a sentence: pairs used, ties dropped, bad rows by reason and the first one."""
    counts = data.get("caching_pass") or data  # a latent-cache feed reports the pass that read the rows
    if isinstance(counts, list):  # ... one dict per process that cached: add them up
        counts = {"ties_dropped": sum(c.get("ties_dropped", 0) for c in counts),
                  "bad_rows": {r: sum(c.get("bad_rows", {}).get(r, 0) for c in counts)
                               for c in counts for r in c.get("bad_rows", {})},
                  "first_bad": next((c["first_bad"] for c in counts if c.get("first_bad")), None)}
    used = data.get("cached_pairs", counts.get("pairs_used", 0))
    text = f"data: {used} pairs used, {counts.get('ties_dropped', 0)} ties dropped"
    bad = counts.get("bad_rows") or {}
    if bad:
        text += ", bad rows: " + ", ".join(f"{n} {reason}" for reason, n in sorted(bad.items()))
        text += f" (first: {counts.get('first_bad')})"
    return text


def describe(result: TrainResult) -> str:
    """The result in sentences, for the console."""
    return (f"trained {result.steps} steps; final weights ({result.format}): {result.final}; "
            f"metrics: {Path(result.output_dir) / 'metrics.jsonl'}\n{describe_data(result.data)}")


def main(argv: list[str]) -> int:
    result = run(parse_args(TrainConfig, argv, prog="diffusion-dpo train", description=__doc__))
    if result.process_index == 0:
        print(describe(result))
    return 0

