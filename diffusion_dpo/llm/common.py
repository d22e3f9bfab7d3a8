"""What every LLM recipe shares: data and optimiser config sections, the run folder, metrics, LR schedule."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from diffusion_dpo.config import option, save_config
from diffusion_dpo.errors import InputError


@dataclass
class DataSection:
    source: str = option(
        "trl-lib/ultrafeedback_binarized",
        "hub dataset id, or a local parquet/JSON/JSONL file or folder of them",
    )
    subset: str | None = option(None, "hub dataset configuration name (e.g. 'harmless-base'); null = default")
    split: str = option("train", "split to train on (a local folder's subfolder of that name, if any)")
    eval_source: str | None = option(None, "held-out rows from another source; null = the training source")
    eval_split: str | None = option(
        None, "split of held-out rows (e.g. 'test'); null = hold out eval_fraction of the training rows"
    )
    eval_fraction: float = option(
        0.05, "fraction of training rows held out when eval_split is null (0 = none)"
    )
    max_rows: int | None = option(None, "read at most this many training rows (null = all)")
    max_eval_rows: int | None = option(512, "read at most this many held-out rows (null = all)")
    max_length: int = option(
        1024,
        "token budget of prompt + completion; longer completions are cut (start kept), "
        "rows whose prompt fills it are dropped",
    )
    max_prompt_length: int | None = option(
        512, "prompts longer than this are cut on the prompt_truncation side (null = no separate prompt limit)"
    )
    prompt_truncation: Literal["left", "right"] = option(
        "left",
        "side of a prompt longer than max_prompt_length that is cut: left drops its oldest tokens and keeps the "
        "end (a chat prompt's latest turns and the assistant's generation header); right keeps its start",
    )
    prompt_column: str = option(
        "prompt",
        "column of the prompt (text or conversation); may be absent when the completions share their start",
    )


@dataclass
class OptimSection:
    learning_rate: float = option(1e-5, "peak AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    betas: list[float] = option([0.9, 0.999], "AdamW betas")
    scheduler: Literal["constant", "linear", "cosine"] = option(
        "linear", "decay after warmup (to 0 at the end)"
    )
    warmup_ratio: float = option(0.1, "fraction of the optimizer steps spent warming up linearly from 0")
    batch_size: int = option(8, "rows (pairs, rankings, demonstrations) per device per micro-batch")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    epochs: float = option(1.0, "passes over the training rows (ignored when max_steps is set)")
    max_steps: int | None = option(None, "optimizer steps to run; null = from epochs")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0 = no clipping)")
    seed: int = option(0, "seed of initialisation, shuffling and sampling")


def total_steps(optim: OptimSection, batches_per_epoch: int) -> int:
    if optim.max_steps is not None:
        return optim.max_steps
    return max(1, math.ceil(optim.epochs * batches_per_epoch / optim.gradient_accumulation_steps))


def make_optimizer(params, optim: OptimSection, steps: int):
    """AdamW and a warmup-then-decay schedule over ``steps`` optimizer steps."""
    from transformers import get_scheduler

    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=optim.learning_rate, weight_decay=optim.weight_decay, betas=tuple(optim.betas)
    )
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[optim.scheduler]
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=int(optim.warmup_ratio * steps), num_training_steps=steps
    )
    return optimizer, scheduler


def mixed_precision(name: str) -> str:
    """'auto' -> bf16 autocast on a GPU, none on CPU."""
    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() else "no"


class Run:
    """A training run's folder and bookkeeping: accelerator, config.yaml, metrics.jsonl, tensorboard, timing.

    Refuses an output_dir that already holds a run's metrics or final weights (nothing written is lost)
    unless ``overwrite``.
    """

    def __init__(self, cfg: Any, *, grad_accum: int, seed: int):
        # Every LLM recipe config has output_dir, mixed_precision, tensorboard and overwrite at its top level.
        output_dir, mixed_precision_name = cfg.output_dir, cfg.mixed_precision
        tensorboard, overwrite = cfg.tensorboard, cfg.overwrite
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.out = Path(output_dir)
        if not overwrite and ((self.out / "metrics.jsonl").exists() or (self.out / "final").exists()):
            raise InputError(
                f"output_dir {self.out} already holds a run; choose another or set overwrite=true"
            )
        self.accelerator = Accelerator(
            mixed_precision=mixed_precision(mixed_precision_name),
            gradient_accumulation_steps=grad_accum,
            log_with="tensorboard" if tensorboard else None,
            project_dir=str(self.out),
        )
        set_seed(seed, device_specific=False)
        self.is_main = self.accelerator.is_main_process
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            (self.out / "metrics.jsonl").write_text("")
        if tensorboard:
            self.accelerator.init_trackers("tensorboard")
        self.start = time.perf_counter()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalars over processes."""
        if self.accelerator.num_processes == 1:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        t = self.accelerator.reduce(t, reduction="mean")
        return dict(zip(values, t.tolist()))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {
            "step": step,
            **{k: float(v) for k, v in metrics.items()},
            "time_s": time.perf_counter() - self.start,
        }
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def write_json(self, name: str, payload: dict) -> None:
        if self.is_main:
            (self.out / name).write_text(json.dumps(payload, indent=2) + "\n")

    def finish(self) -> float:
        self.accelerator.end_training()
        return time.perf_counter() - self.start


