"""``diffusion-dpo llm sft``: supervised fine-tuning on demonstrations, the first stage of InstructGPT.

Cross-entropy on completion tokens only: the prompt is context, not a target, so its tokens (and padding) are
masked out of the loss. The loss is the mean over the batch's completion tokens.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch.utils.data import DataLoader

from diffusion_dpo.config import option, parse_args
from diffusion_dpo.llm import common, models
from diffusion_dpo.llm.data import DemoCollator, tokenize_demos
from diffusion_dpo.llm.logprobs import token_logps


@dataclass
class DemoData(common.DataSection):
    source: str = option(
        "trl-lib/Capybara", "hub dataset id, or a local parquet/JSON/JSONL file or folder of them"
    )
    completion_column: str = option(
        "completion", "column of the demonstrated completion (text or conversation)"
    )
    messages_column: str = option(
        "messages",
        "column of a whole conversation, used when there is no completion "
        "column: its last (assistant) message is the completion",
    )


@dataclass
class SFTOptim(common.OptimSection):
    learning_rate: float = option(2e-5, "peak AdamW learning rate (full fine-tune; ~2e-4 suits LoRA)")


@dataclass
class SFTConfig:
    model: models.ModelConfig = option(models.ModelConfig, "the model to tune")
    data: DemoData = option(DemoData, "demonstrations")
    optim: SFTOptim = option(SFTOptim, "optimiser and schedule")
    output_dir: str = option("runs/llm-sft", "config.yaml, metrics.jsonl and final/ go here")
    overwrite: bool = option(False, "allow an output_dir that already holds a run")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto", "autocast dtype; auto = bf16 on GPU, none on CPU"
    )
    log_every: int = option(10, "optimizer steps between metrics.jsonl rows")
    eval_every: int | None = option(
        None, "optimizer steps between held-out evaluations (null = at the end only)"
    )
    tensorboard: bool = option(True, "also log to tensorboard under output_dir")


def completion_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of completion-token negative log-likelihoods, number of completion tokens) of one batch."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    mask = batch["completion_mask"][:, 1:].float()
    nll = -(token_logps(logits[:, :-1], batch["input_ids"][:, 1:]) * mask).sum()
    return nll, mask.sum()


def run(cfg: SFTConfig) -> dict:
    r = common.Run(cfg, grad_accum=cfg.optim.gradient_accumulation_steps, seed=cfg.optim.seed)
    acc = r.accelerator
    tokenizer = models.load_tokenizer(cfg.model.name_or_path)
    d = cfg.data
    tokenize = partial(
        tokenize_demos,
        tokenizer=tokenizer,
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        prompt_column=d.prompt_column,
        completion_column=d.completion_column,
        messages_column=d.messages_column,
    )
    train, held, data_report = common.load_examples(
        d, lambda rows, source: tokenize(rows, source=source), cfg.optim.seed, acc.print
    )

    model = models.load_causal_lm(cfg.model.name_or_path, torch.float32, cfg.model.attn_implementation)
    model = models.prepare_trainable(model, cfg.model, "CAUSAL_LM").to(r.device)
    model.train()
    collate = DemoCollator(tokenizer.pad_token_id)
    loader = DataLoader(
        train,
        batch_size=cfg.optim.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.optim.seed),
        drop_last=len(train) >= cfg.optim.batch_size,
    )
    eval_loader = DataLoader(held, batch_size=cfg.optim.batch_size, collate_fn=collate) if held else None
    steps = common.total_steps(cfg.optim, len(loader) // acc.num_processes or 1)
    optimizer, scheduler = common.make_optimizer(model.parameters(), cfg.optim, steps)
    model, optimizer, loader = acc.prepare(model, optimizer, loader)
    eval_loader = acc.prepare_data_loader(eval_loader) if eval_loader is not None else None

    def step_fn(batch):
        with acc.autocast():
            nll, n = completion_nll(model, batch)
        return nll / n.clamp(min=1), {"completion_tokens": float(n)}, int(batch["attention_mask"].sum())

    final_eval: dict[str, float] = {}

    @torch.no_grad()
    def eval_fn(step: int) -> None:
        if eval_loader is None:
            return
        model.eval()
        total = torch.zeros(2, device=r.device)
        for batch in eval_loader:
            with acc.autocast():
                nll, n = completion_nll(model, batch)
            total += torch.stack([nll.float(), n])
        model.train()
        nll, n = acc.reduce(total, reduction="sum").tolist()
        final_eval.update(
            {"eval/loss": nll / max(n, 1), "eval/perplexity": math.exp(min(nll / max(n, 1), 50))}
        )
        r.log(step, final_eval)
        acc.print(f"step {step}: held-out completion loss {final_eval['eval/loss']:.4f}")

    done = common.train_loop(
        r,
        model,
        optimizer,
        scheduler,
        loader,
        steps=steps,
        step_fn=step_fn,
        max_grad_norm=cfg.optim.max_grad_norm,
        log_every=cfg.log_every,
        eval_fn=eval_fn,
        eval_every=cfg.eval_every,
        desc="sft",
    )
    final = r.out / "final"
    models.save_model(acc, model, tokenizer, final)
    r.write_json("data_stats.json", data_report)
    wall = r.finish()
    return {
        "output_dir": str(r.out),
        "final": str(final),
        "metrics": str(r.out / "metrics.jsonl"),
        "steps": done,
        "train_rows": len(train),
        "eval_rows": len(held),
        "data": data_report,
        "eval": final_eval,
        "process_index": acc.process_index,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(
        SFTConfig, sys.argv[1:] if argv is None else argv, prog="diffusion-dpo llm sft", description=__doc__
    )
    summary = run(cfg)
    if summary["process_index"] == 0:
        print(f"wrote {summary['final']} ({summary['steps']} steps; held-out {summary['eval']})")
    return 0
