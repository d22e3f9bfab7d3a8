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

import sys
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch.utils.data import DataLoader

from diffusion_dpo.config import option, parse_args
from diffusion_dpo.llm import common, models
from diffusion_dpo.llm.data import PairCollator, RankingCollator, tokenize_pairs, tokenize_rankings
from diffusion_dpo.losses import bradley_terry_loss, implicit_accuracy, ranking_loss, ranking_pairs


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
    max_rows: int = option(1024, "use at most this many reference rows")


@dataclass
class RewardOptim(common.OptimSection):
    learning_rate: float = option(1e-5, "peak AdamW learning rate (full fine-tune; ~1e-4 suits LoRA)")


@dataclass
class RewardConfig:
    model: models.ModelConfig = option(
        models.ModelConfig, "the model to start from (a causal LM gets a new one-output score head)"
    )
    data: RewardData = option(RewardData, "comparisons")
    center_coef: float = option(
        0.0, "weight of the centering term (r_chosen + r_rejected)^2 (e.g. 0.01); 0 = off"
    )
    normalize: NormalizeSection = option(NormalizeSection, "post-training reward normalisation")
    optim: RewardOptim = option(RewardOptim, "optimiser and schedule")
    output_dir: str = option("runs/llm-reward", "config.yaml, metrics.jsonl and final/ go here")
    overwrite: bool = option(False, "allow an output_dir that already holds a run")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto", "autocast dtype; auto = bf16 on GPU, none on CPU"
    )
    log_every: int = option(10, "optimizer steps between metrics.jsonl rows")
    eval_every: int | None = option(
        None, "optimizer steps between held-out evaluations (null = at the end only)"
    )
    tensorboard: bool = option(True, "also log to tensorboard under output_dir")


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


def run(cfg: RewardConfig) -> dict:
    r = common.Run(cfg, grad_accum=cfg.optim.gradient_accumulation_steps, seed=cfg.optim.seed)
    acc = r.accelerator
    tokenizer = models.load_tokenizer(cfg.model.name_or_path)
    d = cfg.data
    if d.format == "pairs":
        tokenize = partial(
            tokenize_pairs,
            chosen_column=d.chosen_column,
            rejected_column=d.rejected_column,
            margin_column=d.margin_column,
        )
        collate = PairCollator(tokenizer.pad_token_id)
    else:
        tokenize = partial(tokenize_rankings, responses_column=d.responses_column)
        collate = RankingCollator(tokenizer.pad_token_id)
    tokenize = partial(
        tokenize,
        tokenizer=tokenizer,
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        prompt_column=d.prompt_column,
    )
    train, held, data_report = common.load_examples(
        d, lambda rows, source: tokenize(rows, source=source), cfg.optim.seed, acc.print
    )

    model, _ = models.load_score_model(
        cfg.model.name_or_path, tokenizer.pad_token_id, torch.float32, cfg.model.attn_implementation
    )
    scorer = models.TokenScorer(models.prepare_trainable(model, cfg.model, "SEQ_CLS")).to(r.device)
    scorer.train()
    loader = DataLoader(
        train,
        batch_size=cfg.optim.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.optim.seed),
        drop_last=len(train) >= cfg.optim.batch_size,
    )
    steps = common.total_steps(cfg.optim, len(loader) // acc.num_processes or 1)
    optimizer, scheduler = common.make_optimizer(scorer.parameters(), cfg.optim, steps)
    scorer, optimizer, loader = acc.prepare(scorer, optimizer, loader)
    eval_loader = None
    if held:
        eval_loader = acc.prepare_data_loader(
            DataLoader(held, batch_size=cfg.optim.batch_size, collate_fn=collate)
        )

    def step_fn(batch):
        with acc.autocast():
            losses, out = reward_batch(scorer, batch, cfg)
        metrics = {
            "accuracy": float(implicit_accuracy(out["chosen"], out["rejected"]).mean()),
            "margin": float((out["chosen"] - out["rejected"]).mean()),
            "reward_mean": float(torch.cat([out["chosen"], out["rejected"]]).mean()),
        }
        return losses.mean(), metrics, int(batch["attention_mask"].sum())

    @torch.no_grad()
    def collect(examples_loader) -> dict[str, float]:
        """Held-out means over all processes: loss, accuracy, margin, and the mean reward of the best response
        (sums and counts are reduced, so rankings with ragged pair counts gather fine)."""
        scorer.eval()
        sums = torch.zeros(6, dtype=torch.float64, device=r.device)
        for batch in examples_loader:
            with acc.autocast():
                losses, out = reward_batch(scorer, batch, cfg)
            parts = [
                losses.sum(),
                len(losses),
                implicit_accuracy(out["chosen"], out["rejected"]).sum(),
                (out["chosen"] - out["rejected"]).sum(),
                len(out["chosen"]),
                out["best"].sum(),
            ]
            sums += torch.tensor([float(x) for x in parts], dtype=torch.float64, device=r.device)
        scorer.train()
        loss, rows, correct, margin, pairs, best = acc.reduce(sums, reduction="sum").tolist()
        return {
            "loss": loss / max(rows, 1),
            "accuracy": correct / max(pairs, 1),
            "margin": margin / max(pairs, 1),
            "best_mean": best / max(rows, 1),
        }

    final_eval: dict[str, float] = {}

    def eval_fn(step: int) -> None:
        if eval_loader is None:
            return
        out = collect(eval_loader)
        final_eval.update({f"eval/{k}": out[k] for k in ("loss", "accuracy", "margin")})
        r.log(step, final_eval)
        acc.print(
            f"step {step}: held-out accuracy {final_eval['eval/accuracy']:.3f}, "
            f"margin {final_eval['eval/margin']:.3f}"
        )

    done = common.train_loop(
        r,
        scorer,
        optimizer,
        scheduler,
        loader,
        steps=steps,
        step_fn=step_fn,
        max_grad_norm=cfg.optim.max_grad_norm,
        log_every=cfg.log_every,
        eval_fn=eval_fn,
        eval_every=cfg.eval_every,
        desc="reward",
    )

    final = r.out / "final"
    models.save_model(acc, acc.unwrap_model(scorer).model, tokenizer, final)
    normalization = None
    if cfg.normalize.enabled:
        use_eval = cfg.normalize.reference == "eval" and held
        rows = (held if use_eval else train)[: cfg.normalize.max_rows]
        ref_loader = acc.prepare_data_loader(
            DataLoader(rows, batch_size=cfg.optim.batch_size, collate_fn=collate)
        )
        mean = collect(ref_loader)["best_mean"]
        normalization = {
            "bias": -mean,
            "mean_before": mean,
            "reference": "eval" if use_eval else "train",
            "rows": len(rows),
        }
        if r.is_main:
            r.write_json(f"final/{models.NORMALIZATION_FILE}", normalization)
        acc.print(
            f"normalisation: chosen completions of {len(rows)} {normalization['reference']} rows scored "
            f"mean {mean:.4f}; bias {-mean:.4f} stored in final/{models.NORMALIZATION_FILE}"
        )
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
        "normalization": normalization,
        "process_index": acc.process_index,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(
        RewardConfig,
        sys.argv[1:] if argv is None else argv,
        prog="diffusion-dpo llm reward",
        description=__doc__,
    )
    summary = run(cfg)
    if summary["process_index"] == 0:
        print(f"wrote {summary['final']} ({summary['steps']} steps; held-out {summary['eval']})")
    return 0
