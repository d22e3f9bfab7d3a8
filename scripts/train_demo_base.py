"""Train the demo's base model: a tiny Stable-Diffusion-layout pipeline for the shapes world.

    python scripts/train_demo_base.py --out assets/demo/base          # the shipped weights (seed 0)

Three stages, all from the world's generator (scorers/shapes/world.py), on every prompt of the world:

1. the VAE (32 px RGB -> 4 x 16 x 16 latents) learns to reconstruct rendered scenes; its latent scaling
   factor is then set to 1 / std of the latents, as Stable Diffusion's is;
2. the UNet and the CLIP text encoder learn together with the standard denoising (epsilon) loss, prompts
   dropped to "" 10% of the time so classifier-free guidance works, with an exponential moving average
   of their weights (what is saved);
3. a sample grid and the shapes scorer's mean on held-out-split prompts are written next to the weights
   (``samples.png``, ``train_summary.json``).

The base is trained on all prompts, like a real checkpoint trained on everything; the demo's held-out
prompts are held out from preference tuning, not from pretraining. The training is short on purpose:
the model gets most scenes right but not all (wrong colour or shape some of the time), which leaves
preference tuning room to improve. Seeded: same seed, machine and thread count, same weights.

``--family flow``: an SD3-layout transformer on the SD base's VAE (assets/demo/flow_base). ``--family video``
(assets/demo/video_base): the moving-shapes world's 5-frame clips (scorers/shapes/motion.py), a Wan-layout
video VAE, UMT5 and WanTransformer3DModel (``train_video``), scored by ``shapes_video``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusion_dpo.sampling import generate
from diffusion_dpo.tiny import write_clip_tokenizer
from scorers import load_scorer
from scorers.shapes.world import WORLD_WORDS, all_scenes, render, split_prompts

RESOLUTION = 32
FLOW_LAYERS, FLOW_WIDTH = 4, 96  # the flow base's MMDiT: blocks, features per token
MAX_TOKENS = 12  # "a large red circle on a blue background" is 8 words + start and end tokens


def world_tokenizer():
    """A CLIPTokenizer holding each world word as one token, with the same token ids on every run
    (``write_clip_tokenizer`` numbers them canonically), so the text encoder's embedding rows and hence the
    trained weights depend on the seed only."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp, WORLD_WORDS, MAX_TOKENS)))


