"""What the LLM SFT, reward and DPO recipes share around the engine: the run options they add (held-out
evaluation), the step count, the training feed, the optimizer built, prepared and resumed, held-out loaders,
and the end of a run (data_stats.json, summary.json)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch.utils.data import DataLoader

from diffusion_dpo.config import option
from diffusion_dpo.engine import Engine, ExampleFeed, build_optimizer, sharding
from diffusion_dpo.run_options import OptimSection, TrainingRunOptions

DATA_STATS = "data_stats.json"
# output_dir's help in sft, reward and dpo
RUN_FOLDER_HELP = f"config.yaml, metrics.jsonl, checkpoints/, final/ and {DATA_STATS} go here"


@dataclass
class HeldOutRunOptions(TrainingRunOptions):
    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset({"eval_every"})  # a cadence: resumable
    eval_every: int | None = option(None,
                                    "optimizer steps between held-out evaluations (null: at the end only)",
                                    lambda v: v is None or v >= 1, "null or at least 1 step")


def start(cfg: TrainingRunOptions, name: str, unit: str = "tokens", run_files: tuple[str, ...] = (DATA_STATS,)):
    """The engine of an LLM run (folder rule, config.yaml, seed) and its tokenizer: (engine, cfg, tokenizer)."""
    from diffusion_dpo.llm import models

    engine = Engine(cfg, seed=cfg.optim.seed, gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
                    unit=unit, name=name, run_files=run_files, owner=f"llm {name}")
    return engine, engine.cfg, models.load_tokenizer(engine.cfg.model.name_or_path)


def trainable_lm(engine: Engine, model_cfg) -> torch.nn.Module:
    """The causal LM to tune, in fp32 (full or LoRA as ``model_cfg`` says), on the engine's device."""
    from diffusion_dpo.llm import models

    lm = models.load_causal_lm(model_cfg.name_or_path, torch.float32, model_cfg.attn_implementation)
    return models.prepare_trainable(lm, model_cfg, "CAUSAL_LM").to(engine.device)


def report(summary: dict[str, Any]) -> int:
    """What ``diffusion-dpo llm <method>`` prints when its run is done (the main process only)."""
    if summary["process_index"] == 0:
        print(f"wrote {summary['final']} ({summary['steps']} steps; held-out {summary.get('eval', {})})")
    return 0


def total_steps(optim: OptimSection, batches_per_epoch: int) -> int:
    """optim.max_steps, or the optimizer steps of optim.epochs passes of ``batches_per_epoch``
    micro-batches."""
    if optim.max_steps is not None:
        return optim.max_steps
    return max(1, math.ceil(optim.epochs * batches_per_epoch / optim.gradient_accumulation_steps))


def training_feed(engine: Engine, examples: list[dict], collate: Callable, seed: int) -> ExampleFeed:
    return ExampleFeed(examples, collate, seed=seed, rank=engine.rank, world=engine.world,
                       device=engine.device)


def eval_loader(engine: Engine, examples: list[dict], batch_size: int,
                collate: Callable) -> DataLoader | None:
    """Held-out examples split over the processes (None when there are none)."""
    if not examples:
        return None
    return engine.accelerator.prepare_data_loader(DataLoader(examples, batch_size=batch_size,
                                                             collate_fn=collate))


class Remembered:
    """``engine.fit``'s evaluate: runs ``evaluate()`` and keeps its last result (the summary's held-out
    figures)."""

    def __init__(self, evaluate: Callable[[], dict[str, float]]):
        self.evaluate, self.last = evaluate, {}

    def __call__(self, step: int) -> dict[str, float]:
        self.last = self.evaluate()
        return self.last


def prepare_training(engine: Engine, module: torch.nn.Module, optim: OptimSection, feed: ExampleFeed):
    """The module sharded by its decoder layers under parallel.strategy=fsdp; AdamW/Adafactor and the
    schedule over the run's steps; the module prepared (DDP) with its optimizer; the checkpoint this run
    continues from, if any, restored. Returns (model, optimizer, scheduler, steps)."""
    module = engine.shard(module, sharding.no_split_blocks(module))  # its parameters become DTensors first
    steps = total_steps(optim, feed.batches_per_epoch(optim.batch_size))
    optimizer, scheduler = build_optimizer(module.parameters(), optim, steps, engine.world)
    model, optimizer = engine.prepare(module, optimizer)
    engine.resume(module, optimizer, scheduler, feed)
    return model, optimizer, scheduler, steps


def finish(engine: Engine, module: torch.nn.Module, final, data_report: dict, summary: dict[str, Any],
           last: dict[str, float]) -> dict[str, Any]:
    """data_stats.json and summary.json written, the trackers closed; the summary (with every process's weight
    digest and this process's rank) returned."""
    if engine.is_main:
        (engine.out / DATA_STATS).write_text(json.dumps(data_report, indent=2) + "\n")
    return engine.finish({"final": str(final), "metrics": str(engine.metrics_path), "data": data_report,
                          "last_metrics": last, "weight_digests": engine.digests(module)} | summary)
