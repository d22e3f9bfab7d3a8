"""Training throughput (pairs/s) and peak memory of ``diffusion-dpo train``.

Two modes:

  A config, run by the recipe itself in a fresh process per variant (so peak memory is that run's alone),
  with and without ``precompute``:

    python scripts/bench_train.py --config assets/configs/tiny.yaml --steps 30 --compare-precompute

  A synthetic Diffusion-DPO step on an SD1.5-sized UNet (the default ``UNet2DConditionModel()`` config,
  860M parameters, random weights) at 512 px, bf16 autocast with fp32 master weights, on a GPU; reports
  pairs/s, peak GiB and model FLOPs utilisation (FLOPs counted by torch's FlopCounterMode, against the GPU's
  dense bf16 peak):

    python scripts/bench_train.py --sd15-unet --batch-size 4 --steps 10

Pairs/s is measured after ``--skip`` warm-up steps. Peak memory is torch.cuda.max_memory_allocated on a GPU,
else the process's peak resident set (which includes the Python/torch import, reported separately).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing
# Dense bf16 tensor-core peaks (vendor datasheets, SXM parts), TFLOP/s.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "4090": 165.0}


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else _rss_gib()


# ------------------------------------------------------------------------------------------ config mode

def run_config_child(spec: dict) -> dict:
    """In a fresh process: train ``spec['steps']`` steps of the config and measure."""
    import torch

    from diffusion_dpo.config import load_config
    from diffusion_dpo.recipes.train import TrainConfig, run

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    rss_after_import = _rss_gib()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = spec["overrides"] + [f"optim.max_steps={spec['steps']}", "log_every=1", "checkpoint_every=0",
                                         f"output_dir={tmp}/run", f"precompute={str(spec['precompute']).lower()}"]
        cfg = load_config(TrainConfig, spec["configs"], overrides)
        start = time.perf_counter()
        summary = run(cfg)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
        feed_ms = feed_time_ms(cfg, summary, spec["precompute"])
    steady = rows[spec["skip"]:]
    step_times = [summary["pairs_per_step"] / r["pairs_per_s"] for r in steady]
    return {"precompute": spec["precompute"], "pairs_per_s": summary["pairs_per_step"] * len(steady) / sum(step_times),
            "step_ms": 1000 * sum(step_times) / len(steady), "precompute_s": summary["precompute_s"],
            "feed_ms": feed_ms, "wall_s": wall, "peak_gib": _peak_gib(), "rss_after_import_gib": rss_after_import,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads()}


def feed_time_ms(cfg, summary: dict, precompute: bool, batches: int = 20) -> float:
    """Milliseconds to produce one encoded batch: the VAE and text encoders on decoded pairs (online), or a
    read from the latent cache (precompute). This is the part of a step that precompute removes."""
    import dataclasses

    import torch

    from diffusion_dpo import models
    from diffusion_dpo.data import PreferencePairs
    from diffusion_dpo.latent_cache import CachedPairs, OnlinePairs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = str(Path(cfg.output_dir) / "tiny" / "pairs") if cfg.data.source == "tiny" else cfg.data.source
    data = PreferencePairs(dataclasses.replace(cfg.data, source=source), seed=cfg.optim.seed)
    if precompute:
        feed = CachedPairs(Path(cfg.output_dir) / "latent_cache", data, seed=cfg.optim.seed, device=device,
                           caption_dropout=cfg.data.caption_dropout, random_flip=cfg.data.random_flip)
    else:
        comps = models.load_components(summary["pretrained"])
        models.freeze_to(comps, device, torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32)
        feed = OnlinePairs(data, comps, device)
    it = feed.batches(cfg.optim.batch_size)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / batches


def config_mode(args, overrides: list[str]) -> list[dict]:
    variants = [False, True] if args.compare_precompute else [args.precompute]
    runs: dict[bool, list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits every variant
        for precompute in variants:
            spec = {"configs": args.config, "overrides": overrides, "steps": args.steps, "skip": args.skip,
                    "precompute": precompute, "threads": args.threads}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            if proc.returncode != 0:
                sys.exit(proc.stderr[-4000:])
            runs[precompute].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    # The median run of each variant by step time (a shared machine's noise is one-sided: slower).
    results = [sorted(r, key=lambda x: x["step_ms"])[len(r) // 2] for r in runs.values()]
    print("| precompute | pairs/s | ms/step | ms/batch to encode or read | caching pass s | "
          "peak memory GiB | of which import GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {str(r['precompute']).lower()} | {r['pairs_per_s']:.1f} | {r['step_ms']:.0f} | "
              f"{r['feed_ms']:.1f} | {r['precompute_s']:.1f} | {r['peak_gib']:.2f} | {r['rss_after_import_gib']:.2f} |")
    return results


# -------------------------------------------------------------------------------------- SD1.5 UNet mode

def _unet_kwargs(args) -> dict:
    # The default UNet2DConditionModel config is SD1.5's UNet except for the text width: SD1.5 cross-attends
    # to CLIP ViT-L/14 states of 768 features (the default says 1280). 859.5M parameters.
    kwargs = {"cross_attention_dim": 768}
    if args.unet_channels:  # a smaller UNet of the same layout, to try the code path on a CPU
        kwargs["block_out_channels"] = tuple(int(c) for c in args.unet_channels.split(","))
    return kwargs


def _dpo_step(unet, reference, scheduler, batch: int, side: int, seed: int, device, autocast_dtype=None):
    """One Diffusion-DPO forward/backward with the recipe's components on random latents and text states."""
    import torch

    from diffusion_dpo.denoising import PairInputs, draw_pair_noise, pair_errors, pair_seeds
    from diffusion_dpo.losses import diffusion_dpo_loss

    g = torch.Generator().manual_seed(seed)
    noise = draw_pair_noise(pair_seeds(0, seed, 0, batch), (4, side, side), 1000, device)
    cross = unet.config.cross_attention_dim
    x = PairInputs(torch.randn(batch, 4, side, side, generator=g).to(device),
                   torch.randn(batch, 4, side, side, generator=g).to(device),
                   torch.randn(batch, 77, cross, generator=g).to(device), noise.noise, noise.timesteps)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with autocast:
        with torch.no_grad():
            ref_w, ref_l = pair_errors(reference, x, scheduler)
        model_w, model_l = pair_errors(unet, x, scheduler)
        loss = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta_dpo=5000)[0].mean()
    loss.backward()
    return loss.detach()