def read_metrics(output_dir: str | Path) -> list[dict[str, float]]:
    """The rows of a run's metrics.jsonl."""
    return [
        json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line
    ]


def weights_checksum(model: torch.nn.Module) -> str:
    """A short hash of every parameter's bytes (identical weights on every process -> identical hashes)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_examples(data: DataSection, tokenize, seed: int, log=print) -> tuple[list[dict], list[dict], dict]:
    """Read and tokenise the training rows and the held-out rows (another split or source, or a seeded
    ``eval_fraction`` of the training rows). ``tokenize(rows, source=name)`` returns (examples, TokenStats).
    Returns (train, held_out, {"train": stats, "eval": stats})."""
    from diffusion_dpo.llm.data import holdout, read_rows

    name = f"{data.source}[{data.split}]"
    train, stats = tokenize(
        read_rows(data.source, data.split, subset=data.subset, max_rows=data.max_rows), source=name
    )
    log(f"{name}: {stats.describe()}")
    report = {"train": stats.as_dict()}
    if data.eval_split is None and data.eval_source is None:
        train, held = holdout(train, data.eval_fraction, seed)
        held = held[: data.max_eval_rows] if data.max_eval_rows is not None else held
    else:
        eval_source, eval_split = data.eval_source or data.source, data.eval_split or "train"
        eval_name = f"{eval_source}[{eval_split}]"
        held, eval_stats = tokenize(
            read_rows(eval_source, eval_split, subset=data.subset, max_rows=data.max_eval_rows),
            source=eval_name,
        )
        log(f"{eval_name}: {eval_stats.describe()}")
        report["eval"] = eval_stats.as_dict()
    if not train:
        raise InputError(f"{name}: no training rows left after tokenisation ({stats.describe()})")
    return train, held, report


def train_loop(
    run: Run,
    model,
    optimizer,
    scheduler,
    loader,
    *,
    steps: int,
    step_fn,
    max_grad_norm: float,
    log_every: int,
    eval_fn=None,
    eval_every: int | None = None,
    desc: str = "train",
) -> int:
    """The optimiser loop shared by SFT, reward-model and DPO training.

    ``step_fn(batch) -> (loss, metrics: dict[str, float], n_tokens: int)`` runs one micro-batch; the loop
    accumulates gradients (accelerate), clips, steps, and every ``log_every`` optimizer steps logs the metrics
    averaged over micro-batches and processes with lr, grad_norm and tokens_per_s. ``eval_fn(step)`` runs
    every ``eval_every`` steps and at the end. Returns the number of optimizer steps taken.
    """
    from tqdm.auto import tqdm

    acc = run.accelerator
    step, sums, count, tokens, grad_norm = 0, {}, 0, 0, 0.0
    tick = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, disable=not run.is_main)
    epoch = 0
    while step < steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            with acc.accumulate(model):
                loss, metrics, n_tokens = step_fn(batch)
                acc.backward(loss)
                if acc.sync_gradients:
                    norm = acc.clip_grad_norm_(
                        model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf
                    )
                    grad_norm = float(norm) if norm is not None else 0.0
                optimizer.step()
                scheduler.step() if acc.sync_gradients else None
                optimizer.zero_grad(set_to_none=True)
            for k, v in {"loss": float(loss.detach()), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            tokens += n_tokens
            if not acc.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == steps:
                elapsed = time.perf_counter() - tick
                logged = run.mean({k: v / count for k, v in sums.items()})
                tok_s = tokens * acc.num_processes / max(elapsed, 1e-9)
                logged.update(
                    lr=scheduler.get_last_lr()[0], grad_norm=grad_norm, tokens_per_s=tok_s, epoch=epoch
                )
                run.log(step, logged)
                bar.set_postfix(loss=f"{logged['loss']:.4f}", tok_s=f"{tok_s:.0f}")
                sums, count, tokens, tick = {}, 0, 0, time.perf_counter()
            if eval_fn is not None and eval_every and step % eval_every == 0 and step != steps:
                eval_fn(step)
            if step >= steps:
                break
        epoch += 1
    bar.close()
    if eval_fn is not None:
        eval_fn(step)
    return step
