"""``diffusion-dpo llm ppo``: RLHF with PPO, InstructGPT's third stage.

Each iteration samples responses to a batch of prompts from the policy and scores them with a reward model
(the score at the response's last token; ``reward.no_eos_penalty`` is subtracted where a response never emits
EOS) or with a rule-based reward function. The per-token reward is

    r_t = -beta * KL_t(policy || reference)   (+ the score at the last response token)          [Ziegler] 2.2

with KL_t the k1 or k3 estimator (``rl.kl_penalty``) and beta fixed or adapted towards a target KL
(``rl.AdaptiveKLController``). GAE (``rl.gae``) turns rewards and values into advantages, whitened over the
batch; then ``ppo.epochs`` passes over shuffled minibatches minimise

    clipped policy loss + vf_coef * clipped value loss [+ ptx.coef * LM loss on pre-training text]

(``losses.ppo_policy_loss``, ``losses.ppo_value_loss``; the last term is InstructGPT's PPO-ptx, eq. 2). Values
come from a separate value model (initialised from the reward model) or a linear head on the policy.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffusion_dpo.config import option, parse_args
from diffusion_dpo.errors import InputError
from diffusion_dpo.llm import common, models, rl
from diffusion_dpo.llm.data import DemoCollator, read_rows, tokenize_prompts
from diffusion_dpo.llm.logprobs import entropy_from_logits, position_ids, token_logps
from diffusion_dpo.losses import ppo_policy_loss, ppo_value_loss


@dataclass
class PromptData:
    source: str = option(
        "trl-lib/ultrafeedback-prompt",
        "prompts: hub dataset id or local parquet/JSON/JSONL file "
        "or folder (a preference set gives its shared prompts)",
    )
    subset: str | None = option(None, "hub dataset configuration name; null = default")
    split: str = option("train", "split of the prompts")
    max_rows: int | None = option(None, "read at most this many prompts (null = all)")
    prompt_column: str = option("prompt", "column of the prompt (text or conversation)")
    max_prompt_length: int = option(
        256, "prompts longer than this keep their first tokens (counted as truncated)"
    )


@dataclass
class RewardSection:
    model: str | None = option(
        None,
        "reward model folder or hub id (as written by `llm reward`); its score at "
        "the last token is the reward",
    )
    function: str | None = option(
        None,
        "rule-based reward instead: 'package.module:name' or 'path/file.py:name', "
        "called as name(prompts: list[str], responses: list[str]) -> floats",
    )
    no_eos_penalty: float = option(
        1.0, "subtracted from the score of a response that never emits EOS (0 = off)"
    )


@dataclass
class ValueSection:
    kind: Literal["model", "head"] = option(
        "model",
        "model: a separate value model (all its weights trained, even when the policy uses LoRA); head: a "
        "linear head on the policy's last hidden state",
    )
    model: str | None = option(
        None,
        "kind model: where the value model starts; null = the reward model, or the "
        "policy when the reward is a function",
    )


@dataclass
class KLSection:
    coef: float = option(0.05, "initial KL penalty coefficient beta")
    estimator: Literal["k1", "k3"] = option(
        "k1",
        "per-token KL estimator: k1 = log p - log ref; "
        "k3 = (r - 1) - log r with r = ref / p (never negative)",
    )
    adaptive: bool = option(False, "adapt beta towards kl.target (Ziegler et al.'s proportional controller)")
    target: float = option(6.0, "adaptive: target KL per response, nats")
    horizon: int = option(10000, "adaptive: controller horizon, in rollouts")


@dataclass
class RolloutSection:
    batch_size: int = option(16, "prompts per process per iteration")
    max_new_tokens: int = option(64, "response length limit, tokens")
    temperature: float = option(1.0, "sampling temperature (log-probs are computed at the same temperature)")
    top_k: int = option(0, "top-k sampling (0 = off)")
    top_p: float = option(1.0, "nucleus sampling (1 = off)")


@dataclass
class PPOSection:
    iterations: int = option(200, "rollout + update iterations")
    epochs: int = option(4, "PPO epochs over each rollout batch")
    minibatch_size: int = option(8, "rollouts per gradient step")
    clip_range: float = option(0.2, "policy ratio clip epsilon")
    value_clip_range: float = option(0.2, "value clip epsilon")
    vf_coef: float = option(0.1, "weight of the value loss")
    gamma: float = option(1.0, "discount")
    lam: float = option(0.95, "GAE lambda")
    whiten_advantages: bool = option(True, "normalise advantages to mean 0, variance 1 over the batch")
    learning_rate: float = option(1e-6, "AdamW learning rate (constant) of policy and value parameters")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0 = no clipping)")
    seed: int = option(0, "seed of initialisation, prompt order and sampling")


@dataclass
class PtxSection:
    coef: float = option(
        0.0, "PPO-ptx: weight gamma of the language-modelling loss on pre-training text (0 = off)"
    )
    source: str | None = option(None, "pre-training text: hub dataset id or local file/folder")
    split: str = option("train", "split of the pre-training text")
    text_column: str = option("text", "column of the text")
    max_length: int = option(512, "tokens per text (the start is kept)")
    batch_size: int = option(4, "texts per PPO minibatch")
    max_rows: int | None = option(10000, "read at most this many texts")


@dataclass
class PPOReference:
    kind: Literal["copy", "adapter"] = option(
        "copy",
        "copy: a frozen copy of the starting policy (or of "
        "reference.model); adapter: the policy with LoRA disabled",
    )
    model: str | None = option(None, "kind copy: the reference model; null = the starting policy")


@dataclass
class PPOConfig:
    model: models.ModelConfig = option(models.ModelConfig, "the policy (usually the SFT model)")
    reference: PPOReference = option(PPOReference, "the KL anchor")
    reward: RewardSection = option(RewardSection, "the reward: a reward model or a function")
    value: ValueSection = option(ValueSection, "the critic")
    kl: KLSection = option(KLSection, "KL penalty")
    data: PromptData = option(PromptData, "prompts")
    rollout: RolloutSection = option(RolloutSection, "sampling")
    ppo: PPOSection = option(PPOSection, "PPO updates")
    ptx: PtxSection = option(PtxSection, "PPO-ptx pre-training term")
    output_dir: str = option("runs/llm-ppo", "config.yaml, metrics.jsonl, final/ (policy) and value/ go here")
    overwrite: bool = option(False, "allow an output_dir that already holds a run")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto", "autocast dtype; auto = bf16 on GPU, none on CPU"
    )
    log_every: int = option(1, "iterations between metrics.jsonl rows")
    tensorboard: bool = option(True, "also log to tensorboard under output_dir")


def load_function(spec: str) -> Callable:
    """'package.module:name' or 'path/to/file.py:name' -> the callable."""
    if ":" not in spec:
        raise InputError(f"reward.function {spec!r}: expected 'module:name' or 'file.py:name'")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise InputError(f"reward.function: file {where} does not exist")
        module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise InputError(f"reward.function: cannot import {where}: {e}") from None
    if not callable(getattr(module, name, None)):
        raise InputError(f"reward.function: {where} has no function {name!r}")
    return getattr(module, name)


@dataclass
class Rollout:
    """One batch of sampled episodes; every [B, Tr] tensor is over response tokens."""

    input_ids: torch.Tensor  # [B, Tq + Tr] left-padded prompt + response (padding after EOS)
    attention_mask: torch.Tensor  # [B, Tq + Tr]
    mask: torch.Tensor  # [B, Tr] 1.0 on response tokens up to and including the first EOS
    logprobs: torch.Tensor  # [B, Tr] policy log-probs at sampling time ("old")
    values: torch.Tensor  # [B, Tr]
    advantages: torch.Tensor  # [B, Tr]
    returns: torch.Tensor  # [B, Tr]
    query_len: int


def response_logits(logits: torch.Tensor, query_len: int, temperature: float) -> torch.Tensor:
    """Logits that predict the response tokens: positions Tq - 1 ... T - 2. [B, Tr, V]."""
    return logits[:, query_len - 1 : -1] / temperature


def run(cfg: PPOConfig) -> dict:
    if (cfg.reward.model is None) == (cfg.reward.function is None):
        raise InputError("set exactly one of reward.model (a reward model) and reward.function (a rule)")
    if cfg.reference.kind == "adapter" and not cfg.model.lora.enabled:
        raise InputError("reference.kind 'adapter' needs model.lora.enabled=true")
    if cfg.ptx.coef > 0 and cfg.ptx.source is None:
        raise InputError("ptx.coef > 0 needs ptx.source (pre-training text)")
    r = common.Run(cfg, grad_accum=1, seed=cfg.ppo.seed)
    acc, device = r.accelerator, r.device
    frozen = models.frozen_dtype(cfg.model.dtype, device)
    attn = cfg.model.attn_implementation
    tokenizer = models.load_tokenizer(cfg.model.name_or_path)
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    # Prompts (and pre-training text for PPO-ptx).
    d = cfg.data
    name = f"{d.source}[{d.split}]"
    prompts, prompt_stats = tokenize_prompts(
        read_rows(d.source, d.split, subset=d.subset, max_rows=d.max_rows),
        tokenizer,
        max_prompt_length=d.max_prompt_length,
        prompt_column=d.prompt_column,
        source=name,
    )
    acc.print(f"{name}: {prompt_stats.describe('prompts')}")
    if not prompts:
        raise InputError(f"{name}: no prompts")
    prompt_loader = DataLoader(
        prompts,
        batch_size=cfg.rollout.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.ppo.seed),
        collate_fn=lambda ex: {"input_ids": [e["prompt"] for e in ex]},
    )
    if len(prompt_loader) == 0:
        raise InputError(
            f"{name}: {len(prompts)} prompts is fewer than rollout.batch_size {cfg.rollout.batch_size}"
        )

    # Models: policy (+ value head), reference, reward, value model.
    lm = models.prepare_trainable(
        models.load_causal_lm(cfg.model.name_or_path, torch.float32, attn), cfg.model, "CAUSAL_LM"
    )
    policy = models.PolicyWithValueHead(lm, value_head=cfg.value.kind == "head").to(device)
    reference = None
    if cfg.reference.kind == "copy":
        reference = models.freeze(
            models.load_causal_lm(cfg.reference.model or cfg.model.name_or_path, frozen, attn)
        ).to(device)
    if cfg.reward.model is not None:
        rm, bias = models.load_score_model(cfg.reward.model, pad_id, frozen, attn)
        reward_model, reward_fn = models.TokenScorer(models.freeze(rm), bias).to(device), None
    else:
        reward_model, reward_fn = None, load_function(cfg.reward.function)
    value_model = None
    if cfg.value.kind == "model":
        start = cfg.value.model or cfg.reward.model or cfg.model.name_or_path
        vm, _ = models.load_score_model(start, pad_id, torch.float32, attn)
        models.disable_dropout(vm)
        value_model = models.TokenScorer(vm).to(device)

    params = list(policy.parameters()) + (list(value_model.parameters()) if value_model is not None else [])
    optimizer = torch.optim.AdamW(
        [p for p in params if p.requires_grad], lr=cfg.ppo.learning_rate, weight_decay=cfg.ppo.weight_decay
    )
    if value_model is not None:
        policy, value_model, optimizer, prompt_loader = acc.prepare(
            policy, value_model, optimizer, prompt_loader
        )
    else:
        policy, optimizer, prompt_loader = acc.prepare(policy, optimizer, prompt_loader)
    unwrapped_lm = acc.unwrap_model(policy).lm
    ptx_batches = None
    if cfg.ptx.coef > 0:
        texts = []
        for i, row in enumerate(read_rows(cfg.ptx.source, cfg.ptx.split, max_rows=cfg.ptx.max_rows)):
            if not isinstance(row.get(cfg.ptx.text_column), str):
                raise InputError(
                    f"ptx.source {cfg.ptx.source}, row {i}: column '{cfg.ptx.text_column}' must be a string"
                )
            ids = tokenizer(row[cfg.ptx.text_column], verbose=False)["input_ids"][: cfg.ptx.max_length]
            if len(ids) > 1:  # the LM loss needs a token to predict from
                texts.append({"prompt": [], "completion": ids})
        if not texts:
            raise InputError(f"ptx.source {cfg.ptx.source}: no texts of 2 or more tokens")
        ptx_loader = acc.prepare_data_loader(
            DataLoader(
                texts,
                batch_size=cfg.ptx.batch_size,
                shuffle=True,
                collate_fn=DemoCollator(pad_id),
                drop_last=False,
            )
        )
        ptx_batches = itertools.chain.from_iterable(itertools.repeat(ptx_loader))
    controller = (
        rl.AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
        if cfg.kl.adaptive
        else rl.FixedKLController(cfg.kl.coef)
    )

    def forward(input_ids, attention_mask, query_len, grad: bool):
        """Policy log-probs, entropy (rollouts only: it costs a softmax over the vocabulary) and values over
        the response tokens."""
        pos = position_ids(attention_mask)
        with torch.set_grad_enabled(grad), acc.autocast():
            logits, values = policy(input_ids, attention_mask, pos)
            if value_model is not None:
                values = value_model(input_ids, attention_mask, pos)
            logits = response_logits(logits, query_len, cfg.rollout.temperature)
            logprobs = token_logps(logits, input_ids[:, query_len:])
            entropy = None if grad else entropy_from_logits(logits.detach())
        return logprobs, entropy, values[:, query_len - 1 : -1]

    @torch.no_grad()
    def rollout(batch) -> tuple[Rollout, dict[str, float]]:
        query, query_mask = data_pad_left(batch["input_ids"], pad_id, device)
        unwrapped_lm.eval()
        with acc.autocast():
            responses = models.generate(
                unwrapped_lm,
                query,
                query_mask,
                max_new_tokens=cfg.rollout.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad_id,
                temperature=cfg.rollout.temperature,
                top_k=cfg.rollout.top_k,
                top_p=cfg.rollout.top_p,
            )
        unwrapped_lm.train()
        mask, has_eos = rl.response_mask(responses, eos)
        responses = torch.where(mask.bool(), responses, torch.full_like(responses, pad_id))
        input_ids = torch.cat([query, responses], dim=1)
        attention_mask = torch.cat([query_mask, mask.long()], dim=1)
        q = query.shape[1]
        logprobs, entropy, values = forward(input_ids, attention_mask, q, grad=False)
        pos = position_ids(attention_mask)
        with acc.autocast():
            if reference is not None:
                ref_logits = reference(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False
                ).logits
            else:
                with unwrapped_lm.disable_adapter():
                    ref_logits = unwrapped_lm(
                        input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False
                    ).logits
            ref_logprobs = token_logps(response_logits(ref_logits, q, cfg.rollout.temperature), responses)
            if reward_model is not None:
                scores = models.last_token(reward_model(input_ids, attention_mask, pos), attention_mask)
            else:
                texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
                prompts_text = tokenizer.batch_decode(query, skip_special_tokens=True)
                scores = torch.as_tensor(reward_fn(prompts_text, texts), dtype=torch.float32, device=device)
        scores = scores.float() - cfg.reward.no_eos_penalty * (~has_eos).float()
        kl = rl.kl_penalty(logprobs, ref_logprobs, cfg.kl.estimator) * mask
        rewards = -controller.value * kl
        last = mask.sum(1).long().clamp(min=1) - 1
        rewards[torch.arange(len(last), device=device), last] += scores
        values = values.float() * mask
        advantages, returns = rl.gae(rewards, values, mask, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam)
        if cfg.ppo.whiten_advantages:
            advantages = rl.masked_whiten(advantages, mask)
        seq_kl = kl.sum(1)
        stats = {
            "reward": float(scores.mean()),
            "kl": float(seq_kl.mean()),
            "non_score_reward": float((-controller.value * seq_kl).mean()),
            "rlhf_reward": float((scores - controller.value * seq_kl).mean()),
            "entropy": float(rl.masked_mean(entropy, mask)),
            "response_length": float(mask.sum(1).mean()),
            "no_eos_fraction": float((~has_eos).float().mean()),
            "kl_coef": controller.value,
        }
        return Rollout(input_ids, attention_mask, mask, logprobs, values, advantages, returns, q), stats

    def update(ro: Rollout, iteration: int) -> dict[str, float]:
        sums: dict[str, float] = {}
        n = 0
        g = torch.Generator().manual_seed(cfg.ppo.seed + iteration)
        for _ in range(cfg.ppo.epochs):
            for idx in torch.randperm(len(ro.mask), generator=g).split(cfg.ppo.minibatch_size):
                idx = idx.to(device)
                mask = ro.mask[idx]
                logprobs, _, values = forward(
                    ro.input_ids[idx], ro.attention_mask[idx], ro.query_len, grad=True
                )
                pg, pg_clipped = ppo_policy_loss(
                    logprobs, ro.logprobs[idx], ro.advantages[idx], clip_range=cfg.ppo.clip_range
                )
                vf, vf_clipped = ppo_value_loss(
                    values.float(), ro.values[idx], ro.returns[idx], clip_range=cfg.ppo.value_clip_range
                )
                policy_loss, value_loss = rl.masked_mean(pg, mask), rl.masked_mean(vf, mask)
                loss = policy_loss + cfg.ppo.vf_coef * value_loss
                ptx_loss = torch.zeros(())
                if ptx_batches is not None:
                    pb = next(ptx_batches)
                    with acc.autocast():
                        logits = policy(pb["input_ids"], pb["attention_mask"])[0]
                    m = pb["completion_mask"][:, 1:].float()
                    ptx_loss = -(
                        token_logps(logits[:, :-1], pb["input_ids"][:, 1:]) * m
                    ).sum() / m.sum().clamp(min=1)
                    loss = loss + cfg.ptx.coef * ptx_loss
                acc.backward(loss)
                if cfg.ppo.max_grad_norm > 0:
                    acc.clip_grad_norm_(params, cfg.ppo.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    log_ratio = logprobs.detach() - ro.logprobs[idx]
                    step = {
                        "policy_loss": float(policy_loss),
                        "value_loss": float(value_loss),
                        "clipfrac": float(rl.masked_mean(pg_clipped, mask)),
                        "value_clipfrac": float(rl.masked_mean(vf_clipped, mask)),
                        "approx_kl": float(rl.masked_mean(0.5 * log_ratio**2, mask)),
                        "ptx_loss": float(ptx_loss),
                    }
                for k, v in step.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
        return {k: v / n for k, v in sums.items()}

    batches = itertools.chain.from_iterable(itertools.repeat(prompt_loader))
    bar = tqdm(total=cfg.ppo.iterations, desc="ppo", disable=not r.is_main)
    history = []
    for iteration in range(1, cfg.ppo.iterations + 1):
        t0 = time.perf_counter()
        ro, stats = rollout(next(batches))
        t1 = time.perf_counter()
        stats.update(update(ro, iteration))
        stats.update(rollout_s=t1 - t0, update_s=time.perf_counter() - t1)
        stats = r.mean(stats)
        controller.update(stats["kl"], n_steps=len(ro.mask) * acc.num_processes)
        history.append(stats)
        if iteration % cfg.log_every == 0 or iteration == cfg.ppo.iterations:
            r.log(iteration, stats)
        bar.update(1)
        bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}")
    bar.close()

    final = r.out / "final"
    models.save_model(acc, unwrapped_lm, tokenizer, final)
    value_dir = r.out / "value"
    if r.is_main:
        if value_model is not None:
            acc.unwrap_model(value_model).model.save_pretrained(value_dir, safe_serialization=True)
        else:
            from safetensors.torch import save_file

            value_dir.mkdir(parents=True, exist_ok=True)
            head = acc.unwrap_model(policy).value_head
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                str(value_dir / models.VALUE_HEAD_FILE),
            )
    r.write_json("data_stats.json", {"prompts": prompt_stats.as_dict()})
    acc.wait_for_everyone()
    wall = r.finish()
    first, last = history[: max(1, len(history) // 5)], history[-max(1, len(history) // 5) :]
    return {
        "output_dir": str(r.out),
        "final": str(final),
        "value": str(value_dir),
        "metrics": str(r.out / "metrics.jsonl"),
        "iterations": cfg.ppo.iterations,
        "prompts": len(prompts),
        "reward_first": sum(h["reward"] for h in first) / len(first),
        "reward_last": sum(h["reward"] for h in last) / len(last),
        "kl_last": last[-1]["kl"],
        "kl_coef": controller.value,
        "process_index": acc.process_index,
        "wall_s": wall,
    }


def data_pad_left(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusion_dpo.llm.data import pad

    ids, mask = pad(seqs, pad_id, side="left")
    return ids.to(device), mask.to(device)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(
        PPOConfig, sys.argv[1:] if argv is None else argv, prog="diffusion-dpo llm ppo", description=__doc__
    )
    summary = run(cfg)
    if summary["process_index"] == 0:
        print(
            f"wrote {summary['final']} ({summary['iterations']} iterations; reward "
            f"{summary['reward_first']:.3f} -> {summary['reward_last']:.3f}, KL {summary['kl_last']:.3f})"
        )
    return 0
