"""The memory plan's table for docs/BENCHMARKS.md: SD3.5-medium, FLUX.1-dev and Qwen-Image at 1024 px,
LoRA r=64 and full fine-tune, 1 and 8 processes, ddp and fsdp, bf16, one pair per process (2 images per
denoiser pass), AdamW, no EMA, VAE and text encoders held (no precompute), counted from the shipped
architecture configs (no download, no GPU):

    python scripts/memory_plan_table.py                          # markdown on stdout
    python scripts/memory_plan_table.py --card-gib 141 --models flux1-dev

Each row is ``diffusion-dpo plan`` with the keys in its first column; the activation columns give both
gradient checkpointing settings, the total and the verdict use checkpointing on.
"""

from __future__ import annotations

import argparse

from diffusion_dpo.config import load_config
from diffusion_dpo.memory_plan import GIB, PlanConfig, memory_plan

SETUPS = [  # (label, overrides)
    ("LoRA, 1 x ddp", ["model.lora_rank=64"]),
    ("LoRA, 8 x ddp", ["model.lora_rank=64", "processes=8"]),
    ("LoRA, 8 x fsdp", ["model.lora_rank=64", "processes=8", "parallel.strategy=fsdp"]),
    ("full, 1 x ddp", []),
    ("full, 8 x ddp", ["processes=8"]),
    ("full, 8 x fsdp", ["processes=8", "parallel.strategy=fsdp"]),
    ("full, 8 x fsdp + cpu_offload", ["processes=8", "parallel.strategy=fsdp", "parallel.cpu_offload=true"]),
]
COLUMNS = ["weights", "compute copy", "gradients", "optimizer state", "reference", "frozen encoders + VAE"]


def plan_rows(model: str, card_gib: float) -> list[str]:
    lines = []
    for label, overrides in SETUPS:
        common = [f"model.pretrained={model}", "resolution=1024", "batch_size=1", "mixed_precision=bf16",
                  f"card_gib={card_gib}", *overrides]
        on = memory_plan(load_config(PlanConfig, overrides=[*common, "model.gradient_checkpointing=true"]))
        off = memory_plan(load_config(PlanConfig, overrides=common))
        by_name = {r.name: r.device for r in on.rows}
        by_name["weights"] += by_name.pop("buffers")
        by_name["gradients"] += by_name.pop("ddp buckets", 0.0) + by_name.pop("gradient of a block", 0.0)
        acts_on, acts_off = by_name.pop("activations"), {r.name: r.device for r in off.rows}["activations"]
        cells = [f"{by_name[c] / GIB:.1f}" for c in COLUMNS]
        verdict = "yes" if on.fits else "no"
        lines.append(f"| {model} | {label} | " + " | ".join(cells) + f" | {acts_on / GIB:.1f} / {acts_off / GIB:.1f} | "
                     f"{on.device_total / GIB:.1f} | {on.host_total / GIB:.1f} | {verdict} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--card-gib", type=float, default=80.0, help="GPU memory per card (GiB)")
    parser.add_argument("--models", nargs="+", default=["sd35-medium", "flux1-dev", "qwen-image"])
    args = parser.parse_args()
    headroom = 1 + 0.1 * args.card_gib
    print(f"GiB per process on the GPU; activations with / without gradient checkpointing; total and fit with "
          f"checkpointing on, against a {args.card_gib:g} GiB card less {headroom:.1f} GiB headroom.\n")
    print("| model | setup | weights | compute copy | gradients | optimizer | reference | encoders + VAE | "
          "activations (ckpt on / off) | total | host | fits |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for model in args.models:
        print("\n".join(plan_rows(model, args.card_gib)))


if __name__ == "__main__":
    main()