def build_components(seed: int):
    """Randomly initialised (tokenizer, text_encoder, vae, unet, scheduler) of the demo's layout."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = world_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
        max_position_embeddings=MAX_TOKENS, projection_dim=64,
    ))
    vae = AutoencoderKL(
        block_out_channels=(32, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=RESOLUTION,
    )
    # Cross-attention at 8 x 8 and 4 x 4: where the prompt decides colour, shape and size.
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16, attention_head_dim=8, cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    return tokenizer, text_encoder, vae, unet, scheduler


def make_dataset(n: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """``n`` rendered scenes of the whole world: prompts and pixels [n, 3, 32, 32] in [-1, 1]."""
    rng = random.Random(seed)
    scenes = all_scenes()
    prompts, pixels = [], []
    for _ in range(n):
        scene = rng.choice(scenes)
        prompts.append(scene.prompt)
        pixels.append(np.asarray(render(scene, rng, RESOLUTION)))
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return prompts, x


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, pixels: torch.Tensor, steps: int, batch: int, lr: float, device, gen, sample=True) -> float:
    """Reconstruction (MSE) plus a small KL term; returns the last reconstruction MSE (pixels in [-1, 1]).
    ``sample=False`` decodes the posterior means (an autoencoder; the Wan VAE learns much faster so)."""
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="vae", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * cosine_lr(step, steps, steps // 20)
        x = pixels[torch.randint(len(pixels), (batch,), generator=gen)].to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=None) if sample else posterior.mode()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval()
    return mse.item()


@torch.no_grad()
def encode_all(vae, pixels: torch.Tensor, device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations [n, 4, 16, 16] of every image."""
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        dist = vae.encode(pixels[i:i + batch].to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def train_denoiser(modules, batch_loss, prompts, means, stds, *, scale, steps, batch, lr, drop_prompt,
                   ema_decay, device, gen, desc="unet"):
    """AdamW on ``modules`` (the denoiser first, then the text encoders that train with it) with a cosine
    schedule, prompt dropout and an EMA of the weights; returns (EMA copies of ``modules``, loss EMA).

    ``batch_loss(z0, texts)`` is the model's loss on scaled clean latents z0 [batch, 4, 16, 16] and their
    captions (with "" where dropped); it draws its own noise and times from ``gen``.
    """
    for module in modules:
        module.to(device).train()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    emas = [copy.deepcopy(m).eval() for m in modules]
    ema_params = [q for m, e in zip(modules, emas) for p, q in zip(m.parameters(), e.parameters())
                  if p.requires_grad]
    bar = tqdm(range(steps), desc=desc, unit="step")
    running = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * cosine_lr(step, steps, steps // 20)
        idx = torch.randint(len(means), (batch,), generator=gen)
        z0 = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)
        z0 = (z0 * scale).to(device)
        keep = [torch.rand((), generator=gen).item() >= drop_prompt for _ in range(batch)]  # one draw each
        texts = [prompts[i] if k else "" for i, k in zip(idx.tolist(), keep)]
        loss = batch_loss(z0, texts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # short warm-up of the average
        with torch.no_grad():
            for e, p in zip(ema_params, params):
                e.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
    return emas, running


def epsilon_loss(unet, text_encoder, tokenizer, scheduler, device, gen):
    """The standard denoising loss of Stable Diffusion: predict the noise eps at a uniform timestep."""
    alphas = scheduler.alphas_cumprod.to(device)

    def batch_loss(z0, texts):
        ids = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        noise = torch.randn(z0.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),), generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        return F.mse_loss(unet(zt, t, text_encoder(ids)[0]).sample, noise)

    return batch_loss


def build_flow_components(seed: int, vae_folder: str):
    """Randomly initialised SD3-layout (pipeline, scale) for the shapes world, reusing a trained VAE.

    CLIP-L and CLIP-G with projection (each 32 wide, on the world tokenizer) and a T5 (64 wide, so the CLIP
    states are zero-padded to it as in SD3), an MMDiT over 2x2 patches of the 4 x 16 x 16 latents, and
    FlowMatchEulerDiscreteScheduler with shift 1 (SD3's shift of 3 is for 1024 px; these images are 32 px).
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffusion_dpo.tiny import _tiny_t5, write_t5_tokenizer

    torch.manual_seed(seed)
    tokenizer = world_tokenizer()
    clip_config = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=64,
                       num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
                       max_position_embeddings=MAX_TOKENS, projection_dim=32)
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**clip_config))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**clip_config))
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import T5TokenizerFast

        t5_tokenizer = T5TokenizerFast.from_pretrained(str(write_t5_tokenizer(tmp, WORLD_WORDS, MAX_TOKENS)))
    t5 = _tiny_t5(t5_tokenizer, 64)
    vae = AutoencoderKL.from_pretrained(vae_folder)
    # SD3's pipeline un-shifts latents by shift_factor; this VAE has none (its latents are zero-mean enough).
    vae.register_to_config(shift_factor=0.0)
    transformer = SD3Transformer2DModel(
        sample_size=RESOLUTION // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=FLOW_LAYERS,
        attention_head_dim=16, num_attention_heads=FLOW_WIDTH // 16, joint_attention_dim=64,
        caption_projection_dim=FLOW_WIDTH, pooled_projection_dim=64, pos_embed_max_size=RESOLUTION // 2,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
        text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )
    vae.requires_grad_(False)
    t5.requires_grad_(False)  # random and frozen: the CLIPs train with the transformer and carry the words
    return pipe


def flow_loss(pipe, device, gen):
    """The rectified-flow loss of the SD3 family: the families' noise process (logit-normal sigma, shift
    1), its target (eps - x0) and the family's transformer call; text through the pipeline's encode_prompt
    so the CLIP encoders receive gradients."""
    from diffusion_dpo.families import FlowNoise, NoiseConfig
    from diffusion_dpo.families.sd3 import SD3Family

    family = SD3Family()
    noise = FlowNoise(NoiseConfig(timestep_sampling="logit_normal"), shift=1.0)

    def batch_loss(z0, texts):
        hidden, _, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device=device,
                                            do_classifier_free_guidance=False, max_sequence_length=MAX_TOKENS)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        sigma = torch.cat([noise.draw_time(gen) for _ in range(len(z0))]).to(device)
        pred = family.forward(pipe.transformer, noise.noisy(z0, eps, sigma), noise.model_timestep(sigma),
                              {"hidden": hidden, "pooled": pooled}, {})
        return F.mse_loss(pred, noise.target(z0, eps, sigma))

    return batch_loss


def train_sd(args, prompts, pixels, device, gen):
    """Stages 1-2 of the SD-layout base: (pipeline, summary fields)."""
    from diffusers import StableDiffusionPipeline

    tokenizer, text_encoder, vae, unet, scheduler = build_components(args.seed)
    vae_mse = train_vae(vae, pixels, args.vae_steps, args.vae_batch, args.vae_lr, device, gen)
    means, stds = encode_all(vae, pixels, device)
    scale = 1.0 / means.std().item()
    vae.register_to_config(scaling_factor=scale)
    (ema_unet, ema_text), loss = train_denoiser(
        [unet, text_encoder], epsilon_loss(unet, text_encoder, tokenizer, scheduler, device, gen), prompts,
        means, stds, scale=scale, steps=args.unet_steps, batch=args.batch, lr=args.lr,
        drop_prompt=args.drop_prompt, ema_decay=args.ema, device=device, gen=gen,
    )
    pipe = StableDiffusionPipeline(
        vae=vae.cpu(), text_encoder=ema_text.cpu(), tokenizer=tokenizer, unet=ema_unet.cpu(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe, {"vae_steps": args.vae_steps, "unet_steps": args.unet_steps, "vae_mse": vae_mse,
                  "unet_loss_ema": loss, "latent_scale": scale}


def train_flow(args, prompts, pixels, device, gen):
    """The flow base: the SD base's trained VAE (reused), then transformer + CLIPs: (pipeline, fields)."""
    pipe = build_flow_components(args.seed, args.vae)
    means, stds = encode_all(pipe.vae.to(device), pixels, device)
    scale = pipe.vae.config.scaling_factor
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    pipe.text_encoder_3.to(device)
    emas, loss = train_denoiser(
        modules, flow_loss(pipe, device, gen), prompts, means, stds, scale=scale, steps=args.unet_steps,
        batch=args.batch, lr=args.lr, drop_prompt=args.drop_prompt, ema_decay=args.ema, device=device,
        gen=gen, desc="transformer",
    )
    pipe.transformer, pipe.text_encoder, pipe.text_encoder_2 = emas
    return pipe.to("cpu"), {"vae": args.vae, "transformer_steps": args.unet_steps, "layers": FLOW_LAYERS,
                            "width": FLOW_WIDTH, "transformer_loss_ema": loss, "latent_scale": scale}


