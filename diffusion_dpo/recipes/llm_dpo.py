"""``diffusion-dpo llm dpo``: Direct Preference Optimization of a causal LM on (prompt, chosen, rejected).

    loss = dpo_loss(log pi(y_c|x), log pi(y_r|x), log ref(y_c|x), log ref(y_r|x))       [DPO] eq. 7

Sequence log-probs sum the completion tokens (``logprobs.sequence_logps``); chosen and rejected go through the
policy in one concatenated forward pass. Loss types sigmoid / hinge / ipo (ipo on length-averaged log-probs)
and label smoothing come from ``diffusion_dpo.losses.dpo_loss``; ``reference.kind`` picks the reference, built
once as one of ``diffusion_dpo.reference``'s objects, which the step asks for reference log-probs:

    copy         FrozenCopy: a frozen copy of the starting model (or of reference.model)
    adapter      AdapterOff: the policy itself with its LoRA adapter disabled (needs model.lora.enabled)
    precomputed  Precomputed: log-probs computed once over the data before training and cached to a file; no
                 reference model is in memory while training
    none         Precomputed with every value 0: reference-free, log ref = 0
"""

from __future__ import annotations

import gc
import hashlib
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader

from diffusion_dpo.config import ConfigError, option, parse_args
from diffusion_dpo.engine import Engine, StepContext, StepOutput, releases_output_dir, sharding
from diffusion_dpo.llm import common, models
from diffusion_dpo.llm.collate import PairCollator
from diffusion_dpo.llm.data import tokenize_pairs
from diffusion_dpo.llm.logprobs import forward_logps
from diffusion_dpo.losses import dpo_loss, implicit_accuracy
from diffusion_dpo.recipes import llm_common
from diffusion_dpo.reference import AdapterOff, Precomputed
from diffusion_dpo.run_options import OptimSection, PreferenceLossSection

REFERENCE_CACHE = "reference_logps.pt"


@dataclass
class PairData(common.DataSection):
    chosen_column: str = option("chosen", "column of the preferred completion (text or conversation)")
    rejected_column: str = option("rejected", "column of the dispreferred completion (text or conversation)")


@dataclass
class ReferenceSection:
    kind: Literal["copy", "adapter", "precomputed", "none"] = option(
        "copy",
        "copy: frozen copy of the starting model; adapter: the policy with LoRA disabled; precomputed: "
        "log-probs computed once before training (no reference model in memory); none: reference-free")
    model: str | None = option(None, "reference model (hub id or folder); null = the starting policy")
    cache: str | None = option(None,
                               "precomputed: file to read when it matches the data and reference, else to "
                               f"write; null = output_dir/{REFERENCE_CACHE}")


@dataclass
class DPOConfig(llm_common.HeldOutRunOptions):
    output_dir: str = option("runs/llm-dpo", llm_common.RUN_FOLDER_HELP)
    model: models.ModelConfig = option(models.ModelConfig, "the policy to tune")
    reference: ReferenceSection = option(ReferenceSection, "where reference log-probs come from")
    loss: PreferenceLossSection = option(
        PreferenceLossSection(beta=0.1), "the DPO loss (loss_type ipo works on length-averaged log-probs; "
        "beta is IPO's tau)")
    data: PairData = option(PairData, "preference pairs")
    optim: OptimSection = option(OptimSection(learning_rate=5e-7, warmup_ratio=0.1),
                                 "optimizer and schedule (learning_rate 5e-7 suits a full fine-tune; ~5e-6 "
                                 "LoRA)")

    def check(self) -> None:
        if self.reference.kind == "adapter" and not self.model.lora.enabled:
            raise ConfigError("config key 'reference.kind': 'adapter' needs model.lora.enabled=true (the "
                              "reference is the policy with its adapter disabled)")
        if self.reference.kind == "adapter" and self.reference.model is not None:
            raise ConfigError(f"config key 'reference.model': expected null with reference.kind 'adapter' "
                              f"(the reference is the policy's base), got {self.reference.model!r}")


def _fingerprint(reference: str, examples: list[dict]) -> str:
    h = hashlib.sha256(reference.encode())
    for e in examples:
        for key in ("prompt", "chosen", "rejected"):
            h.update(torch.tensor(e[key], dtype=torch.int32).numpy().tobytes())
            h.update(b"|")
    return h.hexdigest()


