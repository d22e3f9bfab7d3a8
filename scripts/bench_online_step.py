"""One online step (sampling with log-probs, then the update) of ``diffusion-dpo grpo`` side by side with
flow_grpo's own SDE-with-logprob step, on the same tiny SD3, in separate processes you time yourself.

    python scripts/bench_online_step.py --impl ours --cache /tmp/tiny-sd3-bench --threads 1
    python scripts/bench_online_step.py --impl flow_grpo --flow-grpo /path/to/flow_grpo --cache /tmp/tiny-sd3-bench --threads 1

Both do the same work with the same seeds: encode P prompts, sample G images each with T steps of the
Flow-GRPO SDE (noise level 0.7, classifier-free guidance) recording every latent and log-prob, decode them,
score them (mean brightness, no weights) and normalise the rewards per group; then recompute the log-probs of
K transitions per image (the same K steps both ways, one micro-batch of P x G rows per k) under the current
weights with guidance (unconditional branch detached, as flow_grpo's train script does), backward the
clipped-ratio loss (``online.objective.grpo_transition_loss``, KL weight 0) and take one AdamW step on the whole
transformer. ``ours`` runs ``online.rollout`` and ``online.trajectory.transition_logprob``; ``flow_grpo`` runs
the checkout's ``pipeline_with_logprob`` and ``sde_step_with_logprob`` (the checkout is put on sys.path for this
process only, never copied). Prints one JSON line: sample_s, update_s, total_s (their sum), measured inside
the process after the models are loaded; the whole process can be timed from outside.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402

PROMPTS = ("a photo of a red circle", "a painting of a blue square", "a green tree in a city",
           "a black cat on a house")


def tiny_sd3(cache: Path, resolution: int) -> Path:
    """The tiny SD3 pipeline folder in ``cache``, built on first use (seed 0, so always the same weights)."""
    from diffusion_dpo.tiny import build_tiny_pipeline

    path = cache / f"tiny-sd3-{resolution}px"
    if not (path / "model_index.json").exists():
        build_tiny_pipeline(path, family="sd3", resolution=resolution)
    return path


def start_noise(seeds: list[int], latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """Each image's starting noise [N, C, h, w], drawn first from its own seeded generator (as our rollout does)."""
    from diffusion_dpo.online.rollout import image_seed_generators

    return torch.stack([torch.randn(latent_shape, generator=g) for g in image_seed_generators(seeds)])


def brightness_advantages(images: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group normalised mean brightness [N] of images [N, 3, H, W] in [0, 1] (prompt i's G images in a row)."""
    from diffusion_dpo.online.advantages import group_advantages

    rewards = images.float().mean(dim=(1, 2, 3))
    keys = [i // group_size for i in range(len(rewards))]
    return group_advantages(rewards, keys).values


def clipped_loss(new_logprob, old_logprob, advantages, clip_range: float) -> torch.Tensor:
    """The mean clipped-ratio loss of one micro-batch (no KL term), the same function both ways."""
    from diffusion_dpo.online.objective import grpo_transition_loss

    losses, _ = grpo_transition_loss(new_logprob, old_logprob, advantages, torch.zeros_like(new_logprob),
                                     clip_range=clip_range, kl_coef=0.0)
    return losses.mean()


def step_choice(args, n: int) -> torch.Tensor:
    """The K trained steps of each image, long [N, K] (the same seed both ways)."""
    from diffusion_dpo.online.step_choice import choose_steps

    return choose_steps(n, args.steps, args.train_steps, args.seed)


def run_ours(args, path: Path) -> dict:
    from diffusion_dpo.models import load_components
    from diffusion_dpo.online.rollout import Conditioning, guided_predict, rollout, sampling_schedule
    from diffusion_dpo.online.trajectory import gather_steps, transition_logprob

    comps = load_components(str(path))
    denoiser = comps.denoiser.requires_grad_(True)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=args.lr)
    prompts, n, g, k = list(PROMPTS[:args.prompts]), args.prompts * args.group_size, args.group_size, args.train_steps
    latent_hw = (args.resolution // 2, args.resolution // 2)  # the tiny VAE downsamples by 2
    latent_shape = (denoiser.config.in_channels, *latent_hw)
    seeds = [args.seed + i for i in range(n)]

    start = time.perf_counter()
    schedule = sampling_schedule(comps, num_inference_steps=args.steps, eta=1.0, noise_level=args.noise_level,
                                 latent_hw=latent_hw)
    cond = Conditioning.of(comps, prompts, guidance_scale=args.guidance, size=(args.resolution,) * 2, repeat=g)
    roll = rollout(guided_predict(comps.family, denoiser, schedule, cond), schedule, comps.vae, seeds,
                   latent_shape, "cpu")
    advantages = brightness_advantages(roll.images, g)
    sampled = time.perf_counter()

    steps = step_choice(args, n)
    x, x_next, old = gather_steps(roll.trajectory, steps)  # row i * K + j: image i's j-th chosen step
    step_index, image = steps.flatten(), torch.arange(n).repeat_interleave(k)
    for j in range(k):
        rows = torch.arange(n) * k + j
        predict = guided_predict(comps.family, denoiser, schedule, cond.rows(image[rows]), detach_uncond=True)
        new = transition_logprob(schedule, x[rows], x_next[rows], predict(x[rows], step_index[rows]),
                                 step_index[rows])
        (clipped_loss(new.logprob, old[rows], advantages[image[rows]], args.clip_range) / k).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"sample_s": sampled - start, "update_s": time.perf_counter() - sampled}


def load_peer(checkout: str):
    """flow_grpo's (pipeline_with_logprob, sde_step_with_logprob) from a checkout, imported in place."""
    root = Path(checkout)
    if not (root / "flow_grpo" / "diffusers_patch" / "sd3_sde_with_logprob.py").exists():
        sys.exit(f"--flow-grpo {checkout}: no flow_grpo/diffusers_patch/sd3_sde_with_logprob.py there; expected a "
                 "checkout of github.com/yifan123/flow_grpo")
    sys.path.insert(0, str(root))
    from flow_grpo.diffusers_patch.sd3_pipeline_with_logprob import pipeline_with_logprob
    from flow_grpo.diffusers_patch.sd3_sde_with_logprob import sde_step_with_logprob

    return pipeline_with_logprob, sde_step_with_logprob


def peer_guided(transformer, x, t, embeds, pooled, guidance: float) -> torch.Tensor:
    """The guided velocity of rows x [B, ...] at timesteps t [B] as flow_grpo's compute_log_prob forms it:
    one batch of 2B (unconditional first), the unconditional half detached."""
    out = transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]), encoder_hidden_states=embeds,
                      pooled_projections=pooled, return_dict=False)[0]
    uncond, text = out.chunk(2)
    uncond = uncond.detach()
    return uncond + guidance * (text - uncond)


