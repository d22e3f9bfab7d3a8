"""A memory plan before the run: the expected per-process memory of a training run, split by what holds it.

    cfg = PlanConfig(model=PlanModelSection(pretrained="flux1-dev", lora_rank=64), processes=8)
    plan = memory_plan(cfg)          # rows of device and host bytes per process, and whether it fits
    print(format_plan(plan))         # the table `diffusion-dpo plan` prints

Parameter counts are exact (configs built on the meta device, :mod:`diffusion_dpo.memory_count`); the
arithmetic over them follows how the trainer holds each piece (bytes per element):

    weights        full fine-tune: trained fp32 (4) / shards; LoRA: frozen base in the compute dtype (2 in
                   bf16) / shards + adapter fp32 (4) / shards; buffers (SD3's position table) replicated
    compute copy   ddp: autocast's half-precision casts of the trained fp32 weights (2 per trained element);
                   fsdp: the all-gathered unsharded parameters of the root and of two blocks (current and
                   prefetched) in the compute dtype
    gradients      fp32 (4) per trained element / shards; ddp over >1 process adds its fp32 bucket copy (4);
                   fsdp adds one block's unsharded fp32 gradient before the reduce-scatter
    optimizer      adamw: two fp32 moments (8) / shards + one 4-byte step per tensor; adafactor: the factored
                   second moment (rows + columns of each matrix, fp32) / shards
    EMA            one fp32 copy (4) of the trained parameters / shards
    reference      full-copy reference: the denoiser in the compute dtype (fsdp: / shards when
                   parallel.frozen=shard, host when offload); adapter reference (LoRA switched off): 0
    frozen         VAE and text encoders in the compute dtype (precompute frees them: 0; fsdp as reference)
    activations    saved-for-backward bytes measured on a narrow twin of the denoiser (memory_count)

"shards" is the process count under fsdp and 1 under ddp; cpu_offload (fsdp) moves weights, gradients,
optimizer state and EMA to host memory. Not modelled: the transient buffers of a VAE encode or text encode
(online, no grad), the CUDA context and allocator fragmentation (the headroom allowance covers them).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

from diffusion_dpo.config import ConfigError, at_least_one, non_negative, option, positive
from diffusion_dpo.families import DEFAULT_LORA_TARGETS
from diffusion_dpo.memory_count import activation_model, describe_pipeline, lora_shapes

GIB = 2**30


@dataclass
class PlanModelSection:
    pretrained: str = option("flux1-dev", "the pipeline: a shipped architecture (sd35-medium, flux1-dev, "
                             "qwen-image), a diffusers folder or hub id (only config files are read), or tiny / "
                             "tiny-sdxl / tiny-sd3 / tiny-flux")
    revision: Optional[str] = option(None, "hub revision of model.pretrained")
    lora_rank: int = option(0, "0: full fine-tune of the denoiser; r > 0: a rank-r LoRA adapter", non_negative,
                            "0 (full fine-tune) or a positive LoRA rank")
    lora_targets: Optional[list[str]] = option(None, "module names LoRA adapts; null: to_q, to_k, to_v, to_out.0",
                                               lambda v: v is None or bool(v), "null or at least one name")
    gradient_checkpointing: bool = option(False, "recompute block activations in backward: only each block's "
                                          "inputs stay saved, plus one block's activations while it recomputes")


@dataclass
class PlanParallelSection:
    strategy: Literal["ddp", "fsdp"] = option("ddp", "ddp: every process holds everything; fsdp: trained "
                                              "parameters, gradients, optimizer state and EMA split over processes")
    cpu_offload: bool = option(False, "fsdp: keep weights, gradients, optimizer state and EMA in host memory")
    frozen: Literal["shard", "offload"] = option("shard", "fsdp: a full-copy reference, VAE and text encoders "
                                                 "split over processes (shard) or kept in host memory (offload)")


@dataclass
class PlanConfig:
    model: PlanModelSection = option(PlanModelSection, "the pipeline and what trains")
    resolution: int = option(1024, "image side in px (square images)", positive, "a positive number of px")
    batch_size: int = option(1, "examples per process per micro-batch (optim.batch_size)", at_least_one,
                             "at least 1")
    images_per_example: int = option(2, "images per example in one denoiser pass: 2 for Diffusion-DPO (winner "
                                     "and loser in one batch), 1 for SFT and online methods", at_least_one,
                                     "at least 1")
    text_tokens: Optional[int] = option(None, "text tokens the denoiser attends to; null: the family's (SD3 "
                                        "77 + 256, FLUX 512, Qwen-Image 256 assumed, UNet 77)",
                                        lambda v: v is None or v >= 1, "null or at least 1")
    processes: int = option(1, "training processes (GPUs)", at_least_one, "at least 1")
    parallel: PlanParallelSection = option(PlanParallelSection, "how the processes hold the model")
    ema: bool = option(False, "keep an EMA of the trained parameters (one fp32 copy)")
    reference: Literal["auto", "copy", "adapter", "none"] = option(
        "auto", "the DPO/KL reference: copy (a frozen full copy), adapter (the LoRA switched off: no memory), "
        "none (SFT); auto: adapter with LoRA, else copy")
    precompute: bool = option(False, "train from cached latents and text: VAE and text encoders freed")
    optimizer: Literal["adamw", "adafactor"] = option("adamw", "adamw (two fp32 moments) or adafactor (factored)")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = option(
        "auto", "compute dtype of frozen modules and activations; auto: bf16 (the plan is for a CUDA GPU)")
    card_gib: float = option(80.0, "GPU memory per card in GiB", positive, "a positive number of GiB")
    headroom_gib: Optional[float] = option(None, "GiB kept free for the CUDA context, NCCL buffers and "
                                           "allocator fragmentation; null: 1 GiB + 10% of card_gib",
                                           lambda v: v is None or v >= 0, "null or 0 or more GiB")
    output: Optional[str] = option(None, "also write the plan as JSON to this file")

    def check(self) -> None:
        if self.parallel.cpu_offload and self.parallel.strategy != "fsdp":
            raise ConfigError(f"config key 'parallel.cpu_offload': expected false unless parallel.strategy is "
                              f"fsdp, got {self.parallel.cpu_offload!r}")
        if self.reference == "adapter" and self.model.lora_rank == 0:
            raise ConfigError("config key 'reference': expected copy or none for a full fine-tune (the adapter "
                              "reference needs model.lora_rank > 0), got 'adapter'")


@dataclass
class Row:
    name: str
    device: float  # bytes per process on the GPU
    host: float  # bytes per process in host memory
    note: str


@dataclass
class MemoryPlan:
    config: dict[str, Any]
    description: str
    rows: list[Row]
    device_total: float
    host_total: float
    headroom: float
    card: float
    fits: bool
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def adafactor_elements(shapes: list[tuple[int, ...]]) -> int:
    """Elements of Adafactor's factored second moment: row and column means of each matrix (over its last
    two dims), the full size of a vector."""
    total = 0
    for shape in shapes:
        if len(shape) >= 2:
            total += math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
        else:
            total += math.prod(shape)
    return total


def _placed(name: str, size: float, host: bool, note: str) -> Row:
    return Row(name, 0.0 if host else size, size if host else 0.0, note)


def memory_plan(cfg: PlanConfig) -> MemoryPlan:
    """The per-process memory of the run ``cfg`` describes (bytes), row by row."""
    arch = describe_pipeline(cfg.model.pretrained, cfg.model.revision)
    d = arch.denoiser
    lora = cfg.model.lora_rank > 0
    targets = list(cfg.model.lora_targets or DEFAULT_LORA_TARGETS)
    trained_shapes = lora_shapes(arch.denoiser_module, targets, cfg.model.lora_rank) if lora else d.shapes
    if lora and not trained_shapes:
        raise ConfigError(f"config key 'model.lora_targets': {targets} name no Linear module of {arch.source}")
    trained = sum(math.prod(s) for s in trained_shapes)
    half = 4 if cfg.mixed_precision == "no" else 2
    fsdp, n = cfg.parallel.strategy == "fsdp", cfg.processes
    shards = n if fsdp else 1
    offload = cfg.parallel.cpu_offload

    base = half * d.params / shards if lora else 0.0
    weights = base + 4 * trained / shards
    rows = [_placed("weights", weights, offload, "LoRA: frozen base in the compute dtype + fp32 adapter"
                    if lora else "trained denoiser in fp32"),
            Row("buffers", (half if lora else 4) * d.buffers, 0.0, "non-trained tensors of the denoiser")]
    if fsdp:
        gathered = half * ((d.params - d.in_units) + 2 * d.largest_unit)
        rows.append(Row("compute copy", gathered, 0.0, "all-gathered root and two blocks, compute dtype"))
    elif half < 4:
        rows.append(Row("compute copy", half * trained, 0.0, "autocast's casts of the trained weights"))
    rows.append(_placed("gradients", 4 * trained / shards, offload, "fp32, trained parameters"))
    if fsdp:
        rows.append(Row("gradient of a block", 4 * d.largest_unit * trained / d.params, 0.0,
                        "unsharded, before the reduce-scatter"))
    elif n > 1:
        rows.append(Row("ddp buckets", 4 * trained, 0.0, "gradient copy for the all-reduce"))
    if cfg.optimizer == "adamw":
        state, what = 8 * trained / shards + 4 * len(trained_shapes), "adamw: 2 fp32 moments"
    else:
        state, what = 4 * adafactor_elements(trained_shapes) / shards, "adafactor: factored fp32 moment"
    rows.append(_placed("optimizer state", state, offload, what))
    rows.append(_placed("EMA", 4 * trained / shards if cfg.ema else 0.0, offload, "one fp32 copy of the trained "
                        "parameters" if cfg.ema else "off"))
    reference = cfg.reference if cfg.reference != "auto" else ("adapter" if lora else "copy")
    frozen_share = n if fsdp and cfg.parallel.frozen == "shard" else 1
    frozen_host = fsdp and cfg.parallel.frozen == "offload"
    copy = half * (d.params + d.buffers) / frozen_share if reference == "copy" else 0.0
    rows.append(_placed("reference", copy, frozen_host, {"copy": "frozen copy, compute dtype", "adapter":
                        "the LoRA switched off: no copy", "none": "none"}[reference]))
    encoders = 0.0 if cfg.precompute else half * sum(arch.frozen.values()) / frozen_share
    rows.append(_placed("frozen encoders + VAE", encoders, frozen_host, "freed: precomputed latents and text"
                        if cfg.precompute else ", ".join(sorted(arch.frozen))))
    acts = activation_model(arch, cfg.model.lora_rank, tuple(targets), half=half < 4)
    text_tokens = cfg.text_tokens or arch.text_tokens
    images = cfg.batch_size * cfg.images_per_example
    rows.append(Row("activations", acts.bytes(arch.tokens(cfg.resolution), text_tokens, images, half,
                                              cfg.model.gradient_checkpointing), 0.0,
                    f"{images} images x {arch.tokens(cfg.resolution)} image + {text_tokens} text tokens"
                    + (", checkpointed" if cfg.model.gradient_checkpointing else "")))
    return _finish(cfg, arch, rows, trained, reference)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else (f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k")


def _finish(cfg: PlanConfig, arch, rows: list[Row], trained: int, reference: str) -> MemoryPlan:
    device, host = sum(r.device for r in rows), sum(r.host for r in rows)
    headroom = (cfg.headroom_gib if cfg.headroom_gib is not None else 1 + 0.1 * cfg.card_gib) * GIB
    mode = f"LoRA r={cfg.model.lora_rank}" if cfg.model.lora_rank else "full fine-tune"
    dtype = "fp32" if cfg.mixed_precision == "no" else ("bf16" if cfg.mixed_precision == "auto"
                                                          else cfg.mixed_precision)
    description = (f"{cfg.model.pretrained} ({arch.kind}; denoiser {_count(arch.denoiser.params)} parameters, "
                   f"{_count(trained)} trained), {mode}, {cfg.resolution} px, batch {cfg.batch_size} x "
                   f"{cfg.images_per_example} images, {cfg.processes} x {cfg.parallel.strategy}"
                   f"{' + cpu_offload' if cfg.parallel.cpu_offload else ''}, {dtype}, {cfg.optimizer}, "
                   f"reference {reference}, gradient checkpointing "
                   f"{'on' if cfg.model.gradient_checkpointing else 'off'}")
    notes = []
    if arch.kind == "qwen-image":
        notes.append("Qwen-Image: counted from its architecture; unlike the SD3, FLUX and UNet estimates, not "
                     "checked against a measured run")
    if cfg.precompute:
        notes.append("the caching pass before training holds the VAE and text encoders instead of the optimizer")
    return MemoryPlan(config=dataclasses.asdict(cfg), description=description, rows=rows, device_total=device,
                      host_total=host, headroom=headroom, card=cfg.card_gib * GIB,
                      fits=device + headroom <= cfg.card_gib * GIB, notes=notes)


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a text table per process (GiB, or MiB for a plan under 1 GiB), with the verdict."""
    unit, scale = ("GiB", GIB) if max(plan.device_total, plan.host_total) >= GIB else ("MiB", 2**20)
    width = max(len(r.name) for r in plan.rows)

    def cell(value: float) -> str:
        return f"{value / scale:8.2f}"

    lines = [plan.description, "", f"{'':<{width}}  {'device':>8}  {'host':>8}  ({unit} per process)"]
    lines += [f"{r.name:<{width}}  {cell(r.device)}  {cell(r.host)}  {r.note}" for r in plan.rows]
    lines.append(f"{'total':<{width}}  {cell(plan.device_total)}  {cell(plan.host_total)}")
    verdict = "fits" if plan.fits else "does not fit"
    lines += ["", f"{verdict} a {plan.card / GIB:g} GiB card (with {plan.headroom / GIB:.1f} GiB headroom for the "
              f"CUDA context & fragmentation: {(plan.card - plan.headroom - plan.device_total) / GIB:+.1f} GiB left)"]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
