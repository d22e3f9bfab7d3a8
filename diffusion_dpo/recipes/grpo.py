"""``diffusion-dpo grpo``: online reward tuning of a text-to-image denoiser (GRPO, online Diffusion-DPO, or
DiffusionNFT), for every model family (SD1.x/2.x and SDXL sample with DDIM at eta > 0, SD3 and FLUX.1 with the flow SDE).

    diffusion-dpo grpo model.pretrained=tiny scorer.name=jpeg_incompressibility optim.max_steps=20
    accelerate launch --num_processes 8 -m diffusion_dpo grpo --config my_grpo.yaml

Each step, per process: a batch of prompts (a seeded order that resumes exactly); G images per prompt sampled by
the current policy with classifier-free guidance, every transition's log-prob recorded; one reward per image
from the scorer; advantages per prompt group (Flow-GRPO eq. 4) or over the batch. Then ``online.inner_epochs``
passes over K of the T transitions of every image (chosen per image, seeded), each pass shuffled and cut into
``online.updates_per_epoch`` optimizer steps that accumulate over micro-batches of ``optim.batch_size`` rows:

    grpo        the clipped importance-ratio loss per transition plus kl_coef x the KL of the policy's to the
                reference's transition (Flow-GRPO eq. 6)
    online_dpo  Diffusion-DPO (Wallace et al. 2023, eq. 14) on the best vs the worst image of each group, with
                shared noise per pair, as ``train`` computes it; the reference is the starting policy, or the
                policy as it was at the last refresh (every ``online.ref_refresh_every`` steps)
    nft         DiffusionNFT (Zheng et al. 2025): images from the deterministic sampler run by a trailing old
                policy, each noised afresh at K of its steps; the forward-process loss of the implicit
                positive and negative policies (online.nft)

The methods are objects in ``online.methods``; this recipe only samples, scores and steps the optimizer.
The reference (``online.reference``): adapter (LoRA): the adapter switched off, or with refreshes a second
frozen adapter on the same base; copy: a frozen full copy of the denoiser.

Writes into ``output_dir``: config.yaml, metrics.jsonl and tensorboard logs (reward mean/std, KL, clip
fraction, approx KL, zero-spread groups, image statistics, loss, lr), checkpoints/step-N/ (N counts optimizer
steps), eval/step-N/ (held-out win rate against the base with its 95% interval, grids), final/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from copy import deepcopy as copy_module
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from diffusion_dpo import models
from diffusion_dpo.config import parse_args
from diffusion_dpo.engine import Engine, ExampleFeed, releases_output_dir, sharding
from diffusion_dpo.errors import InputError
from diffusion_dpo.evaluation.video import CONSISTENCY, frame_consistency
from diffusion_dpo.labeling.scoring import shown
from diffusion_dpo.online.advantages import group_advantages, tied_groups, weighted_advantages
from diffusion_dpo.online.methods import METHODS, OnlineMethod
from diffusion_dpo.online.monitors import batch_means, image_statistics
from diffusion_dpo.online.rollout import Conditioning, guided_predict, rollout, sampling_schedule
from diffusion_dpo.online.samples import CHOICE, GROUP_START, IMAGES, Samples, stream_seeds
from diffusion_dpo.online.windows import window_mask, window_start
from diffusion_dpo.pipeline_config import PipelineSection, SamplingSection
from diffusion_dpo.recipes.grpo_config import GrpoConfig
from diffusion_dpo.reference import AdapterOff, SecondAdapter
from diffusion_dpo.tiny import TINY

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------- set-up

@dataclass
class Built:
    comps: models.Components
    policy: torch.nn.Module  # the denoiser being trained (unwrapped)
    reference: Any  # AdapterOff, SecondAdapter or FrozenCopy; None when no loss term needs one
    is_lora: bool
    noise: Any  # the family's noise process (online_dpo's denoising errors)
    schedule: Any  # DDIMSchedule or FlowSDESchedule
    size: tuple[int, int]  # image (H, W) in px
    latent_shape: tuple[int, ...]  # (C, h, w), or a video family's (C, F', h, w)


def resolve_pretrained(cfg: GrpoConfig, engine: Engine) -> str:
    """model.pretrained, or the tiny pipeline it names, built once into output_dir/tiny/."""
    from scorers.hub import looks_local

    name = cfg.model.pretrained
    if name in TINY:
        folder = engine.out / "tiny" / name
        if engine.is_main and not (folder / "model_index.json").is_file():
            from diffusion_dpo.tiny import build_tiny_pipeline

            build_tiny_pipeline(folder, family=TINY[name], resolution=cfg.sampling.resolution or 32)
        engine.accelerator.wait_for_everyone()
        return str(folder)
    if looks_local(name) and not Path(name).expanduser().exists():
        raise InputError(f"config key 'model.pretrained': {name} does not exist (expected a diffusers pipeline "
                         f"folder, a hub id owner/name, or one of {', '.join(TINY)})")
    return name


def setup_models(cfg: GrpoConfig, pretrained: str, engine: Engine) -> Built:
    """Frozen VAE and text encoders in the compute dtype; the trained weights in fp32; reference; sampler.
    Under parallel.strategy=fsdp the denoiser is sharded by its family's blocks (a LoRA run's frozen base kept
    fp32: the shards are cast to the compute dtype block by block), a frozen copy kept as parallel.frozen says,
    and every forward (rollout, update, reference) gathers one block at a time on every process together."""
    m, device, dtype = cfg.model, engine.device, engine.compute_dtype
    comps = models.load_components(pretrained, revision=m.revision, variant=m.variant, vae=m.vae,
                                   expert=m.expert)
    models.freeze_to(comps, device, dtype)
    denoiser = comps.denoiser
    is_lora = m.lora_rank > 0
    if is_lora:  # the base is frozen in the compute dtype; only the adapter trains, in fp32
        models.move(denoiser, device, torch.float32 if engine.sharded else dtype)
        models.attach_lora(denoiser, m.lora_rank, m.lora_alpha, m.lora_targets or list(comps.family.lora_targets))
        for p in models.trainable_parameters(denoiser):
            p.data = p.data.float()
    else:
        denoiser.to(device)
    reference = build_reference(cfg, denoiser, engine, comps.family)
    if m.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    denoiser = engine.shard(denoiser, comps.family.shard_blocks(denoiser))  # before the optimizer is built
    side = cfg.sampling.resolution or comps.family.default_resolution(comps.vae.config)
    latent_shape = comps.family.latent_shape(comps.vae.config, side, cfg.sampling.num_frames)
    latent_hw = latent_shape[-2:]
    s = cfg.sampling
    schedule = sampling_schedule(comps, num_inference_steps=s.num_inference_steps, eta=s.eta,
                                 noise_level=s.noise_level, latent_hw=latent_hw, sde=s.sde)
    return Built(comps, denoiser, reference, is_lora, comps.family.noise_process(comps.noise_scheduler, cfg.noise),
                 schedule, (side, side), latent_shape)


def build_reference(cfg: GrpoConfig, denoiser: torch.nn.Module, engine: Engine, family):
    """The reference as online.reference says (the config refused adapter for a full fine-tune); None when
    neither the method nor the KL needs one. Built before the denoiser is sharded: a frozen copy is sharded
    (or offloaded) by ``engine.keep_frozen``, a second adapter is sharded with the policy it sits on."""
    if not cfg.needs_reference():
        return None
    if cfg.reference_kind() == "copy":
        # online_dpo's copy stays fp32: ref_refresh_every moves it to the (fp32) policy
        copy = (copy_module(denoiser) if cfg.method == "online_dpo"
                else models.frozen_copy(denoiser, engine.compute_dtype))
        return engine.keep_frozen(copy, family.shard_blocks(copy))
    if cfg.method == "online_dpo" and cfg.online.ref_refresh_every:
        return SecondAdapter(denoiser)
    return AdapterOff(denoiser)  # the starting policy: the adapter's B matrices start at zero


def guidance_scale(cfg: GrpoConfig, built: Built) -> float:
    """sampling.guidance_scale, or when null the family's (its unguided_scale for nft, CFG-free as
    DiffusionNFT): one value for rollout, update and evaluation."""
    if cfg.sampling.guidance_scale is not None:
        return cfg.sampling.guidance_scale
    family = built.comps.family
    return family.unguided_scale if cfg.method == "nft" else family.online_guidance_scale  # NFT: CFG-free


def load_reward(cfg: GrpoConfig, device):
    """The scorer, loaded once (device defaults to this process's)."""
    import scorers

    options = {"device": str(device)} | cfg.scorer.load_options()
    try:
        scorer = scorers.load_scorer(cfg.scorer.name, **options)
    except (OSError, TypeError) as e:  # missing weights, an option the scorer does not take
        raise InputError(f"cannot load scorer {cfg.scorer.name!r} with options {shown(options)}: {e}") from None
    if cfg.online.reward_normalization == "per_reward" and not hasattr(scorer, "score_parts"):
        raise InputError(f"config key 'online.reward_normalization': per_reward normalises each part of a "
                         f"weighted reward, scorer.name=combo with scorer.options.parts; {cfg.scorer.name!r} is one "
                         "reward: use weighted_sum")
    return scorer


def load_prompt_texts(cfg: GrpoConfig) -> list[str]:
    from diffusion_dpo.evaluation.prompts import load_prompts

    texts = [p.text for p in load_prompts(cfg.prompts.source)][:cfg.prompts.max_prompts]
    if not texts:
        raise InputError(f"config key 'prompts.source': {cfg.prompts.source} holds no prompts")
    return texts


# --------------------------------------------------------------------------------------------- sampling

def step_schedule(cfg: GrpoConfig, schedule, step: int, *, stochastic: bool = True):
    """The sampler of sampling step ``step``: noise on every step, only on this step's SDE window (the same on
    every process, drawn from the run seed and the step), or on none (``stochastic`` false: the ODE / DDIM)."""
    o = cfg.online
    if not stochastic:
        return dataclasses.replace(schedule, window=torch.zeros(schedule.num_steps, dtype=torch.bool))
    if not o.sde_window_size:
        return schedule
    start = window_start(o.sde_window, step, size=o.sde_window_size, eligible=cfg.eligible_steps(),
                         start=o.sde_window_start, stride=o.sde_window_stride, shift_every=o.sde_window_shift_every,
                         seed=cfg.optim.seed)
    return dataclasses.replace(schedule, window=window_mask(schedule.num_steps, start, o.sde_window_size))


def collect(cfg: GrpoConfig, engine: Engine, built: Built, method: OnlineMethod, scorer, prompts: list[str],
            step: int) -> Samples:
    """Sample G images per prompt with the method's sampling policy (the current one, or NFT's old one) and
    sampler (stochastic, or deterministic for NFT), score them once each, and normalise the rewards."""
    g = cfg.online.group_size
    cond = Conditioning.of(built.comps, prompts, guidance_scale=guidance_scale(cfg, built), size=built.size,
                           repeat=g)
    seeds = stream_seeds(cfg.optim.seed, step, engine.rank, IMAGES, len(prompts) * g)
    # a group sharing its starting noise differs only by the sampler's noise, the noise whose steps are trained
    starts = ([s for s in stream_seeds(cfg.optim.seed, step, engine.rank, GROUP_START, len(prompts)) for _ in range(g)]
              if cfg.online.shared_start_noise else None)
    schedule = step_schedule(cfg, built.schedule, step, stochastic=method.stochastic_sampling)
    with torch.no_grad(), engine.accelerator.autocast(), method.sampling_weights() as policy:
        predict = guided_predict(built.comps.family, policy, schedule, cond)
        roll = rollout(predict, schedule, built.comps.vae, seeds, built.latent_shape, engine.device, starts)
    images = roll.images.cpu()
    per_image = [p for p in prompts for _ in range(g)]
    keys = [i // g for i in range(len(per_image))]
    frames, per_frame = video_frames(images, per_image)
    if cfg.online.reward_normalization == "per_reward":  # each part normalised on its own, then weighted
        parts = {k: frame_mean(v, len(per_image)).float().to(engine.device)
                 for k, v in scorer.score_parts(frames, per_frame).items()}
        weights = {name: weight for name, weight, _ in scorer.parts}
        rewards = sum(weights[k] * parts[k] for k in parts)
        values = weighted_advantages({k: advantages_of(cfg, engine, v, keys)[0] for k, v in parts.items()},
                                     weights)
        zero_spread = tied_groups(list(parts.values()), g)
    elif images.ndim == 5 and getattr(scorer, "scores_videos", False):  # judged whole (motion: shapes_video)
        rewards = scorer.score_videos(images, per_image).float().to(engine.device)
        values, zero_spread = advantages_of(cfg, engine, rewards, keys)
    else:
        rewards = frame_mean(scorer.score(frames, per_frame), len(per_image)).float().to(engine.device)
        values, zero_spread = advantages_of(cfg, engine, rewards, keys)
    clip = cfg.online.advantage_clip
    consistency = frame_consistency(images) if images.ndim == 5 else None  # videos: beside the frame mean
    return Samples(prompts, cond, roll.trajectory, schedule, rewards, values.clamp(-clip, clip), zero_spread, frames,
                   consistency)


def video_frames(images: Tensor, prompts: list[str]) -> tuple[Tensor, list[str]]:
    """Images [N, 3, H, W] and their prompts as they are; videos [N, 3, F, H, W] as their N F frames
    [N F, 3, H, W] (video 0's frames first), each with its video's prompt, for the image scorers."""
    if images.ndim == 4:
        return images, prompts
    f = images.shape[2]
    return images.transpose(1, 2).flatten(0, 1), [p for p in prompts for _ in range(f)]


def frame_mean(scores: Tensor, n: int) -> Tensor:
    """Per-video rewards [n]: the mean of each video's frame scores ([n F], from :func:`video_frames`); image
    scores [n] as they are."""
    return scores.view(n, -1).mean(dim=1)


def advantages_of(cfg: GrpoConfig, engine: Engine, rewards: Tensor, keys: list[int]) -> tuple[Tensor, int]:
    """This process's advantages [N] of ``rewards`` [N] (its groups ``keys``) as online.advantage_scope says,
    and how many of its groups had equal rewards."""
    if cfg.online.advantage_scope == "batch":  # over every process's batch, then this process's share
        adv = group_advantages(engine.accelerator.gather(rewards), [], scope="batch")
        return adv.values.view(engine.world, -1)[engine.rank], adv.zero_spread_groups
    batch_std = None  # per prompt group; group_batch_std divides by the std of every process's rewards
    if cfg.online.advantage_scope == "group_batch_std":
        batch_std = float(engine.accelerator.gather(rewards).float().std(unbiased=False))
    adv = group_advantages(rewards, keys, scope=cfg.online.advantage_scope, batch_std=batch_std)
    return adv.values, adv.zero_spread_groups


# ------------------------------------------------------------------------------------------- update

def micro_batches(cfg: GrpoConfig, total: int, step: int, rank: int, epoch: int):
    """A seeded shuffle of a step's ``total`` rows for inner epoch ``epoch``, cut into micro-batches of
    optim.batch_size."""
    g = torch.Generator().manual_seed(stream_seeds(cfg.optim.seed, step, rank, CHOICE, epoch + 2)[-1])
    return iter(torch.randperm(total, generator=g).split(cfg.optim.batch_size))


# ------------------------------------------------------------------------------------------- monitoring

def process_mean(engine: Engine, values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the processes (every process passes the same names)."""
    if engine.world == 1 or not values:
        return values
    names = sorted(values)
    means = engine.accelerator.reduce(torch.tensor([values[k] for k in names], device=engine.device),
                                      reduction="mean")
    return dict(zip(names, means.tolist()))


def sample_metrics(engine: Engine, samples: Samples) -> dict[str, float]:
    """Reward mean/std over every process's images, zero-spread groups (summed), image statistics (means)."""
    rewards = engine.accelerator.gather(samples.rewards)
    spread = torch.tensor([float(samples.zero_spread_groups)], device=engine.device)
    if engine.world > 1:
        spread = engine.accelerator.reduce(spread, reduction="sum")
    stats = process_mean(engine, batch_means(image_statistics(samples.images)))
    video = {} if samples.frame_consistency is None else process_mean(  # beside the frame-mean reward
        engine, {CONSISTENCY: float(samples.frame_consistency.mean())})
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)), **video,
            "zero_spread_groups": float(spread.item()), **{f"image/{k}": v for k, v in stats.items()}}