def run_peer(args, path: Path) -> dict:
    from diffusers import StableDiffusion3Pipeline

    pipeline_with_logprob, sde_step_with_logprob = load_peer(args.flow_grpo)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer.requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr)
    prompts, n, g, k = list(PROMPTS[:args.prompts]), args.prompts * args.group_size, args.group_size, args.train_steps
    latent_shape = (transformer.config.in_channels, args.resolution // 2, args.resolution // 2)
    latents = start_noise([args.seed + i for i in range(n)], latent_shape)
    t5_length = min(256, pipe.tokenizer_3.model_max_length)  # what our SD3 family encodes

    start = time.perf_counter()
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, num_images_per_prompt=g, device=torch.device("cpu"),
            do_classifier_free_guidance=True, max_sequence_length=t5_length)
    torch.manual_seed(args.seed)  # the peer draws its step noise from the global generator
    images, all_latents, all_logprobs = pipeline_with_logprob(
        pipe, prompt_embeds=embeds, negative_prompt_embeds=neg_embeds, pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=neg_pooled, height=args.resolution, width=args.resolution,
        num_inference_steps=args.steps, guidance_scale=args.guidance, latents=latents,
        noise_level=args.noise_level, output_type="pt", max_sequence_length=t5_length)
    advantages = brightness_advantages(images, g)
    sampled = time.perf_counter()

    trajectory, logprobs = torch.stack(all_latents, dim=1), torch.stack(all_logprobs, dim=1)
    timesteps = pipe.scheduler.timesteps
    steps, rows = step_choice(args, n), torch.arange(n)
    both_embeds, both_pooled = torch.cat([neg_embeds, embeds]), torch.cat([neg_pooled, pooled])
    for j in range(k):
        cols = steps[:, j]
        x, x_next, t = trajectory[rows, cols], trajectory[rows, cols + 1], timesteps[cols]
        velocity = peer_guided(transformer, x, t, both_embeds, both_pooled, args.guidance)
        _, new, _, _ = sde_step_with_logprob(pipe.scheduler, velocity.float(), t, x.float(),
                                             noise_level=args.noise_level, prev_sample=x_next.float())
        (clipped_loss(new, logprobs[rows, cols], advantages, args.clip_range) / k).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"sample_s": sampled - start, "update_s": time.perf_counter() - sampled}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=("ours", "flow_grpo"), required=True)
    p.add_argument("--flow-grpo", help="path of a flow_grpo checkout (required with --impl flow_grpo)")
    p.add_argument("--cache", default="bench-cache", help="folder holding the tiny SD3 pipeline (built once)")
    p.add_argument("--prompts", type=int, default=2, choices=range(1, len(PROMPTS) + 1), help="prompts P")
    p.add_argument("--group-size", type=int, default=4, help="images per prompt G")
    p.add_argument("--steps", type=int, default=10, help="sampling steps T")
    p.add_argument("--train-steps", type=int, default=2, help="trained transitions per image K")
    p.add_argument("--resolution", type=int, default=32, help="image size in px")
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale")
    p.add_argument("--noise-level", type=float, default=0.7, help="the SDE's noise level a")
    p.add_argument("--clip-range", type=float, default=1e-4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    if args.impl == "flow_grpo" and not args.flow_grpo:
        p.error("--impl flow_grpo needs --flow-grpo PATH (a checkout of github.com/yifan123/flow_grpo)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = tiny_sd3(Path(args.cache), args.resolution)
    times = (run_ours if args.impl == "ours" else run_peer)(args, path)
    times["total_s"] = times["sample_s"] + times["update_s"]
    print(json.dumps({"impl": args.impl, "P": args.prompts, "G": args.group_size, "T": args.steps,
                      "K": args.train_steps, "px": args.resolution, "threads": args.threads,
                      **{key: round(value, 4) for key, value in times.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
