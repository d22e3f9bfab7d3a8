"""``diffusion-dpo llm reward``: a reward model from preference pairs or rankings (InstructGPT's second
stage).

The model is a sequence-classification model with one output, read at the last real token of prompt +
completion (``models.TokenScorer``). Loss:

    pairs     -log sigma(r_chosen - r_rejected - margin) [+ center_coef (r_chosen + r_rejected)^2]
    rankings  the same over all C(K,2) pairs of one prompt's K responses, in one batch element, / C(K,2)

(``losses.bradley_terry_loss``, ``losses.ranking_loss``). After training a bias is set so that the chosen
(best-ranked) completions of a reference set score mean 0, InstructGPT's normalisation, which keeps the
reward's scale meaningful for PPO; it is stored in ``final/reward_normalization.json`` and applied by
``models.load_score_model``. Held-out accuracy and margin are logged and returned.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from diffusion_dpo.config import option, parse_args
from diffusion_dpo.engine import Engine, StepContext, StepOutput, releases_output_dir
from diffusion_dpo.llm import common, models
from diffusion_dpo.llm.collate import PairCollator, RankingCollator
from diffusion_dpo.llm.data import tokenize_pairs, tokenize_rankings
from diffusion_dpo.losses import bradley_terry_loss, implicit_accuracy, ranking_loss, ranking_pairs
from diffusion_dpo.recipes import llm_common
from diffusion_dpo.run_options import OptimSection


@dataclass
class RewardData(common.DataSection):
    format: Literal["pairs", "rankings"] = option(
        "pairs",
        "pairs: prompt, chosen, rejected; rankings: prompt and a list of K >= 2 responses, best first",
    )
    chosen_column: str = option("chosen", "pairs: column of the preferred completion")
    rejected_column: str = option("rejected", "pairs: column of the dispreferred completion")
    margin_column: str | None = option(
        None,
        "pairs: optional column of a margin the chosen reward must exceed "
        "the rejected one by (Llama 2); null = no margin",
    )
    responses_column: str = option("responses", "rankings: column listing the K responses, best first")


@dataclass
class NormalizeSection:
    enabled: bool = option(
        True, "after training, shift rewards so that the reference set's chosen completions score mean 0"
    )
    reference: Literal["eval", "train"] = option(
        "eval",
        "which rows' chosen completions define mean 0 (eval "
        "falls back to train when there are no held-out rows)",
    )
    max_rows: int = option(1024, "use at most this many reference rows", lambda v: v >= 1, "at least 1 row")


@dataclass
class RewardConfig(llm_common.HeldOutRunOptions):
    output_dir: str = option("runs/llm-reward", llm_common.RUN_FOLDER_HELP)
    model: models.ModelConfig = option(
        models.ModelConfig, "the model to start from (a causal LM gets a new one-output score head)")
    data: RewardData = option(RewardData, "comparisons")
    center_coef: float = option(0.0,
                                "weight of the centering term (r_chosen + r_rejected)^2 (e.g. 0.01); 0: off",
                                lambda v: v >= 0, "0 (off) or a positive weight")
    normalize: NormalizeSection = option(NormalizeSection, "post-training reward normalisation")
    optim: OptimSection = option(OptimSection(learning_rate=1e-5, warmup_ratio=0.1),
                                 "optimizer and schedule (learning_rate 1e-5 suits a full fine-tune; ~1e-4 "
                                 "LoRA)")


def sequence_rewards(scorer, batch: dict) -> torch.Tensor:
    """One reward per row of the batch: the score at its last real token. [N] float32."""
    scores = scorer(batch["input_ids"], batch["attention_mask"])
    return models.last_token(scores, batch["attention_mask"])


def ranked_matrix(flat: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Flattened rewards of ragged rankings -> [B, K_max]: each row's K_b rewards, then zeros."""
    out = flat.new_zeros(len(counts), int(counts.max()))
    start = 0
    for b, k in enumerate(counts.tolist()):
        out[b, :k] = flat[start : start + k]
        start += k
    return out


def reward_batch(scorer, batch: dict, cfg: RewardConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row losses and per-comparison (chosen reward, rejected reward) of one batch."""
    flat = sequence_rewards(scorer, batch)
    if "num_responses" in batch:
        counts = batch["num_responses"]
        rewards = ranked_matrix(flat, counts)
        losses = ranking_loss(rewards, counts, center_coef=cfg.center_coef)
        i, j = ranking_pairs(rewards.shape[1])
        valid = j[None, :] < counts[:, None].cpu()
        chosen, rejected = rewards[:, i][valid.to(rewards.device)], rewards[:, j][valid.to(rewards.device)]
        return losses, {
            "chosen": chosen.detach(),
            "rejected": rejected.detach(),
            "best": rewards[:, 0].detach(),
        }
    n = flat.shape[0] // 2
    losses = bradley_terry_loss(flat[:n], flat[n:], batch.get("margin"), center_coef=cfg.center_coef)
    return losses, {"chosen": flat[:n].detach(), "rejected": flat[n:].detach(), "best": flat[:n].detach()}


def reward_step(scorer, batch: dict, cfg: RewardConfig, ctx: StepContext) -> StepOutput:
    """Per-row losses, accuracy and margin of the comparisons; units: the batch's real tokens."""
    losses, out = reward_batch(scorer, batch, cfg)
    metrics = {"accuracy": implicit_accuracy(out["chosen"], out["rejected"]),
               "margin": out["chosen"] - out["rejected"],
               "reward_mean": torch.cat([out["chosen"], out["rejected"]]).mean()}
    return StepOutput(losses, metrics, units=int(batch["attention_mask"].sum()))


@torch.no_grad()
def held_out_stats(engine: Engine, scorer, loader, cfg: RewardConfig) -> dict[str, float]:
    """Means over every process's examples: loss, accuracy, margin, and the mean reward of the best response
    (sums and counts are reduced, so rankings with ragged pair counts gather fine)."""
    scorer.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=engine.device)
    for batch in loader:
        with engine.accelerator.autocast():
            losses, out = reward_batch(scorer, batch, cfg)
        parts = [losses.sum(), len(losses), implicit_accuracy(out["chosen"], out["rejected"]).sum(),
                 (out["chosen"] - out["rejected"]).sum(), len(out["chosen"]), out["best"].sum()]
        sums += torch.tensor([float(x) for x in parts], dtype=torch.float64, device=engine.device)
    scorer.train()
    loss, rows, correct, margin, pairs, best = engine.accelerator.reduce(sums, reduction="sum").tolist()
    return {"loss": loss / max(rows, 1), "accuracy": correct / max(pairs, 1),
            "margin": margin / max(pairs, 1), "best_mean": best / max(rows, 1)}


def evaluation(engine: Engine, scorer, loader, cfg: RewardConfig) -> dict[str, float]:
    """The held-out row of metrics.jsonl: eval/loss, eval/accuracy, eval/margin (empty without held-out
    rows)."""
    if loader is None:
        return {}
    out = held_out_stats(engine, scorer, loader, cfg)
    engine.accelerator.print(f"step {engine.step}: held-out accuracy {out['accuracy']:.3f}, "
                             f"margin {out['margin']:.3f}")
    return {f"eval/{k}": out[k] for k in ("loss", "accuracy", "margin")}


def normalize(engine: Engine, scorer, cfg: RewardConfig, train: list[dict], held: list[dict],
              collate) -> dict | None:
    """InstructGPT's normalisation: the bias that makes the reference rows' chosen completions score mean 0
    (every process takes part: the rows are split over them)."""
    if not cfg.normalize.enabled:
        return None
    use_eval = cfg.normalize.reference == "eval" and bool(held)
    rows = (held if use_eval else train)[: cfg.normalize.max_rows]
    mean = held_out_stats(engine, scorer, llm_common.eval_loader(engine, rows, cfg.optim.batch_size, collate),
                          cfg)["best_mean"]
    engine.accelerator.print(
        f"normalisation: chosen completions of {len(rows)} {'eval' if use_eval else 'train'} rows scored "
        f"mean {mean:.4f}; bias {-mean:.4f} stored in final/{models.NORMALIZATION_FILE}")
    return {"bias": -mean, "mean_before": mean, "reference": "eval" if use_eval else "train",
            "rows": len(rows)}


def write_final(folder: Path, policy: models.TokenScorer, tokenizer, normalization: dict | None) -> None:
    """The score model, its tokenizer and (when normalised) reward_normalization.json."""
    models.save_pretrained(policy.model, tokenizer, folder)
    if normalization is not None:
        (folder / models.NORMALIZATION_FILE).write_text(json.dumps(normalization, indent=2) + "\n")


def tokenizer_and_collate(cfg: RewardConfig, tokenizer):
    """(tokenize(rows, source=...), collate) for data.format."""
    d = cfg.data
    if d.format == "pairs":
        tokenize = partial(tokenize_pairs, chosen_column=d.chosen_column, rejected_column=d.rejected_column,
                           margin_column=d.margin_column)
        collate = PairCollator(tokenizer.pad_token_id)
    else:
        tokenize = partial(tokenize_rankings, responses_column=d.responses_column)
        collate = RankingCollator(tokenizer.pad_token_id)
    return partial(tokenize, tokenizer=tokenizer, **common.token_budget(d)), collate


@releases_output_dir
def run(cfg: RewardConfig) -> dict:
    """Train as ``cfg`` says: data, scorer, optimizer (resumed if asked), the engine's loop with held-out
    evaluations, final/ and its normalisation; returns the summary (also in summary.json)."""
    engine, cfg, tokenizer = llm_common.start(cfg, "reward", run_files=(llm_common.DATA_STATS,))
    tokenize, collate = tokenizer_and_collate(cfg, tokenizer)
    train, held, data_report = common.load_examples(cfg.data, tokenize, cfg.optim.seed,
                                                    engine.accelerator.print)

    model, _ = models.load_score_model(cfg.model.name_or_path, tokenizer.pad_token_id, torch.float32,
                                       cfg.model.attn_implementation)
    policy = models.TokenScorer(models.prepare_trainable(model, cfg.model, "SEQ_CLS")).to(engine.device)
    policy.train()
    feed = llm_common.training_feed(engine, train, collate, cfg.optim.seed)
    held_loader = llm_common.eval_loader(engine, held, cfg.optim.batch_size, collate)
    scorer, optimizer, scheduler, steps = llm_common.prepare_training(engine, policy, cfg.optim, feed)

    evaluate = llm_common.Remembered(lambda: evaluation(engine, scorer, held_loader, cfg))
    last = engine.fit(
        model=scorer, policy=policy, optimizer=optimizer, scheduler=scheduler, feed=feed,
        batch_size=cfg.optim.batch_size, step_fn=lambda batch, ctx: reward_step(scorer, batch, cfg, ctx),
        max_steps=steps, max_grad_norm=cfg.optim.max_grad_norm, eval_every=cfg.eval_every,
        evaluate=evaluate)

    normalization = normalize(engine, scorer, cfg, train, held, collate)
    final = engine.save_final(policy, lambda folder: write_final(folder, policy, tokenizer, normalization))
    return llm_common.finish(engine, policy, final, data_report, {
        "train_rows": len(train), "eval_rows": len(held), "eval": evaluate.last,
        "normalization": normalization}, last)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return llm_common.report(run(parse_args(RewardConfig, argv, prog="diffusion-dpo llm reward", description=__doc__)))