@torch.no_grad()
def reference_logps(
    engine: Engine, model, examples: list[dict], batch_size: int, pad_id: int
) -> torch.Tensor:
    """Sequence log-probs of every example's chosen and rejected completion under ``model``: [N, 2]. The
    examples are split over the processes and gathered back."""
    loader = DataLoader(
        [{**e, "index": i} for i, e in enumerate(examples)],
        batch_size=batch_size,
        collate_fn=PairCollator(pad_id),
    )
    loader = engine.accelerator.prepare_data_loader(loader)
    out = torch.zeros(len(examples), 2)
    model.eval()
    for batch in loader:
        with engine.accelerator.autocast():
            logps, _ = forward_logps(
                model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            )
        n = len(batch["index"])
        index, pairs = engine.accelerator.gather((batch["index"], torch.stack([logps[:n], logps[n:]], dim=1)))
        out[index.cpu()] = pairs.float().cpu()
    return out


def precompute_reference(engine: Engine, cfg: DPOConfig, policy, sets: dict[str, list[dict]],
                         pad_id: int) -> None:
    """Fill "ref_chosen"/"ref_rejected" into every example, from the cache file when it matches, else computed
    (by reference.model, loaded and freed again, or by the starting policy) and written to the cache."""
    ref_name = cfg.reference.model or cfg.model.name_or_path
    cache = Path(cfg.reference.cache) if cfg.reference.cache else engine.out / REFERENCE_CACHE
    keys = {name: _fingerprint(ref_name, examples) for name, examples in sets.items()}
    stored = torch.load(cache, weights_only=True) if cache.is_file() else {}
    if all(stored.get(name, {}).get("fingerprint") == keys[name] for name in sets):
        engine.accelerator.print(f"reference log-probs: read from {cache}")
        values = {name: stored[name]["logps"] for name in sets}
    else:
        model = policy
        if cfg.reference.model is not None:
            dtype = models.frozen_dtype(cfg.model.dtype, engine.device)
            model = models.freeze(
                models.load_causal_lm(cfg.reference.model, dtype, cfg.model.attn_implementation)
            )
            model.to(engine.device)
        values = {
            name: reference_logps(engine, model, examples, cfg.optim.batch_size, pad_id)
            for name, examples in sets.items()
        }
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if engine.is_main:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({name: {"fingerprint": keys[name], "logps": values[name]} for name in sets}, cache)
        engine.accelerator.print(f"reference log-probs: computed and cached to {cache}")
    for name, examples in sets.items():
        for e, (c, r) in zip(examples, values[name].tolist()):
            e["ref_chosen"], e["ref_rejected"] = c, r


def build_reference(engine: Engine, cfg: DPOConfig, policy, sets: dict[str, list[dict]], pad_id: int):
    """The reference, once: a frozen model (copy), the policy without its adapter (adapter), or values put
    into every example as ref_chosen / ref_rejected (precomputed; none: all 0)."""
    kind = cfg.reference.kind
    if kind == "copy":
        dtype = models.frozen_dtype(cfg.model.dtype, engine.device)
        name = cfg.reference.model or cfg.model.name_or_path
        model = models.load_causal_lm(name, dtype, cfg.model.attn_implementation).to(engine.device)
        return engine.keep_frozen(model, sharding.no_split_blocks(model))
    if kind == "adapter":
        return AdapterOff(policy)
    if kind == "precomputed":
        precompute_reference(engine, cfg, policy, sets, pad_id)
    else:
        for e in (e for examples in sets.values() for e in examples):
            e["ref_chosen"], e["ref_rejected"] = 0.0, 0.0
    return Precomputed()


def reference_sequence_logps(reference, batch: dict, like: torch.Tensor) -> torch.Tensor:
    """Reference log-probs of the batch's chosen then rejected completions [2B]: a reference model's forward
    pass, or the values that travel in the batch when the reference has no model."""
    with torch.no_grad(), reference.model() as model:
        if model is None:
            return torch.cat([batch["ref_chosen"], batch["ref_rejected"]]).to(like)
        return forward_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])[0]


