"""Training throughput (pairs/s) and peak memory of ``diffusion-dpo train``.

Two modes:

  A config, run by the recipe itself in a fresh process per variant (so peak memory is that run's alone),
  with and without ``precompute``:

    python scripts/bench_train.py --config assets/configs/tiny.yaml --steps 30 --compare-precompute

  A synthetic Diffusion-DPO step (full fine-tune, frozen copy as reference) on a real-sized denoiser with
  random weights: SD1.5's UNet at 512 px, or the SD3.5-medium / FLUX.1-dev / Qwen-Image / FLUX.2 [klein] 4B /
  Z-Image transformers at 1024 px and Wan 2.1 T2V 1.3B's at 81 frames of 480 x 832 (their published configs,
  flow matching), bf16 autocast with fp32 master weights, on a GPU; reports pairs/s,
  peak GiB and model FLOPs utilisation (FLOPs counted by torch's FlopCounterMode, against the GPU's dense
  bf16 peak). --flops-only counts the FLOPs per pair on meta tensors, without a GPU:

    python scripts/bench_train.py --model sd15 --batch-size 4 --steps 10
    python scripts/bench_train.py --model sd35-medium --flops-only
    python scripts/bench_train.py --model flux-dev --gradient-checkpointing --steps 5

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


# ------------------------------------------------------------------------------- synthetic denoiser mode

# Real denoiser configs, written from the published config.json of each checkpoint (nothing is downloaded):
#   sd15: the default UNet2DConditionModel config is SD1.5's UNet except for the text width: SD1.5
#     cross-attends to CLIP ViT-L/14 states of 768 features (the default says 1280). 859.5M parameters.
#   sd35-medium: stabilityai/stable-diffusion-3.5-medium, transformer/config.json (SD3Transformer2DModel,
#     24 MMDiT-X layers, 13 with dual attention, 24 heads x 64, ~2.5B parameters).
#   flux-dev: black-forest-labs/FLUX.1-dev, transformer/config.json (FluxTransformer2DModel, 19 double and
#     38 single blocks, 24 heads x 128, guidance embedding, ~11.9B parameters).
DENOISERS = {
    "sd15": ("UNet2DConditionModel", {"cross_attention_dim": 768}),
    "sd35-medium": ("SD3Transformer2DModel", {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
        "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"}),
    "flux-dev": ("FluxTransformer2DModel", {
        "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56), "guidance_embeds": True, "in_channels": 64,
        "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
        "patch_size": 1, "pooled_projection_dim": 768}),
    # black-forest-labs/FLUX.2-klein-base-4B (and the distilled FLUX.2-klein-4B: one transformer config):
    #   the klein-4b config of diffusers' scripts/convert_flux2_to_diffusers.py (5 double and 20 single
    #   blocks, 24 heads x 128, text 3 x 2560 Qwen3-4B states, no guidance embedding).
    "flux2-klein-4b": ("Flux2Transformer2DModel", {
        "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 7680, "timestep_guidance_channels": 256,
        "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "eps": 1e-6,
        "guidance_embeds": False}),
    # Tongyi-MAI/Z-Image-Turbo, transformer/config.json as quoted verbatim (with its hub URL) by public ports,
    #   e.g. github.com/FiditeNemini/z-image-turbo-mlx; Z-Image (the base) is the undistilled model of the same
    #   architecture (30 layers, 2 noise and 2 context refiners, dim 3840, 30 heads, text 2560 Qwen3 states).
    "z-image": ("ZImageTransformer2DModel", {
        "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
        "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
        "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": (32, 48, 48),
        "axes_lens": (1536, 512, 512)}),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers: the Wan-T2V-1.3B config of diffusers' scripts/convert_wan_to_diffusers.py
    #   (30 blocks, 12 heads x 128, FFN 8960, UMT5 text 4096).
    "wan21-t2v-1.3b": ("WanTransformer3DModel", {
        "patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
        "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
        "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "added_kv_proj_dim": None}),
}
# Per model: family, latent channels, text conditioning shapes per caption (the real encoders' widths and
# the pipelines' default sequence lengths: SD3 77 CLIP + 256 T5 tokens, FLUX 512 T5 tokens).
SYNTHETIC = {
    "sd15": ("sd", 4, {"hidden": (77, 768)}),
    "sd35-medium": ("sd3", 16, {"hidden": (333, 4096), "pooled": (2048,)}),
    "flux-dev": ("flux", 16, {"hidden": (512, 4096), "pooled": (768,)}),
    # Qwen-Image and Z-Image read only each caption's own tokens (256 assumed, as docs/BENCHMARKS.md's memory
    # plan); FLUX.2 [klein] and Wan read all 512 padded tokens, as their pipelines pass them.
    "qwen-image": ("qwen_image", 16, {"hidden": (256, 3584)}),
    "flux2-klein-4b": ("flux2_klein", 128, {"hidden": (512, 7680)}),
    "z-image": ("z_image", 16, {"hidden": (256, 2560)}),
    "wan21-t2v-1.3b": ("sd3", 16, {"hidden": (512, 4096)}),  # sd3: rectified flow, target eps - x0
}
VIDEO = {"wan21-t2v-1.3b": (81, 832)}  # WanPipeline's defaults: 81 frames at 480 x 832 (--resolution: height)


def latent_shape(model_name: str, resolution: int) -> tuple[int, ...]:
    """The denoiser's latent [C, (T,) h, w] of one image: the VAE's /8 (FLUX.2: and the 2x2 patchify into 4 x
    32 channels; Wan: and its causal 4x time compression, 1 + (frames - 1) / 4 latent frames)."""
    channels = SYNTHETIC[model_name][1]
    side = resolution // (16 if model_name == "flux2-klein-4b" else 8)
    if model_name in VIDEO:
        frames, width = VIDEO[model_name]
        return channels, 1 + (frames - 1) // 4, side, width // 8
    return channels, side, side


def _unmasked_forward(model_name: str, family):
    """The denoiser call of Qwen-Image, Z-Image and Wan with every text token a caption's (so no
    data-dependent cut, which meta tensors cannot do); the other families' own forward."""
    import torch

    from diffusion_dpo.families.flux import pack_latents, unpack_latents

    def qwen(denoiser, noisy, timestep, text, image):
        n, _, h, w = noisy.shape
        out = denoiser(hidden_states=pack_latents(noisy), timestep=timestep / 1000,
                       encoder_hidden_states=text["hidden"], encoder_hidden_states_mask=None,
                       img_shapes=[[(1, h // 2, w // 2)]] * n, return_dict=False)[0]
        return unpack_latents(out, h, w)

    def z_image(denoiser, noisy, timestep, text, image):
        out = denoiser(list(noisy.unsqueeze(2).unbind(0)), (1000 - timestep) / 1000,
                       list(text["hidden"].unbind(0)), return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def wan(denoiser, noisy, timestep, text, image):
        return denoiser(hidden_states=noisy, timestep=timestep, encoder_hidden_states=text["hidden"],
                        return_dict=False)[0]

    return {"qwen-image": qwen, "z-image": z_image, "wan21-t2v-1.3b": wan}.get(model_name, family.forward)


def build_denoiser(args):
    import diffusers

    if args.model == "qwen-image":  # the shipped architecture folder: Qwen/Qwen-Image's transformer/config.json
        from diffusion_dpo import ASSETS

        config = json.loads((ASSETS / "architectures" / "qwen-image" / "transformer" / "config.json").read_text())
        return diffusers.QwenImageTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    class_name, kwargs = DENOISERS[args.model]
    kwargs = dict(kwargs)
    if args.unet_channels and args.model == "sd15":  # a smaller UNet of the same layout, for a CPU try
        kwargs["block_out_channels"] = tuple(int(c) for c in args.unet_channels.split(","))
    return getattr(diffusers, class_name)(**kwargs)


def _dpo_step(model_name, denoiser, reference, batch: int, resolution: int, seed: int, device, autocast_dtype=None):
    """One Diffusion-DPO forward/backward with the recipe's components on random latents and text states:
    the family's noise process (DDPM; or flow matching, logit-normal times) and denoiser call.
    ``reference()``: a context manager yielding the reference model (a frozen copy, or adapter off)."""
    import torch
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from diffusion_dpo.denoising import PairInputs, draw_pair_noise, pair_errors, pair_seeds
    from diffusion_dpo.families import NoiseConfig, by_name
    from diffusion_dpo.losses import diffusion_dpo_loss

    family_name, channels, text_shapes = SYNTHETIC[model_name]
    family = by_name(family_name)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0) if family.flow else DDPMScheduler()
    sampling = "logit_normal" if family.flow else "uniform"
    process = family.noise_process(scheduler, NoiseConfig(timestep_sampling=sampling))
    shape = latent_shape(model_name, resolution)
    g = torch.Generator().manual_seed(seed)
    noise = draw_pair_noise(pair_seeds(0, seed, 0, batch), shape, process.draw_time, device)
    text = {k: torch.randn(batch, *size, generator=g).to(device) for k, size in text_shapes.items()}
    x = PairInputs(torch.randn(batch, *shape, generator=g).to(device),
                   torch.randn(batch, *shape, generator=g).to(device), noise.noise, noise.timesteps, text)
    forward = _unmasked_forward(model_name, family)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with autocast:
        with torch.no_grad(), reference() as ref:
            ref_w, ref_l = pair_errors(ref, x, process, forward)
        model_w, model_l = pair_errors(denoiser, x, process, forward)
        loss = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta_dpo=5000)[0].mean()
    loss.backward()
    return loss.detach()


def count_step_flops(args) -> float:
    """Model FLOPs of one DPO step of ``--batch-size`` pairs (reference forward of 2B images, policy forward
    and backward of 2B images), counted by FlopCounterMode on meta tensors: exact, and free without a GPU.
    Gradient-checkpointing recomputation is not counted (model FLOPs, not hardware FLOPs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    with meta:
        denoiser = build_denoiser(args)
    with FlopCounterMode(display=False) as counter:
        _dpo_step(args.model, denoiser, lambda: contextlib.nullcontext(denoiser), args.batch_size, args.resolution,
                  0, meta)
    return counter.get_total_flops()


def synthetic_mode(args) -> dict:
    """Synthetic Diffusion-DPO steps on a real-sized denoiser, full fine-tune (fp32 master weights, a bf16
    frozen reference) or LoRA (--lora-rank), bf16 autocast on a GPU (fp32 on a CPU), AdamW, clipping.
    FLOPs are those of a full fine-tune's step (LoRA's are slightly fewer: no weight gradients of the base)."""
    import torch

    from diffusion_dpo import models

    flops = count_step_flops(args)
    result = {"model": args.model, "resolution": args.resolution, "batch_pairs": args.batch_size,
              "tflop_per_step": flops / 1e12, "tflop_per_pair": flops / args.batch_size / 1e12}
    if args.flops_only:
        print(json.dumps(result, indent=1))
        return result
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else None
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusion_dpo.families import by_name
    from diffusion_dpo.reference import AdapterOff

    torch.manual_seed(0)
    denoiser = build_denoiser(args).to(device)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if args.lora_rank:  # as the recipe: the base frozen in bf16, the adapter in fp32, the reference adapter-off
        models.move(denoiser, device, dtype or torch.float32)
        models.attach_lora(denoiser, args.lora_rank, None, list(by_name(SYNTHETIC[args.model][0]).lora_targets))
        for p in models.trainable_parameters(denoiser):
            p.data = p.data.float()
        reference = AdapterOff(denoiser).model
    else:
        frozen = models.frozen_copy(denoiser, dtype or torch.float32)
        reference = lambda: contextlib.nullcontext(frozen)  # noqa: E731
    optimizer = torch.optim.AdamW(models.trainable_parameters(denoiser), lr=1e-5)

    def step(i: int) -> None:
        _dpo_step(args.model, denoiser, reference, args.batch_size, args.resolution, i, device, dtype)
        torch.nn.utils.clip_grad_norm_(models.trainable_parameters(denoiser), 1.0)
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
    result |= {"device": name, "params_m": sum(p.numel() for p in denoiser.parameters()) / 1e6,
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
    parser.add_argument("--model", choices=sorted([*DENOISERS, "qwen-image"]),
                        help="synthetic steps on a real-sized denoiser")
    parser.add_argument("--sd15-unet", action="store_true", help="the same as --model sd15")
    parser.add_argument("--resolution", type=int, default=0, help="--model: image side in pixels (0: 512 for "
                        "sd15, 480 for wan21-t2v-1.3b (its height: 81 frames of 480 x 832), 1024 for the others)")
    parser.add_argument("--batch-size", type=int, default=1, help="--model: pairs per step")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="--model: recompute activations")
    parser.add_argument("--lora-rank", type=int, default=0, help="--model: train a rank-r LoRA (the reference "
                        "is the adapter off) instead of a full fine-tune (FLUX.1-dev's 12B do not fit one GPU in full)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak for MFU (0: from the GPU name)")
    parser.add_argument("--flops-only", action="store_true", help="--model: count the step's FLOPs only")
    parser.add_argument("--unet-channels", default="", help="--model sd15: override block_out_channels, e.g. "
                        "32,64,64,64, to try the code path on a CPU (not an SD1.5-sized measurement)")
    args, overrides = parser.parse_known_args()
    if args.child:
        print(json.dumps(run_config_child(json.loads(args.child))))
    elif args.model or args.sd15_unet:
        args.model = args.model or "sd15"
        args.resolution = args.resolution or {"sd15": 512, "wan21-t2v-1.3b": 480}.get(args.model, 1024)
        synthetic_mode(args)
    else:
        if not args.config:
            parser.error("give --config FILE (and key=value overrides) or --model NAME")
        config_mode(args, overrides)


if __name__ == "__main__":
    main()
