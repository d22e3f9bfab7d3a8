"""Optimizer and learning-rate schedule from an :class:`~diffusion_dpo.run_options.OptimSection`, for every recipe."""

from __future__ import annotations

import torch

from diffusion_dpo.run_options import OptimSection


def _adamw(params, lr: float, optim: OptimSection):
    return torch.optim.AdamW(params, lr=lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay)


def _adafactor(params, lr: float, optim: OptimSection):
    from transformers.optimization import Adafactor

    # A fixed learning rate (no relative step, no parameter scaling), as the Diffusion-DPO paper's SDXL run.
    return Adafactor(params, lr=lr, weight_decay=optim.weight_decay, clip_threshold=1.0, scale_parameter=False,
                     relative_step=False, warmup_init=False)


OPTIMIZERS = {"adamw": _adamw, "adafactor": _adafactor}


def peak_learning_rate(optim: OptimSection, num_processes: int) -> float:
    """learning_rate, times the examples per optimizer step when ``scale_lr`` (the paper: 1e-8 x 2048)."""
    per_step = optim.batch_size * optim.gradient_accumulation_steps * num_processes
    return optim.learning_rate * (per_step if optim.scale_lr else 1)


def build_optimizer(params, optim: OptimSection, total_steps: int, num_processes: int = 1):
    """(optimizer, lr scheduler) over the parameters that require grad; the schedule steps once per optimizer
    step, warming up for ``optim.warmup(total_steps)`` steps."""
    from diffusers.optimization import get_scheduler

    params = [p for p in params if p.requires_grad]
    optimizer = OPTIMIZERS[optim.optimizer](params, peak_learning_rate(optim, num_processes), optim)
    scheduler = get_scheduler(optim.scheduler, optimizer, num_warmup_steps=optim.warmup(total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler
