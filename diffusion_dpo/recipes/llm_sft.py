"""``diffusion-dpo llm sft``: supervised fine-tuning on demonstrations, the first stage of InstructGPT.

Cross-entropy on completion tokens only: the prompt is context, not a target, so its tokens (and padding) are
masked out of the loss. The loss is the mean over the batch's completion tokens.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import partial

import torch

from diffusion_dpo.config import option, parse_args
from diffusion_dpo.engine import Engine, StepContext, StepOutput, releases_output_dir
from diffusion_dpo.llm import common, models
from diffusion_dpo.llm.collate import DemoCollator
from diffusion_dpo.llm.data import tokenize_demos
from diffusion_dpo.llm.logprobs import completion_nll
from diffusion_dpo.recipes import llm_common
from diffusion_dpo.run_options import OptimSection


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
class SFTConfig(llm_common.HeldOutRunOptions):
    output_dir: str = option("runs/llm-sft", llm_common.RUN_FOLDER_HELP)
    model: models.ModelConfig = option(models.ModelConfig, "the model to tune")
    data: DemoData = option(DemoData, "demonstrations")
    optim: OptimSection = option(OptimSection(learning_rate=2e-5, warmup_ratio=0.1),
                                 "optimizer and schedule (learning_rate 2e-5 suits a full fine-tune; ~2e-4 "
                                 "LoRA)")


def sft_step(model, batch: dict, ctx: StepContext) -> StepOutput:
    """The mean negative log-likelihood over the batch's completion tokens; units: the batch's real tokens."""
    nll, n = completion_nll(model, batch)
    return StepOutput(nll / n.clamp(min=1), {"completion_tokens": n.float()},
                      units=int(batch["attention_mask"].sum()))


@torch.no_grad()
def held_out_loss(engine: Engine, model, loader) -> dict[str, float]:
    """Completion loss and perplexity over the held-out examples of every process."""
    model.eval()
    total = torch.zeros(2, device=engine.device)
    for batch in loader:
        with engine.accelerator.autocast():
            nll, n = completion_nll(model, batch)
        total += torch.stack([nll.float(), n.float()])
    model.train()
    nll, n = engine.accelerator.reduce(total, reduction="sum").tolist()
    loss = nll / max(n, 1)
    engine.accelerator.print(f"step {engine.step}: held-out completion loss {loss:.4f}")
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50))}


@releases_output_dir
def run(cfg: SFTConfig) -> dict:
    """Train as ``cfg`` says: data, model, optimizer (resumed if asked), the engine's loop with held-out
    evaluations, final/; returns the summary (also in summary.json)."""
    engine, cfg, tokenizer = llm_common.start(cfg, "sft", run_files=(llm_common.DATA_STATS,))
    d = cfg.data
    tokenize = partial(tokenize_demos, tokenizer=tokenizer, **common.token_budget(d),
                       completion_column=d.completion_column, messages_column=d.messages_column)
    train, held, data_report = common.load_examples(d, tokenize, cfg.optim.seed, engine.accelerator.print)

    policy = llm_common.trainable_lm(engine, cfg.model)
    policy.train()
    collate = DemoCollator(tokenizer.pad_token_id)
    feed = llm_common.training_feed(engine, train, collate, cfg.optim.seed)
    held_loader = llm_common.eval_loader(engine, held, cfg.optim.batch_size, collate)
    model, optimizer, scheduler, steps = llm_common.prepare_training(engine, policy, cfg.optim, feed)

    evaluate = llm_common.Remembered(lambda: held_out_loss(engine, model, held_loader)
                                      if held_loader is not None else {})
    last = engine.fit(model=model, policy=policy, optimizer=optimizer, scheduler=scheduler, feed=feed,
                      batch_size=cfg.optim.batch_size, step_fn=lambda batch, ctx: sft_step(model, batch, ctx),
                      max_steps=steps, max_grad_norm=cfg.optim.max_grad_norm, evaluate=evaluate,
                      eval_every=cfg.eval_every)
    final = engine.save_final(policy, lambda folder: models.save_pretrained(policy, tokenizer, folder))
    return llm_common.finish(engine, policy, final, data_report, {
        "train_rows": len(train), "eval_rows": len(held), "eval": evaluate.last}, last)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return llm_common.report(run(parse_args(SFTConfig, argv, prog="diffusion-dpo llm sft", description=__doc__)))
