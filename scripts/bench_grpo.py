"""Online tuning throughput of ``diffusion-dpo grpo``: images/s sampled (the stochastic sampler with its
log-probs, decoding and scoring) and images/s trained (the update over K of T transitions per image), from the
run's own metrics.jsonl, median over the steps after the first (warm-up).

    python scripts/bench_grpo.py --threads 1                           # the four tiny families on the CPU
    python scripts/bench_grpo.py --pretrained stable-diffusion-v1-5/stable-diffusion-v1-5 --steps 4 --prompts 4 \\
        --group-size 8 --num-inference-steps 20 --train-steps 10 --batch-size 8          # SD1.5, 512 px, GPU
    python scripts/bench_grpo.py --pretrained stabilityai/stable-diffusion-3.5-medium --steps 4 --prompts 2 \\
        --group-size 8 --num-inference-steps 10 --train-steps 5 --batch-size 4 --guidance 4.5   # SD3.5-medium

The reward is ``brightness`` (no weights, on the CPU), so the figures are the sampler's and the update's, not a
scorer's. Every run is a LoRA (rank 8) unless --lora-rank 0; on a GPU in bf16 (mixed_precision auto).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def bench(pretrained: str, args) -> dict:
    from diffusion_dpo.config import load_config
    from diffusion_dpo.recipes import grpo
    from diffusion_dpo.recipes.grpo_config import GrpoConfig

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(GrpoConfig, [], [
            f"model.pretrained={pretrained}", f"model.lora_rank={args.lora_rank}", "scorer.name=brightness",
            "prompts.source=hpsv2-offline", f"online.prompts_per_step={args.prompts}",
            f"online.group_size={args.group_size}", f"sampling.num_inference_steps={args.num_inference_steps}",
            f"sampling.guidance_scale={args.guidance}", f"online.train_steps={args.train_steps}",
            f"optim.batch_size={args.batch_size}", f"optim.max_steps={args.steps}", "checkpoint_every=0",
            "tensorboard=false", f"output_dir={out}"])
        result = grpo.run(cfg)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()][1:]
    return {"model": pretrained, "images_per_step": args.prompts * args.group_size,
            "T": args.num_inference_steps, "K": args.train_steps, "lora_rank": args.lora_rank,
            "images_per_s_sampled": round(statistics.median(r["images_per_s_sampled"] for r in rows), 2),
            "images_per_s_trained": round(statistics.median(r["images_per_s_trained"] for r in rows), 2),
            "steps": result.steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", nargs="*", default=["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--num-inference-steps", type=int, default=10)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="transitions per micro-batch")
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for pretrained in args.pretrained:
        print(json.dumps(bench(pretrained, args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
