"""``diffusion-dpo llm dpo``: Direct Preference Optimization of a causal LM on (prompt, chosen, rejected).

    loss = dpo_loss(log pi(y_c|x), log pi(y_r|x), log ref(y_c|x), log ref(y_r|x))       [DPO] eq. 7

Sequence log-probs sum the completion tokens (``logprobs.sequence_logps``); chosen and rejected go through the
policy in one concatenated forward pass. Loss types sigmoid / hinge / ipo (ipo on length-averaged log-probs)
and label smoothing come from ``diffusion_dpo.losses.dpo_loss``; ``reference.kind`` picks the reference:

    copy         a frozen copy of the starting model (or of reference.model)
    adapter      the policy itself with its LoRA adapter disabled (needs model.lora.enabled): no second model
    precomputed  reference log-probs computed once over the data before training and cached to a file; no
                 reference model is in memory while training
    none         reference-free: log ref = 0
"""

from __future__ import annotations

import gc
import hashlib
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader

from diffusion_dpo.config import option, parse_args
from diffusion_dpo.errors import InputError
from diffusion_dpo.llm import common, models
from diffusion_dpo.llm.data import PairCollator, tokenize_pairs
from diffusion_dpo.llm.logprobs import forward_logps
from diffusion_dpo.losses import dpo_loss, implicit_accuracy


@dataclass
class PairData(common.DataSection):
    chosen_column: str = option("chosen", "column of the preferred completion (text or conversation)")
    rejected_column: str = option("rejected", "column of the dispreferred completion (text or conversation)")


@dataclass
class ReferenceSection:
    kind: Literal["copy", "adapter", "precomputed", "none"] = option(
        "copy",
        "copy: frozen copy of the starting model; adapter: the policy with LoRA disabled; precomputed: "
        "log-probs computed once before training (no reference model in memory); none: reference-free",
    )
    model: str | None = option(None, "reference model (hub id or folder); null = the starting policy")
    cache: str | None = option(
        None,
        "precomputed: file to read when it matches the data and reference, else to "
        "write; null = output_dir/reference_logps.pt",
    )


@dataclass
class DPOLossSection:
    beta: float = option(0.1, "DPO beta: strength of the KL anchor to the reference (IPO's tau)")
    loss_type: Literal["sigmoid", "hinge", "ipo"] = option(
        "sigmoid", "sigmoid (DPO), hinge (SLiC), ipo (IPO, on length-averaged log-probs)"
    )
    label_smoothing: float = option(
        0.0, "conservative DPO: assumed probability that a label is flipped (sigmoid only, in [0, 0.5))"
    )


@dataclass
class DPOOptim(common.OptimSection):
    learning_rate: float = option(5e-7, "peak AdamW learning rate (full fine-tune; ~5e-6 suits LoRA)")


@dataclass
class DPOConfig:
    model: models.ModelConfig = option(models.ModelConfig, "the policy to tune")
    reference: ReferenceSection = option(ReferenceSection, "where reference log-probs come from")
    loss: DPOLossSection = option(DPOLossSection, "the DPO loss")
    data: PairData = option(PairData, "preference pairs")
    optim: DPOOptim = option(DPOOptim, "optimiser and schedule")
    output_dir: str = option("runs/llm-dpo", "config.yaml, metrics.jsonl and final/ go here")
    overwrite: bool = option(False, "allow an output_dir that already holds a run")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto", "autocast dtype; auto = bf16 on GPU, none on CPU"
    )
    log_every: int = option(10, "optimizer steps between metrics.jsonl rows")
    eval_every: int | None = option(
        None, "optimizer steps between held-out evaluations (null = at the end only)"
    )
    tensorboard: bool = option(True, "also log to tensorboard under output_dir")


def _fingerprint(reference: str, examples: list[dict]) -> str:
    h = hashlib.sha256(reference.encode())
    for e in examples:
        for key in ("prompt", "chosen", "rejected"):
            h.update(torch.tensor(e[key], dtype=torch.int32).numpy().tobytes())
            h.update(b"|")
    return h.hexdigest()