# ------------------------------------------------------------------------------------------ the video base
# frames (4 k + 1 for the VAE's temporal 4: latents [C, 2, 8, 8]), latent channels, UMT5 width, blocks, width;
# the VAE's first stage: steps on single frames (16 a batch), where it learns space much faster than on clips
VIDEO_FRAMES, VIDEO_LATENT, VIDEO_TEXT, VIDEO_LAYERS, VIDEO_WIDTH, VIDEO_FRAME_STEPS = 5, 8, 64, 4, 96, 800


def make_clips(n: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """``n`` rendered moving-shape clips of the whole world: prompts and pixels [n, 3, 5, 32, 32] in [-1, 1]."""
    from scorers.shapes.motion import all_motion_scenes, render_clip

    rng = random.Random(seed)
    scenes = all_motion_scenes()
    prompts, clips = [], []
    for _ in range(n):
        scene = rng.choice(scenes)
        prompts.append(scene.prompt)
        clips.append(np.stack([np.asarray(f) for f in render_clip(scene, rng, VIDEO_FRAMES, RESOLUTION)]))
    x = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    return prompts, x


def build_video_components(seed: int):
    """A random Wan-layout pipeline for the moving-shapes world: UMT5 on the world's words (one T5 piece each), an
    AutoencoderKLWan halving space and time twice (5 frames of 32 px -> [8, 2, 8, 8]), a WanTransformer3DModel over
    (1, 2, 2) patches and flow-matching Euler at shift 1 (Wan's 3 or 5 are for 480p and up; these are 32 px)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from diffusers import WanTransformer3DModel as Wan
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    from diffusion_dpo.tiny import write_t5_tokenizer
    from scorers.shapes.motion import MOTION_WORDS

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = T5TokenizerFast.from_pretrained(str(write_t5_tokenizer(tmp, (*WORLD_WORDS, *MOTION_WORDS),
                                                                           MAX_TOKENS)))
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=VIDEO_TEXT, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKLWan(base_dim=16, z_dim=VIDEO_LATENT, dim_mult=[1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[True, True], scale_factor_temporal=4, scale_factor_spatial=4)
    transformer = Wan(
        patch_size=(1, 2, 2), num_attention_heads=VIDEO_WIDTH // 24, attention_head_dim=24,
        in_channels=VIDEO_LATENT, out_channels=VIDEO_LATENT, text_dim=VIDEO_TEXT, freq_dim=64,
        ffn_dim=2 * VIDEO_WIDTH, num_layers=VIDEO_LAYERS, rope_max_seq_len=32)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))


def wan_flow_loss(pipe, device, gen):
    """The Wan family's rectified-flow loss (as flow_loss) on normalised latents; text as WanPipeline encodes
    it (UMT5 states, zero past each caption's tokens), with gradients into the encoder."""
    from diffusion_dpo.families.wan import WanFamily
    from diffusion_dpo.noise import FlowNoise, NoiseConfig

    family = WanFamily()
    noise = FlowNoise(NoiseConfig(timestep_sampling="logit_normal"), shift=1.0)

    def batch_loss(z0, texts):
        tokens = pipe.tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                                return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        hidden = pipe.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state * mask[..., None]
        eps = torch.randn(z0.shape, generator=gen).to(device)
        sigma = torch.cat([noise.draw_time(gen) for _ in range(len(z0))]).to(device)
        pred = family.forward(pipe.transformer, noise.noisy(z0, eps, sigma), noise.model_timestep(sigma),
                              {"hidden": hidden}, {})
        return F.mse_loss(pred, noise.target(z0, eps, sigma))

    return batch_loss


def train_video(args, prompts, pixels, device, gen):
    """The video base: the Wan VAE on the clips, its latents_mean / latents_std set per channel from them,
    then transformer + UMT5 together: (pipeline, summary fields)."""
    pipe = build_video_components(args.seed)
    frames = pixels.transpose(1, 2).flatten(0, 1).unsqueeze(2)  # [5 n, 3, 1, 32, 32]
    train_vae(pipe.vae, frames, VIDEO_FRAME_STEPS, 16, args.vae_lr, device, gen, sample=False)
    vae_mse = train_vae(pipe.vae, pixels, args.vae_steps, args.vae_batch, args.vae_lr, device, gen, sample=False)
    means, _ = encode_all(pipe.vae, pixels, device, batch=64)  # the VAE trained on the means: so the denoiser
    mu, sd = means.mean(dim=(0, 2, 3, 4)), means.transpose(0, 1).flatten(1).std(dim=1)
    pipe.vae.register_to_config(latents_mean=mu.tolist(), latents_std=sd.tolist())
    means = (means - mu.view(-1, 1, 1, 1)) / sd.view(-1, 1, 1, 1)
    emas, loss = train_denoiser(
        [pipe.transformer, pipe.text_encoder], wan_flow_loss(pipe, device, gen), prompts, means,
        torch.zeros_like(means), scale=1.0,
        steps=args.unet_steps, batch=args.batch, lr=args.lr, drop_prompt=args.drop_prompt, ema_decay=args.ema,
        device=device, gen=gen, desc="transformer")
    pipe.transformer, pipe.text_encoder = emas
    return pipe.to("cpu"), {"frames": VIDEO_FRAMES, "vae_frame_steps": VIDEO_FRAME_STEPS, "vae_steps": args.vae_steps,
                            "vae_mse": vae_mse,
                            "transformer_steps": args.unet_steps, "layers": VIDEO_LAYERS, "width": VIDEO_WIDTH,
                            "transformer_loss_ema": loss}


def evaluate_video(pipe, device, out: Path) -> dict:
    """Held-out-split moving-shapes prompts, 2 seeds each, 20 steps at guidance 4: shapes_video's mean."""
    from scorers.shapes.motion import as_video_tensor, motion_parts, parse_motion_prompt, split_motion_prompts

    _, held_out = split_motion_prompts()
    eval_prompts = [p for p in held_out for _ in range(2)]
    videos = generate(pipe.to(device), eval_prompts, list(range(len(eval_prompts))), num_inference_steps=20,
                      guidance_scale=4.0, batch_size=64, num_frames=VIDEO_FRAMES, height=RESOLUTION, width=RESOLUTION)
    parts = motion_parts(as_video_tensor(videos), [parse_motion_prompt(p) for p in eval_prompts])  # shapes_video's
    save_grid([frame for video in videos[:8] for frame in video], out / "samples.png", cols=VIDEO_FRAMES)
    return {"prompts": len(held_out), "seeds": 2, "steps": 20, "guidance_scale": 4.0, "frames": VIDEO_FRAMES,
            "shapes_video_mean": parts["score"].mean().item(), "shapes_video_std": parts["score"].std().item(),
            "look_mean": parts["look"].mean().item(), "motion_mean": parts["motion"].mean().item()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=["sd", "flow", "video"], default="sd",
                        help="sd: the SD-layout UNet base; flow: the SD3-layout flow-matching base; video: "
                             "the Wan-layout base of the moving-shapes world")
    parser.add_argument("--out", default=None, help="pipeline folder to write (default assets/demo/base, or "
                        "assets/demo/flow_base for --family flow)")
    parser.add_argument("--vae", default="assets/demo/base/vae", help="flow: the trained VAE to reuse")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=None,
                        help="rendered training scenes (default 10000; video: 4000 clips)")
    parser.add_argument("--vae-steps", type=int, default=None, help="default 800 (video: 300 on clips)")
    parser.add_argument("--unet-steps", type=int, default=None,
                        help="denoiser steps (default 2000 for sd, 1500 for flow, 1200 for video)")
    parser.add_argument("--vae-batch", type=int, default=None, help="default 32 (video: 8 clips)")
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=64, help="denoiser batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of denoiser and text encoder")
    parser.add_argument("--drop-prompt", type=float, default=0.1, help="share of empty prompts (for CFG)")
    parser.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (torch.set_num_threads); 0 keeps torch's default. On a machine "
                             "shared with other jobs, 1 can be many times faster than 2")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    flow, video = args.family == "flow", args.family == "video"
    args.out = args.out or {"sd": "assets/demo/base", "flow": "assets/demo/flow_base",
                            "video": "assets/demo/video_base"}[args.family]
    args.unet_steps = args.unet_steps or {"sd": 2000, "flow": 1500, "video": 1200}[args.family]
    if video:  # clips are 5 frames each: fewer, and smaller VAE batches
        args.images, args.vae_steps, args.vae_batch = args.images or 4000, args.vae_steps or 300, args.vae_batch or 8
    args.images, args.vae_steps, args.vae_batch = args.images or 10000, args.vae_steps or 800, args.vae_batch or 32
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.time()
    gen = torch.Generator().manual_seed(args.seed)
    prompts, pixels = (make_clips if video else make_dataset)(args.images, args.seed)
    train = train_video if video else train_flow if flow else train_sd
    pipe, fields = train(args, prompts, pixels, device, gen)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(str(out))
    train_time = time.time() - start
    pipe.set_progress_bar_config(disable=True)
    evaluation = evaluate_video(pipe, device, out) if video else evaluate_images(pipe, device, out)
    summary = {
        "family": args.family, "seed": args.seed, "images": args.images, **fields, "batch": args.batch,
        "lr": args.lr, "train_seconds": round(train_time, 1), "threads": torch.get_num_threads(),
        "device": str(device), "eval": evaluation,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def evaluate_images(pipe, device, out: Path) -> dict:
    """How good is it? Held-out-split prompts, 4 seeds each, the demo's sampler settings."""
    _, held_out = split_prompts()
    eval_prompts = [p for p in held_out for _ in range(4)]
    images = generate(pipe.to(device), eval_prompts, list(range(len(eval_prompts))), num_inference_steps=20,
                      guidance_scale=4.0, batch_size=64)
    scores = load_scorer("shapes").score(images, eval_prompts)
    save_grid(images[:64:1], out / "samples.png")
    return {"prompts": len(held_out), "seeds": 4, "steps": 20, "guidance_scale": 4.0,
            "shapes_mean": scores.mean().item(), "shapes_std": scores.std().item(),
            "share_above_0.9": (scores > 0.9).float().mean().item()}


def save_grid(images, path: Path, cols: int = 8) -> None:
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * (w + 2), rows * (h + 2)), (128, 128, 128))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * (w + 2), (i // cols) * (h + 2)))
    grid.save(path)


if __name__ == "__main__":
    raise SystemExit(main())