def evaluate_policy(cfg: GrpoConfig, engine: Engine, built: Built, pretrained: str, label: str,
                    final: Optional[Path] = None) -> dict[str, float]:
    """The held-out evaluation (``diffusion-dpo evaluate``: same seeds for both, the pipeline's own sampler)
    of the policy against the base into output_dir/eval/<label>/; returns the logged numbers (main process).
    The policy's weights (the EMA's with eval.use_ema) are written to eval/<label>/weights first, unless
    ``final`` (final/) holds them already: it holds the EMA exactly when ema.final."""
    from diffusion_dpo.evaluation import paired

    folder = engine.out / "eval" / label
    use_ema = cfg.eval.use_ema and engine.ema is not None
    weights = final if final is not None and use_ema == (engine.ema is not None and cfg.ema.final) else None
    if weights is None:
        weights = folder / "weights"
        # the EMA swapped in first, then (under fsdp) the whole weights gathered onto the main process
        gather = sharding.gathered(built.policy) if engine.sharded else contextlib.nullcontext(built.policy)
        with engine.ema.swapped_in() if use_ema else contextlib.nullcontext(), gather as whole:
            if engine.is_main:
                built.comps.family.save_final(whole, weights, built.is_lora)
    if engine.is_main and engine.ema is not None:
        print(f"eval {label}: the {'EMA' if use_ema else 'trained'} weights", flush=True)
    if engine.is_main:  # the base's images are the same at every evaluation: generated once
        for earlier in sorted((engine.out / "eval").glob("*/images/base")):
            paired.reuse_base_images(earlier.parent.parent, folder)
    engine.accelerator.wait_for_everyone()
    e, name = cfg.eval, cfg.scorer.name
    result = paired.run(paired.EvaluateConfig(
        model=PipelineSection(pretrained=pretrained, lora=str(weights) if built.is_lora else None,
                                   denoiser=None if built.is_lora else str(weights)),
        prompts=e.prompts, seeds=e.seeds, seed=cfg.optim.seed, scorers=[name],
        scorer_options={name: cfg.scorer.load_options()},
        sampling=SamplingSection(num_inference_steps=e.num_inference_steps or cfg.sampling.num_inference_steps,
                                         guidance_scale=guidance_scale(cfg, built), height=built.size[0],
                                         width=built.size[1]),
        batch_size=e.batch_size, n_boot=e.n_boot, grid_prompts=e.grid_prompts, output_dir=str(folder),
        resume="auto", mixed_precision=cfg.mixed_precision), desc=f"eval {label}")
    if not engine.is_main:
        return {}
    c = result.scorers[name]
    which = {"eval/ema_weights": float(use_ema)} if engine.ema is not None else {}
    return {"eval/win_rate": c.win_rate, "eval/win_rate_lo": c.win_rate_ci[0], "eval/win_rate_hi": c.win_rate_ci[1],
            "eval/base_mean": c.base_mean, "eval/tuned_mean": c.tuned_mean} | which


