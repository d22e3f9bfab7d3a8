"""Throughput of ``diffusion-dpo label``: images/s for generation, for scoring, and end to end.

    # CPU, tiny pipeline (built from configs, offline):
    python scripts/bench_label.py --size tiny --device cpu
    # GPU, SD1.5-size: a real checkpoint if given, else random weights with SD1.5's architecture
    # (UNet 860M, VAE 84M, CLIP ViT-L text encoder); speed does not depend on the weights' values.
    python scripts/bench_label.py --size sd15 --device cuda [--pretrained stable-diffusion-v1-5/stable-diffusion-v1-5]

Generation is timed after one warm-up batch, with ``diffusion_dpo.sampling.generate`` exactly as the
recipe calls it (one CPU generator per image, classifier-free guidance on). Scoring is timed for
``jpeg_compressibility`` (PIL on the CPU, what the tests and the demo use) and for a CLIP model of
PickScore's architecture (ViT-H/14 on GPU, ViT-B/32 on CPU, random weights, via the ``pickscore`` scorer
from local folders). End to end runs ``label.run`` on the tiny pipeline (generate + score + pair + encode +
write). Prints one JSON object; ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_dpo.sampling import default_dtype, generate, load_pipeline  # noqa: E402
from diffusion_dpo.tiny import build_tiny_pipeline, write_clip_tokenizer  # noqa: E402

PROMPTS = ["a red dog on a green background", "a painting of a house by the sea",
           "a photo of a cat in a city", "concept art of a large tree"]


def sd15_pipeline(folder: Path, device, dtype):
    """A StableDiffusionPipeline with SD1.5's exact architecture and random weights (no download)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(folder / "tokenizer", max_length=77)))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu"))
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def clip_scorer_folder(folder: Path, large: bool) -> Path:
    """A local CLIPModel + CLIPProcessor folder: ViT-H/14 (PickScore's size) or ViT-B/32, random weights."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    if large:
        text = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24)
        vision = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                      patch_size=14)
        projection = 1024
    else:
        text = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12)
        vision = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                      patch_size=32)
        projection = 512
    config = CLIPConfig(text_config={**text, "vocab_size": 49408, "max_position_embeddings": 77},
                        vision_config={**vision, "image_size": 224}, projection_dim=projection)
    CLIPModel(config).save_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(folder / "tok", max_length=77)))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def timed(fn, sync):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pretrained", default=None, help="a real checkpoint (hub id or folder) for --size sd15")
    parser.add_argument("--images", type=int, default=None, help="images to generate (default 32 tiny, 64 sd15)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 10 tiny, 50 sd15)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per pass (default 8 tiny, 16 sd15)")
    parser.add_argument("--skip-clip", action="store_true", help="do not time the CLIP-size scorer")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = default_dtype(device)
    tiny = args.size == "tiny"
    n = args.images or (32 if tiny else 64)
    steps = args.steps or (10 if tiny else 50)
    batch_size = args.batch_size or (8 if tiny else 16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads"
                   + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ", no GPU"),
        "load_average_1min": os.getloadavg()[0], "torch": torch.__version__, "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "size": args.size, "images": n, "steps": steps,
        "batch_size": batch_size, "guidance_scale": 7.5,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if tiny:
            pipe = load_pipeline(str(build_tiny_pipeline(tmp / "tiny-sd")), device=device, dtype=dtype)
        elif args.pretrained:
            pipe = load_pipeline(args.pretrained, device=device, dtype=dtype)
        else:
            pipe = sd15_pipeline(tmp / "sd15", device, dtype)
        result["checkpoint"] = "tiny (random)" if tiny else (args.pretrained or "SD1.5 architecture (random)")
        kwargs = dict(num_inference_steps=steps, guidance_scale=7.5, batch_size=batch_size)
        generate(pipe, prompts[:batch_size], list(range(batch_size)), **kwargs)  # warm-up
        images, seconds = timed(lambda: generate(pipe, prompts, list(range(n)), **kwargs), sync)
        result["image_size"] = list(images[0].size)
        result["generate_images_per_s"] = n / seconds
        pipe = None  # free its memory before the scorers load

        import scorers

        jpeg = scorers.load_scorer("jpeg_compressibility")
        _, seconds = timed(lambda: jpeg.score(images, prompts), sync)
        result["score_jpeg_compressibility_images_per_s"] = n / seconds

        if not args.skip_clip:
            large = device.type == "cuda"
            folder = clip_scorer_folder(tmp / "clip", large=large)
            clip = scorers.load_scorer("pickscore", model=str(folder), processor=str(folder), device=str(device),
                                       batch_size=batch_size)
            clip.score(images[:batch_size], prompts[:batch_size])  # warm-up
            _, seconds = timed(lambda: clip.score(images, prompts), sync)
            arch = "ViT-H/14 (PickScore size)" if large else "ViT-B/32"
            result[f"score_clip_{'vit_h14' if large else 'vit_b32'}_images_per_s"] = n / seconds
            result["clip_scorer"] = f"pickscore scorer, {arch}, random weights, dtype {clip.dtype}"
            clip = None

        if tiny:  # the whole recipe: generate, score, pair, encode PNG, write shards
            from diffusion_dpo.config import load_config
            from diffusion_dpo.recipes.label import LabelConfig, run

            prompt_file = tmp / "prompts.txt"
            prompt_file.write_text("\n".join(f"{p} {i}" for i, p in enumerate(prompts[: n // 4])) + "\n")
            cfg = load_config(LabelConfig, [], [
                f"model.pretrained={tmp / 'tiny-sd'}", f"prompts={prompt_file}", "scorer.name=jpeg_compressibility",
                "candidates_per_prompt=4", f"sampling.num_inference_steps={steps}", f"batch_size={batch_size}",
                f"output_dir={tmp / 'label'}", "prompts_per_shard=4"])
            summary = run(cfg)
            result["label_end_to_end_images_per_s"] = summary.this_run["images_per_s"]
            result["label_end_to_end_prompts_per_s"] = summary.this_run["prompts_per_s"]
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