def dpo_batch(policy, batch: dict, cfg: DPOConfig, reference) -> tuple[torch.Tensor, dict]:
    """Per-pair DPO losses [B] and the metrics of one batch of B pairs (chosen rows first, then rejected)."""
    n = batch["input_ids"].shape[0] // 2
    logps, lengths = forward_logps(policy, batch["input_ids"], batch["attention_mask"],
                                   batch["completion_mask"])
    ref = reference_sequence_logps(reference, batch, logps)
    if cfg.loss.loss_type == "ipo":  # IPO is defined on length-averaged log-probs
        logps, ref = logps / lengths.clamp(min=1), ref / lengths.clamp(min=1)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        logps[:n], logps[n:], ref[:n], ref[n:], beta=cfg.loss.beta, loss_type=cfg.loss.loss_type,
        label_smoothing=cfg.loss.label_smoothing)
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": implicit_accuracy(chosen_rewards, rejected_rewards),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": logps[:n].detach(),
        "logps/rejected": logps[n:].detach(),
    }
    return losses, metrics


def dpo_step(policy, batch: dict, ctx: StepContext, *, cfg: DPOConfig, reference) -> StepOutput:
    losses, metrics = dpo_batch(policy, batch, cfg, reference)
    return StepOutput(losses, metrics, units=int(batch["attention_mask"].sum()))


@torch.no_grad()
def held_out_metrics(engine: Engine, policy, loader, cfg: DPOConfig, reference) -> dict[str, float]:
    """eval/loss and eval/<metric> over every process's held-out pairs (empty without held-out pairs)."""
    if loader is None:
        return {}
    policy.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        with engine.accelerator.autocast():
            losses, metrics = dpo_batch(policy, batch, cfg, reference)
        for k, v in {"loss": losses.detach(), **metrics}.items():
            parts.setdefault(k, []).append(engine.accelerator.gather_for_metrics(v.float()))
    policy.train()
    out = {f"eval/{k}": float(torch.cat(v).mean()) for k, v in parts.items()}
    engine.accelerator.print(f"step {engine.step}: held-out loss {out['eval/loss']:.4f}, accuracy "
                             f"{out['eval/rewards/accuracies']:.3f}, margin "
                             f"{out['eval/rewards/margins']:.3f}")
    return out


@releases_output_dir
def run(cfg: DPOConfig) -> dict:
    """Train as ``cfg`` says: data, policy and reference, optimizer (resumed if asked), the engine's loop with
    held-out evaluations, final/; returns the summary (also in summary.json) with every process's weight
    digest (identical under data parallelism)."""
    engine, cfg, tokenizer = llm_common.start(cfg, "dpo", run_files=(llm_common.DATA_STATS, REFERENCE_CACHE))
    d = cfg.data
    tokenize = partial(tokenize_pairs, tokenizer=tokenizer, **common.token_budget(d),
                       chosen_column=d.chosen_column, rejected_column=d.rejected_column)
    train, held, data_report = common.load_examples(d, tokenize, cfg.optim.seed, engine.accelerator.print)

    policy = llm_common.trainable_lm(engine, cfg.model)
    reference = build_reference(engine, cfg, policy, {"train": train, "eval": held}, tokenizer.pad_token_id)
    policy.train()
    collate = PairCollator(tokenizer.pad_token_id)
    feed = llm_common.training_feed(engine, train, collate, cfg.optim.seed)
    held_loader = llm_common.eval_loader(engine, held, cfg.optim.batch_size, collate)
    model, optimizer, scheduler, steps = llm_common.prepare_training(engine, policy, cfg.optim, feed)

    evaluate = llm_common.Remembered(lambda: held_out_metrics(engine, model, held_loader, cfg, reference))
    last = engine.fit(
        model=model, policy=policy, optimizer=optimizer, scheduler=scheduler, feed=feed,
        batch_size=cfg.optim.batch_size, step_fn=partial(dpo_step, model, cfg=cfg, reference=reference),
        max_steps=steps, max_grad_norm=cfg.optim.max_grad_norm, evaluate=evaluate, eval_every=cfg.eval_every)
    final = engine.save_final(policy, lambda folder: models.save_pretrained(policy, tokenizer, folder))
    return llm_common.finish(engine, policy, final, data_report, {
        "train_pairs": len(train), "eval_pairs": len(held), "eval": evaluate.last,
        "reference": cfg.reference.kind}, last)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return llm_common.report(run(parse_args(DPOConfig, argv, prog="diffusion-dpo llm dpo", description=__doc__)))
