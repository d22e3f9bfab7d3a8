"""The config sections every command shares: where a run writes and how it resumes (RunOptions), what
generating and training commands add (GenerationRunOptions, TrainingRunOptions), and the training sections
(optimizer, preference loss, EMA, sharding). The machinery that reads them is diffusion_dpo.config."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal, Optional

from diffusion_dpo.config import ConfigError, at_least_one, non_negative, option, positive


@dataclasses.dataclass
class RunOptions:
    # RESUME_SAFE (here and in other sections): the keys a resume may change, because they do not change what
    # the steps already taken meant (engine.resume_settings); every other key must stay as the run had it.
    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset({"output_dir", "mixed_precision"})
    output_dir: str = option("runs/run", "the run's folder: config.yaml, metrics and results go here")
    resume: Optional[str] = option(
        None, "null: start fresh (an output_dir holding a run is refused unless overwrite=true); auto: "
        "continue the run in output_dir from its last complete state, or start fresh if there is none; or "
        "a checkpoint folder (output_dir/checkpoints/step-N)")
    overwrite: bool = option(False, "remove the run already in output_dir and start afresh")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = option(
        "auto", "compute dtype of forward passes and frozen modules (trained weights stay fp32); auto: bf16 "
        "on a CUDA GPU, no (fp32) otherwise; the resolved value goes to config.yaml")


def auto_or_null(v: Any) -> bool:
    """A ``resume`` value for a command without checkpoints: continue (auto) or start fresh (null)."""
    return v is None or v.strip().lower() in ("", "none", "null", "auto")


@dataclasses.dataclass
class GenerationRunOptions(RunOptions):
    """Run options of a command that generates images and continues from the pieces it finished (label's
    shards, evaluate's images) instead of from checkpoints; by default a rerun continues."""
    resume: Optional[str] = option(
        "auto", "auto: continue the run in output_dir from the pieces it finished (made with the same "
        "settings, which are checked), or start fresh if there is none; null: start fresh (an output_dir "
        "holding a run is refused unless overwrite=true)", auto_or_null, "auto or null")
    overwrite: bool = option(False, "remove the run already in output_dir and start afresh (whatever resume "
                             "says: the default resume=auto need not be changed)")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = option(
        "auto", "dtype of the pipelines' weights: no (fp32), fp16 or bf16; auto: bf16 on a CUDA device, fp32 "
        "otherwise")


@dataclasses.dataclass
class EMASection:
    """An exponential moving average of the trained weights (engine.ema; the section lives here, not there,
    because every training config embeds it and the engine package imports this module)."""
    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset({"final"})  # which weights final/ holds: no step's meaning
    decay: float = option(0.0, "EMA decay per update: ema = decay * ema + (1 - decay) * weights (0: no EMA; "
                          "0.999 averages over about 1000 updates)", lambda v: 0 <= v < 1, "a number in [0, 1)")
    every: int = option(1, "update the EMA every N optimizer steps", at_least_one, "at least 1 step")
    start_step: int = option(0, "before this optimizer step the EMA copies the weights instead of averaging",
                             non_negative, "0 or more steps")
    final: bool = option(False, "write final/ from the EMA weights instead of the trained ones (needs decay > 0)")

    def check(self) -> None:
        if self.final and not self.decay:
            raise ConfigError("config key 'final': expected false when ema.decay is 0 (there is no EMA to "
                              "write), got true")


@dataclasses.dataclass
class ParallelSection:  # re-exported by diffusion_dpo.engine.sharding, which applies it
    # How the weights are laid out, not what the steps compute: a checkpoint loads under either layout.
    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset({"strategy", "cpu_offload", "frozen"})
    strategy: Literal["ddp", "fsdp"] = option(
        "ddp", "ddp: data parallel (every process holds the whole trained model; accelerate's DDP); fsdp: torch "
        "FSDP2 shards the trained model, one unit per block (UNet down/mid/up blocks, SD3/FLUX transformer "
        "blocks, an LLM's decoder layers), each process holding 1/N of the weights, gradients and optimizer "
        "state (fp32 master weights; bf16 compute under mixed_precision=bf16, gradients reduced in fp32)")
    cpu_offload: bool = option(False, "fsdp on a CUDA GPU: keep the trained model's shards, gradients and "
                               "optimizer state in CPU memory (FSDP2 CPUOffloadPolicy; slower, for models that "
                               "do not fit even sharded)")
    frozen: Literal["shard", "offload"] = option(
        "shard", "fsdp: where the frozen full copy of the starting model (the DPO reference of a full fine-"
        "tune, grpo's online.reference=copy, llm dpo's and llm ppo's reference.kind=copy) lives. shard: sharded like the trained model, gathered block by "
        "block in its forward; offload: whole in CPU memory, on the GPU for its forward only. VAE and text "
        "encoders stay whole on every GPU (precompute=true frees them); LoRA's reference has no copy")

    def check(self) -> None:
        if self.cpu_offload and self.strategy != "fsdp":
            raise ConfigError("config key 'cpu_offload': expected false unless strategy is fsdp (data "
                              "parallelism keeps whole weights on every GPU), got true")


@dataclasses.dataclass
class TrainingRunOptions(RunOptions):
    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset({"log_every", "tensorboard", "checkpoint_every",
                                                       "checkpoints_keep", "max_nonfinite_steps"})
    log_every: int = option(10, "write metrics every N optimizer steps (averaged over them)", at_least_one,
                            "at least 1 step")
    tensorboard: bool = option(True, "also log the metrics to tensorboard under output_dir/logs")
    checkpoint_every: int = option(500, "save a resumable checkpoint every N optimizer steps (0: never)",
                                   non_negative, "0 (never) or a positive number of steps")
    checkpoints_keep: Optional[int] = option(3, "how many checkpoints to keep, newest first (null: all)",
                                             lambda v: v is None or v >= 1, "null or at least 1")
    parallel: ParallelSection = option(
        ParallelSection, "data parallel or sharded (FSDP2) training over the processes that accelerate launch "
        "or torchrun start (docs/train.md, 'Many processes')")
    max_nonfinite_steps: int = option(
        10, "a step whose loss or gradient is NaN/inf is skipped (no update) and counted; this many in a row "
        "stop the run with an error naming the step and the quantity", at_least_one, "at least 1")
    ema: EMASection = option(EMASection, "an EMA of the trained weights: kept in checkpoints, optionally "
                             "written to final/ (memory: one fp32 copy of the trained parameters)")


@dataclasses.dataclass
class OptimSection:
    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset({"max_steps", "epochs"})  # the step budget
    optimizer: Literal["adamw", "adafactor"] = option(
        "adamw", "adamw (torch) or adafactor (transformers, fixed lr; less memory)")
    learning_rate: float = option(1e-5, "peak learning rate", positive, "a positive number")
    scale_lr: bool = option(False, "multiply learning_rate by the examples per optimizer step (batch_size x "
                            "gradient_accumulation_steps x processes), as the Diffusion-DPO paper's --scale_lr")
    betas: list[float] = option([0.9, 0.999], "AdamW betas",
                                lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)")
    eps: float = option(1e-8, "AdamW epsilon", positive, "a positive number")
    weight_decay: float = option(0.0, "decoupled weight decay (AdamW and Adafactor)", non_negative,
                                 "0 or more")
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                       "polynomial"] = option("linear", "learning-rate schedule after warmup")
    warmup_steps: Optional[int] = option(None, "optimizer steps of linear warmup from 0 (null: warmup_ratio)",
                                         lambda v: v is None or v >= 0, "null or 0 or more steps")
    warmup_ratio: float = option(0.0, "fraction of the optimizer steps spent warming up (when warmup_steps "
                                 "is null)", lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
    batch_size: int = option(8, "examples (pairs, rankings, demonstrations) per process per micro-batch",
                             at_least_one, "at least 1")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", at_least_one, "at least 1")
    epochs: float = option(1.0, "passes over the training rows (when max_steps is null)", positive,
                           "a positive number")
    max_steps: Optional[int] = option(None, "optimizer steps to run; null: from epochs",
                                      lambda v: v is None or v >= 1, "null or at least 1 step")
    max_grad_norm: float = option(1.0, "clip the gradient's global L2 norm to this (0: no clipping)",
                                  non_negative, "0 (no clipping) or a positive norm")
    seed: int = option(0, "seed of initialisation, data order, augmentation and noise")

    def warmup(self, steps: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * steps)


@dataclasses.dataclass
class PreferenceLossSection:
    beta: float = option(0.1, "DPO beta: strength of the anchor to the reference", positive,
                         "a positive number")
    loss_type: Literal["sigmoid", "hinge", "ipo"] = option(
        "sigmoid", "sigmoid (DPO), hinge (SLiC), ipo (IPO)")
    label_smoothing: float = option(0.0, "conservative DPO: assumed probability that a label is flipped "
                                    "(sigmoid only)", lambda v: 0 <= v < 0.5, "a probability in [0, 0.5)")

    def check(self) -> None:
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError(f"config key 'label_smoothing': expected 0 unless loss_type is sigmoid, got "
                              f"{self.label_smoothing!r}")