@torch.no_grad()
def reference_logps(
    run: common.Run, model, examples: list[dict], batch_size: int, pad_id: int
) -> torch.Tensor:
    """Sequence log-probs of every example's chosen and rejected completion under ``model``: [N, 2]. The
    examples are split over the processes and gathered back."""
    loader = DataLoader(
        [{**e, "index": i} for i, e in enumerate(examples)],
        batch_size=batch_size,
        collate_fn=PairCollator(pad_id),
    )
    loader = run.accelerator.prepare_data_loader(loader)
    out = torch.zeros(len(examples), 2)
    model.eval()
    for batch in loader:
        with run.accelerator.autocast():
            logps, _ = forward_logps(
                model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            )
        n = len(batch["index"])
        index, pairs = run.accelerator.gather((batch["index"], torch.stack([logps[:n], logps[n:]], dim=1)))
        out[index.cpu()] = pairs.float().cpu()
    return out


def precompute_reference(
    run: common.Run, cfg: DPOConfig, policy, sets: dict[str, list[dict]], pad_id: int
) -> None:
    """Fill "ref_chosen"/"ref_rejected" into every example, from the cache file when it matches, else computed
    (by reference.model, loaded and freed again, or by the starting policy) and written to the cache."""
    ref_name = cfg.reference.model or cfg.model.name_or_path
    cache = Path(cfg.reference.cache) if cfg.reference.cache else run.out / "reference_logps.pt"
    keys = {name: _fingerprint(ref_name, examples) for name, examples in sets.items()}
    stored = torch.load(cache, weights_only=True) if cache.is_file() else {}
    if all(stored.get(name, {}).get("fingerprint") == keys[name] for name in sets):
        run.accelerator.print(f"reference log-probs: read from {cache}")
        values = {name: stored[name]["logps"] for name in sets}
    else:
        model = policy
        if cfg.reference.model is not None:
            dtype = models.frozen_dtype(cfg.model.dtype, run.device)
            model = models.freeze(
                models.load_causal_lm(cfg.reference.model, dtype, cfg.model.attn_implementation)
            )
            model.to(run.device)
        values = {
            name: reference_logps(run, model, examples, cfg.optim.batch_size, pad_id)
            for name, examples in sets.items()
        }
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if run.is_main:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({name: {"fingerprint": keys[name], "logps": values[name]} for name in sets}, cache)
        run.accelerator.print(f"reference log-probs: computed and cached to {cache}")
    for name, examples in sets.items():
        for e, (c, r) in zip(examples, values[name].tolist()):
            e["ref_chosen"], e["ref_rejected"] = c, r


def dpo_batch(
    policy, batch: dict, cfg: DPOConfig, reference=None, adapter_model=None
) -> tuple[torch.Tensor, dict]:
    """Per-pair DPO losses and the metrics of one batch. ``reference`` is the frozen model (kind copy),
    ``adapter_model`` the unwrapped peft policy (kind adapter); precomputed values come in the batch."""
    n = batch["input_ids"].shape[0] // 2
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    logps, lengths = forward_logps(policy, *args)
    kind = cfg.reference.kind
    if kind == "precomputed":
        ref = torch.cat([batch["ref_chosen"], batch["ref_rejected"]]).to(logps)
    elif kind == "none":
        ref = torch.zeros_like(logps)
    else:
        with torch.no_grad(), adapter_model.disable_adapter() if kind == "adapter" else nullcontext():
            ref, _ = forward_logps(reference if kind == "copy" else adapter_model, *args)
    if cfg.loss.loss_type == "ipo":  # IPO is defined on length-averaged log-probs
        logps, ref = logps / lengths.clamp(min=1), ref / lengths.clamp(min=1)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        logps[:n],
        logps[n:],
        ref[:n],
        ref[n:],
        beta=cfg.loss.beta,
        loss_type=cfg.loss.loss_type,
        label_smoothing=cfg.loss.label_smoothing,
    )
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": implicit_accuracy(chosen_rewards, rejected_rewards),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": logps[:n].detach(),
        "logps/rejected": logps[n:].detach(),
    }
    return losses, metrics