def count_step_flops(args) -> float:
    """Model FLOPs of one DPO step of ``--batch-size`` pairs (reference forward of 2B images, policy forward
    and backward of 2B images), counted by FlopCounterMode on meta tensors: exact, and free without a GPU.
    Gradient-checkpointing recomputation is not counted (model FLOPs, not hardware FLOPs)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel(**_unet_kwargs(args))
    with FlopCounterMode(display=False) as counter:
        _dpo_step(unet, unet, DDPMScheduler(), args.batch_size, args.resolution // 8, 0, meta)
    return counter.get_total_flops()


def sd15_mode(args) -> dict:
    """Synthetic full fine-tune Diffusion-DPO steps on an SD1.5-sized UNet: fp32 master weights, bf16
    autocast and a bf16 frozen reference on a GPU (fp32 on a CPU), AdamW, grad-norm clipping."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from diffusion_dpo import models

    flops = count_step_flops(args)
    result = {"resolution": args.resolution, "batch_pairs": args.batch_size, "tflop_per_step": flops / 1e12}
    if args.flops_only:
        print(json.dumps(result, indent=1))
        return result
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else None
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_unet_kwargs(args)).to(device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    reference = models.frozen_copy(unet, dtype or torch.float32)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    scheduler = DDPMScheduler()

    def step(i: int) -> None:
        _dpo_step(unet, reference, scheduler, args.batch_size, args.resolution // 8, i, device, dtype)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.skip):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        step(args.skip + i)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    result |= {"device": name, "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
               "dtype": str(dtype or torch.float32), "gradient_checkpointing": args.gradient_checkpointing,
               "pairs_per_s": args.batch_size / seconds, "step_s": seconds,
               "achieved_tflops": flops / seconds / 1e12, "peak_gib": _peak_gib(),
               "mfu": flops / seconds / (peak * 1e12) if peak and cuda else None}
    print(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", action="append", default=[], help="train config YAML (repeatable)")
    parser.add_argument("--steps", type=int, default=30, help="measured optimizer steps")
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of pairs/s")
    parser.add_argument("--precompute", action="store_true", help="benchmark with precompute=true")
    parser.add_argument("--compare-precompute", action="store_true", help="run both with and without it")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant; the median is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--sd15-unet", action="store_true", help="synthetic steps on an SD1.5-sized UNet")
    parser.add_argument("--resolution", type=int, default=512, help="--sd15-unet: image side in pixels")
    parser.add_argument("--batch-size", type=int, default=1, help="--sd15-unet: pairs per step")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="--sd15-unet: recompute activations")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak for MFU (0: from the GPU name)")
    parser.add_argument("--flops-only", action="store_true", help="--sd15-unet: count the step's FLOPs only")
    parser.add_argument("--unet-channels", default="", help="--sd15-unet: override block_out_channels, e.g. "
                        "32,64,64,64, to try the code path on a CPU (not an SD1.5-sized measurement)")
    args, overrides = parser.parse_known_args()
    if args.child:
        print(json.dumps(run_config_child(json.loads(args.child))))
    elif args.sd15_unet:
        sd15_mode(args)
    else:
        if not args.config:
            parser.error("give --config FILE (and key=value overrides) or --sd15-unet")
        config_mode(args, overrides)


if __name__ == "__main__":
    main()