# ---------------------------------------------------------------------------------------------- run

@dataclass
class GrpoResult:
    output_dir: str
    final: str
    format: str  # "lora", "unet" or "transformer"
    pretrained: str
    steps: int  # sampling steps
    optimizer_steps: int
    images_generated: int  # by the policy during training, all processes (evaluation not counted)
    resumed_from: Optional[str]
    last_metrics: dict[str, float]
    evaluation: dict[str, float]  # the last evaluation's numbers (empty without eval.prompts)
    weight_digests: list[str]
    num_processes: int = 1
    process_index: int = 0


@releases_output_dir
def run(cfg: GrpoConfig) -> GrpoResult:
    """Tune as ``cfg`` says: sample, score, update, log, checkpoint, evaluate; save final/."""
    from accelerate.utils import set_seed

    from diffusion_dpo.engine import build_optimizer

    o, inner = cfg.online, cfg.optimizer_steps_per_step()
    engine = Engine(cfg, seed=cfg.optim.seed, gradient_accumulation_steps=cfg.rows_per_update() // cfg.optim.batch_size,
                    unit="rows", name="grpo", run_files=("eval", "tiny"))
    cfg = engine.cfg
    pretrained = resolve_pretrained(cfg, engine)
    set_seed(cfg.optim.seed)  # LoRA init from here, after any tiny pipeline was built
    built = setup_models(cfg, pretrained, engine)
    scorer = load_reward(cfg, engine.device)
    feed = ExampleFeed(load_prompt_texts(cfg), list, seed=cfg.optim.seed, rank=engine.rank, world=engine.world,
                       name=f"prompts {cfg.prompts.source}")
    optimizer, scheduler = build_optimizer(built.policy.parameters(), cfg.optim, cfg.optim.max_steps * inner,
                                           engine.world)
    model, optimizer = engine.prepare(built.policy, optimizer)

    method = METHODS[cfg.method](cfg, built)
    engine.resume(built.policy, optimizer, scheduler, feed, extra=method.load_state_dict)
    params = [p for p in model.parameters() if p.requires_grad]
    prompt_batches = feed.batches(o.prompts_per_step)
    last, evaluation = {}, {}
    while engine.step < cfg.optim.max_steps * inner:
        step = engine.step // inner
        method.before_sampling(step)
        start = time.perf_counter()
        samples = collect(cfg, engine, built, method, scorer, next(prompt_batches), step)
        sampled = time.perf_counter()
        total, loss = method.update(model, samples, step, engine.rank)
        sums, good = {}, 0
        for epoch in range(o.inner_epochs):
            batches = micro_batches(cfg, total, step, engine.rank, epoch)
            for _ in range(o.updates_per_epoch):
                metrics = engine.optimizer_step(model, params, optimizer, scheduler, batches,
                                                lambda index, ctx: loss(index), cfg.optim.max_grad_norm)
                if metrics is not None:
                    good += 1
                    sums = {k: sums.get(k, 0.0) + float(v) for k, v in metrics.items() if k != "units"}
        method.after_update(step)
        trained = time.perf_counter()
        n_images = len(samples.rewards) * engine.world
        last = {"step": engine.step, "sampling_step": step + 1, **sample_metrics(engine, samples),
                **process_mean(engine, {k: v / max(good, 1) for k, v in sums.items()}),
                "lr": scheduler.get_last_lr()[0], "nonfinite_steps": engine.nonfinite_steps,
                "images_per_s_sampled": n_images / max(sampled - start, 1e-9),
                "images_per_s_trained": n_images * o.inner_epochs / max(trained - sampled, 1e-9)}
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.optim.max_steps:
            engine.log({k: v for k, v in last.items() if k != "step"})
        if engine.is_main:
            print(f"grpo step {step + 1}/{cfg.optim.max_steps}: reward {last['reward_mean']:.4f} "
                  f"(std {last['reward_std']:.4f}), loss {last.get('loss', float('nan')):.4g}", flush=True)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            engine.save_checkpoint(built.policy, optimizer, scheduler, feed, method.state_dict())
        if cfg.eval.prompts and cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < cfg.optim.max_steps:
            evaluation = evaluate_policy(cfg, engine, built, pretrained, f"step-{engine.step}")
            engine.log(evaluation)

    family = built.comps.family
    final = engine.save_final(built.policy, lambda folder: family.save_final(built.policy, folder, built.is_lora))
    if cfg.eval.prompts:
        evaluation = evaluate_policy(cfg, engine, built, pretrained, "final", final=final)
        engine.log(evaluation)
    steps = engine.step // inner
    result = GrpoResult(
        output_dir=str(engine.out), final=str(final), format="lora" if built.is_lora else family.denoiser_name,
        pretrained=pretrained, steps=steps, optimizer_steps=engine.step,
        images_generated=steps * o.prompts_per_step * o.group_size * engine.world,
        resumed_from=str(engine.resume_from) if engine.resume_from else None, last_metrics=last,
        evaluation=evaluation, weight_digests=engine.digests(built.policy), num_processes=engine.world)
    summary = engine.finish(dataclasses.asdict(result) | {"metrics": str(engine.metrics_path)})
    return dataclasses.replace(result, process_index=summary["process_index"])


def describe(result: GrpoResult) -> str:
    """The result in sentences, for the console."""
    text = (f"tuned {result.steps} steps ({result.images_generated} images generated); final weights "
            f"({result.format}): {result.final}; metrics: {Path(result.output_dir) / 'metrics.jsonl'}")
    if result.evaluation:
        ev = result.evaluation
        text += (f"\nheld-out win rate over the base: {100 * ev['eval/win_rate']:.1f}% "
                 f"[{100 * ev['eval/win_rate_lo']:.1f}, {100 * ev['eval/win_rate_hi']:.1f}]")
    return text


def main(argv: list[str]) -> int:
    result = run(parse_args(GrpoConfig, argv, prog="diffusion-dpo grpo", description=__doc__))
    if result.process_index == 0:
        print(describe(result))
    return 0