def run(cfg: DPOConfig) -> dict:
    """Train; returns a summary with the output paths, data counts, final held-out metrics and a checksum of
    the trained weights (the same on every process)."""
    kind = cfg.reference.kind
    if kind == "adapter" and not cfg.model.lora.enabled:
        raise InputError(
            "reference.kind 'adapter' needs model.lora.enabled=true (the reference is the policy "
            "with its adapter disabled)"
        )
    if kind == "adapter" and cfg.reference.model is not None:
        raise InputError("reference.kind 'adapter' uses the policy's base; reference.model must be null")
    r = common.Run(cfg, grad_accum=cfg.optim.gradient_accumulation_steps, seed=cfg.optim.seed)
    acc = r.accelerator
    tokenizer = models.load_tokenizer(cfg.model.name_or_path)
    d = cfg.data
    tokenize = partial(
        tokenize_pairs,
        tokenizer=tokenizer,
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        prompt_column=d.prompt_column,
        chosen_column=d.chosen_column,
        rejected_column=d.rejected_column,
    )
    train, held, data_report = common.load_examples(
        d, lambda rows, source: tokenize(rows, source=source), cfg.optim.seed, acc.print
    )

    policy = models.load_causal_lm(cfg.model.name_or_path, torch.float32, cfg.model.attn_implementation)
    policy = models.prepare_trainable(policy, cfg.model, "CAUSAL_LM")
    policy.to(r.device)
    reference = None
    if kind == "copy":
        dtype = models.frozen_dtype(cfg.model.dtype, r.device)
        reference = models.freeze(
            models.load_causal_lm(
                cfg.reference.model or cfg.model.name_or_path, dtype, cfg.model.attn_implementation
            )
        ).to(r.device)
    elif kind == "precomputed":
        precompute_reference(r, cfg, policy, {"train": train, "eval": held}, tokenizer.pad_token_id)
    policy.train()

    collate = PairCollator(tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(cfg.optim.seed)
    loader = DataLoader(
        train,
        batch_size=cfg.optim.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=generator,
        drop_last=len(train) >= cfg.optim.batch_size,
    )
    eval_loader = DataLoader(held, batch_size=cfg.optim.batch_size, collate_fn=collate) if held else None
    steps = common.total_steps(cfg.optim, len(loader) // acc.num_processes or 1)
    optimizer, scheduler = common.make_optimizer(policy.parameters(), cfg.optim, steps)
    policy, optimizer, loader = acc.prepare(policy, optimizer, loader)
    eval_loader = acc.prepare_data_loader(eval_loader) if eval_loader is not None else None
    adapter_model = acc.unwrap_model(policy) if kind == "adapter" else None

    def step_fn(batch):
        with acc.autocast():
            losses, metrics = dpo_batch(policy, batch, cfg, reference, adapter_model)
        return (
            losses.mean(),
            {k: float(v.float().mean()) for k, v in metrics.items()},
            int(batch["attention_mask"].sum()),
        )

    final_eval: dict[str, float] = {}

    @torch.no_grad()
    def eval_fn(step: int) -> None:
        if eval_loader is None:
            return
        policy.eval()
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in eval_loader:
            with acc.autocast():
                losses, metrics = dpo_batch(policy, batch, cfg, reference, adapter_model)
            for k, v in {"loss": losses.detach(), **metrics}.items():
                parts.setdefault(k, []).append(acc.gather_for_metrics(v.float()))
        policy.train()
        final_eval.clear()
        final_eval.update({f"eval/{k}": float(torch.cat(v).mean()) for k, v in parts.items()})
        r.log(step, final_eval)
        acc.print(
            f"step {step}: held-out loss {final_eval['eval/loss']:.4f}, "
            f"accuracy {final_eval['eval/rewards/accuracies']:.3f}, "
            f"margin {final_eval['eval/rewards/margins']:.3f}"
        )

    done = common.train_loop(
        r,
        policy,
        optimizer,
        scheduler,
        loader,
        steps=steps,
        step_fn=step_fn,
        max_grad_norm=cfg.optim.max_grad_norm,
        log_every=cfg.log_every,
        eval_fn=eval_fn,
        eval_every=cfg.eval_every,
        desc="dpo",
    )
    final = r.out / "final"
    models.save_model(acc, policy, tokenizer, final)
    checksum = common.weights_checksum(acc.unwrap_model(policy))
    r.write_json("data_stats.json", data_report)
    wall = r.finish()
    return {
        "output_dir": str(r.out),
        "final": str(final),
        "metrics": str(r.out / "metrics.jsonl"),
        "steps": done,
        "train_pairs": len(train),
        "eval_pairs": len(held),
        "data": data_report,
        "eval": final_eval,
        "reference": kind,
        "weights_checksum": checksum,
        "process_index": acc.process_index,
        "num_processes": acc.num_processes,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(
        DPOConfig, sys.argv[1:] if argv is None else argv, prog="diffusion-dpo llm dpo", description=__doc__
    )
    summary = run(cfg)
    if summary["process_index"] == 0:
        print(f"wrote {summary['final']} ({summary['steps']} steps; held-out {summary['eval']})")
    return 0
