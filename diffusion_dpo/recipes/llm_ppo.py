"""``diffusion-dpo llm ppo``: RLHF with PPO, InstructGPT's third stage.

Each iteration samples responses to a batch of prompts from the policy and scores them with a reward model
(the score at the response's last token; ``reward.no_eos_penalty`` is subtracted where a response never emits
EOS) or with a rule-based reward function. The per-token reward is

    r_t = -beta * KL_t(policy || reference)   (+ the score at the last response token)          [Ziegler] 2.2

with KL_t the k1 or k3 estimator (``rl.kl_penalty``) and beta fixed or adapted towards a target KL
(``rl.AdaptiveKLController``). GAE (``rl.gae``) turns rewards and values into advantages, whitened over the
batch; then ``ppo.epochs`` passes over shuffled minibatches (``optim.batch_size`` rollouts each, accumulated
over ``optim.gradient_accumulation_steps``) minimise

    clipped policy loss + vf_coef * clipped value loss [+ ptx.coef * LM loss on pre-training text]

(``losses.ppo_policy_loss``, ``losses.ppo_value_loss``; the last term is InstructGPT's PPO-ptx, eq. 2). Values
come from a separate value model (initialised from the reward model) or a linear head on the policy.

The phases: set-up of the models and of the data, then per iteration a rollout and an update, whose optimizer
steps are the engine's (accumulation, clipping, the non-finite guard, the schedule); finally the policy to
final/ and the critic to value/. PPO writes no checkpoints (an iteration's rollouts are not saved).
Under parallel.strategy=fsdp the actor-critic is sharded by its decoder layers and sampled on its shards
(every use of the policy's weights goes through ActorCritic.forward).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from diffusion_dpo.config import parse_args
from diffusion_dpo.engine import (
    Engine,
    ExampleFeed,
    StepContext,
    StepOutput,
    build_optimizer,
    releases_output_dir,
    sharding,
)
from diffusion_dpo.errors import InputError, RunError
from diffusion_dpo.fileio import not_a_file
from diffusion_dpo.llm import models, rl
from diffusion_dpo.llm.collate import DemoCollator, pad
from diffusion_dpo.llm.data import read_rows, tokenize_prompts
from diffusion_dpo.llm.logprobs import completion_nll, entropy_from_logits, position_ids, token_logps
from diffusion_dpo.losses import ppo_policy_loss, ppo_value_loss
from diffusion_dpo.recipes.llm_common import DATA_STATS
from diffusion_dpo.recipes.llm_ppo_config import PPOConfig, PtxSection
from diffusion_dpo.reference import AdapterOff, FrozenCopy

VALUE_DIR = "value"


def load_function(spec: str) -> Callable:
    """'package.module:name' or 'path/to/file.py:name' -> the callable."""
    if ":" not in spec:
        raise InputError(f"reward.function {spec!r}: expected 'module:name' or 'file.py:name'")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise InputError(f"reward.function: file {where} {not_a_file(where)}")
        module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except SyntaxError as e:  # also a file that is not UTF-8 (or its declared encoding)
            raise InputError(f"reward.function: {where}, line {e.lineno}: not valid Python ({e.msg})") from None
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




# ------------------------------------------------------------------------------------------------ models

class ActorCritic(nn.Module):
    """The policy (with its value head, if any) and the separate value model, if any, as one module: one DDP
    wrapper (or one sharded FSDP2 root), one optimizer, one set of trainable weights. forward -> (logits
    [B, T, V], values [B, T], and the summed completion NLL and token count of a PPO-ptx batch when one is
    given, else None); with ``generate`` (models.generate's keyword options): the sampled new tokens [B, Tr];
    with ``lm_only``: the policy LM's logits [B, T, V] alone (the adapter-off reference's forward).

    Every use of the policy's weights is a call of this forward: under parallel.strategy=fsdp the root's
    hooks gather its own weights (embeddings, head) for the call and each decoder layer is gathered by its
    unit as it runs, so sampling too runs on the shards, one layer at a time, on every process together."""

    def __init__(self, policy: models.PolicyWithValueHead, value_model: models.TokenScorer | None):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, input_ids, attention_mask, position_ids=None, ptx: dict | None = None, *,
                generate: dict | None = None, lm_only: bool = False):
        if generate is not None:
            return models.generate(self.policy.lm, input_ids, attention_mask, **generate)
        if lm_only:
            return self.policy.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).logits
        logits, values = self.policy(input_ids, attention_mask, position_ids)
        if self.value_model is not None:
            values = self.value_model(input_ids, attention_mask, position_ids)
        # The ptx term rides in the same forward call so that DDP sees one forward per backward.
        return logits, values, completion_nll(self.policy.lm, ptx) if ptx is not None else None


@dataclass
class PPOModels:
    actor_critic: ActorCritic  # unwrapped: its trainable weights are the run's
    model: nn.Module  # actor_critic as prepared (DDP-wrapped with several processes)
    reference: FrozenCopy | AdapterOff
    reward_model: models.TokenScorer | None
    reward_fn: Callable | None

    @property
    def lm(self) -> nn.Module:
        """The policy's causal LM (a peft model under LoRA), for sampling and saving."""
        return self.actor_critic.policy.lm


def setup_models(cfg: PPOConfig, engine: Engine, pad_id: int) -> tuple[ActorCritic, FrozenCopy | AdapterOff,
                                                                       models.TokenScorer | None,
                                                                       Callable | None]:
    """The trained policy (+ value head or value model) in fp32, sharded by its decoder layers under
    parallel.strategy=fsdp; the frozen reference in the frozen dtype (a copy: kept as parallel.frozen says);
    the reward model (whole on every process, frozen) or the rule-based reward function."""
    device, attn = engine.device, cfg.model.attn_implementation
    frozen = models.frozen_dtype(cfg.model.dtype, device)
    lm = models.load_causal_lm(cfg.model.name_or_path, torch.float32, attn)
    lm = models.prepare_trainable(lm, cfg.model, "CAUSAL_LM")
    policy = models.PolicyWithValueHead(lm, value_head=cfg.value.kind == "head")
    if cfg.reference.kind == "copy":
        copy = models.load_causal_lm(cfg.reference.model or cfg.model.name_or_path, frozen, attn).to(device)
        reference = engine.keep_frozen(copy, sharding.no_split_blocks(copy))
    else:
        reference = AdapterOff(lm)
    reward_model, reward_fn = None, None
    if cfg.reward.model is not None:
        rm, bias = models.load_score_model(cfg.reward.model, pad_id, frozen, attn, option="reward.model",
                                           trained_head=True)
        reward_model = models.TokenScorer(models.freeze(rm), bias).to(device)
    else:
        reward_fn = load_function(cfg.reward.function)
    value_model = None
    if cfg.value.kind == "model":
        start = cfg.value.model or cfg.reward.model or cfg.model.name_or_path
        vm, _ = models.load_score_model(start, pad_id, torch.float32, attn)
        models.disable_dropout(vm)
        value_model = models.TokenScorer(vm)
    actor_critic = ActorCritic(policy, value_model).to(device)
    # before the optimizer sees its parameters; the value model's layers are units too
    actor_critic = engine.shard(actor_critic, sharding.no_split_blocks(actor_critic))
    return actor_critic, reference, reward_model, reward_fn


# -------------------------------------------------------------------------------------------------- data

def read_ptx_texts(cfg: PtxSection, tokenizer) -> list[dict]:
    """Pre-training texts as completion-only examples (every token a target but the first)."""
    texts = []
    for i, row in enumerate(read_rows(cfg.source, cfg.split, max_rows=cfg.max_rows)):
        if not isinstance(row.get(cfg.text_column), str):
            raise InputError(f"ptx.source {cfg.source}, row {i}: column '{cfg.text_column}' must be a string")
        ids = tokenizer(row[cfg.text_column], verbose=False)["input_ids"][: cfg.max_length]
        if len(ids) > 1:  # the LM loss needs a token to predict from
            texts.append({"prompt": [], "completion": ids})
    if not texts:
        raise InputError(f"ptx.source {cfg.source}: no texts of 2 or more tokens")
    return texts


def prompt_ids(rows: list[dict]) -> list[list[int]]:
    return [r["prompt"] for r in rows]


def setup_data(cfg: PPOConfig, engine: Engine, tokenizer) -> tuple[Iterator[list[list[int]]],
                                                                    Iterator[dict] | None, dict]:
    """Endless per-process batches of prompt token ids, of PPO-ptx texts (None when ptx.coef is 0), and the
    prompts' token statistics."""
    d = cfg.data
    name = f"{d.source}[{d.split}]"
    prompts, stats = tokenize_prompts(read_rows(d.source, d.split, subset=d.subset, max_rows=d.max_rows),
                                      tokenizer, max_prompt_length=d.max_prompt_length, prompt_truncation=d.prompt_truncation,
                                      prompt_column=d.prompt_column, source=name)
    engine.accelerator.print(f"{name}: {stats.describe('prompts')}")
    if len(prompts) < cfg.rollout.batch_size * engine.world:
        raise InputError(f"{name}: {len(prompts)} prompts is fewer than rollout.batch_size "
                         f"{cfg.rollout.batch_size} x {engine.world} processes")
    feed = ExampleFeed(prompts, prompt_ids, seed=cfg.optim.seed, rank=engine.rank, world=engine.world,
                       name=name)
    ptx = None
    if cfg.ptx.coef > 0:
        texts = read_ptx_texts(cfg.ptx, tokenizer)
        ptx = ExampleFeed(texts, DemoCollator(tokenizer.pad_token_id), seed=cfg.optim.seed, rank=engine.rank,
                          world=engine.world, device=engine.device,
                          name=f"ptx.source {cfg.ptx.source}").batches(cfg.ptx.batch_size)
    return feed.batches(cfg.rollout.batch_size), ptx, stats.as_dict()


# ----------------------------------------------------------------------------------------------- rollout

def policy_forward(m: PPOModels, engine: Engine, input_ids, attention_mask, query_len: int,
                   temperature: float, ptx: dict | None = None):
    """Policy log-probs [B, Tr] and values [B, Tr] over the response tokens, and the ptx NLL (sum, count)."""
    logits, values, ptx_nll = m.model(input_ids, attention_mask, position_ids(attention_mask), ptx)
    logprobs = token_logps(response_logits(logits, query_len, temperature), input_ids[:, query_len:])
    return logprobs, values[:, query_len - 1 : -1], ptx_nll, logits


def sample(m: PPOModels, cfg: PPOConfig, engine: Engine, tokenizer, prompts: list[list[int]]):
    """Left-padded prompts [B, Tq] and mask, responses [B, Tr] (padding after EOS), their mask and has-EOS."""
    query, query_mask = (t.to(engine.device) for t in pad(prompts, tokenizer.pad_token_id, side="left"))
    m.lm.eval()
    options = dict(max_new_tokens=cfg.rollout.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k,
                   top_p=cfg.rollout.top_p, synced=engine.sharded)
    with engine.accelerator.autocast():
        responses = m.actor_critic(query, query_mask, generate=options)  # the unwrapped module, or the root
    m.lm.train()
    mask, has_eos = rl.response_mask(responses, tokenizer.eos_token_id)
    responses = torch.where(mask.bool(), responses, torch.full_like(responses, tokenizer.pad_token_id))
    return query, query_mask, responses, mask, has_eos


def checked_rewards(values, prompts: list[str], responses: list[str], source: str, iteration: int,
                    error: type[Exception]) -> torch.Tensor:
    """``values`` as float32 [B] when they are one finite number per response, else ``error`` naming the
    ``source`` of the rewards, the iteration, the prompt and what came back (never broadcast, never NaN)."""
    at = f"{source} at iteration {iteration}"
    try:
        scores = torch.as_tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise error(f"{at} returned {values!r:.200}; expected one number per response") from None
    if scores.shape != (len(responses),):
        raise error(f"{at} returned {scores.numel()} value(s) of shape {tuple(scores.shape)} for "
                    f"{len(responses)} responses; expected one number per response (first prompt: "
                    f"{prompts[0]!r:.80})")
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise error(f"{at} returned {scores[i].item()} for response {i} (prompt {prompts[i]!r:.80}, response "
                    f"{responses[i]!r:.80}); expected a finite number ({len(bad)} of {len(responses)} not)")
    return scores


def scores_and_reference(m: PPOModels, cfg: PPOConfig, tokenizer, input_ids, attention_mask, query,
                         responses, iteration: int):
    """The reward of each whole response [B] (checked: one finite number each) and the reference's log-probs
    of its tokens [B, Tr]."""
    pos, q = position_ids(attention_mask), query.shape[1]
    with m.reference.model() as ref:
        if isinstance(m.reference, AdapterOff):  # the policy's own weights: through its (sharded) root
            ref_logits = m.actor_critic(input_ids, attention_mask, pos, lm_only=True)
        else:
            ref_logits = ref(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                             use_cache=False).logits
    ref_logprobs = token_logps(response_logits(ref_logits, q, cfg.rollout.temperature), responses)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    prompts = tokenizer.batch_decode(query, skip_special_tokens=True)
    if m.reward_model is not None:  # a model that gives NaN is a run to stop, not bad input
        scores = models.last_token(m.reward_model(input_ids, attention_mask, pos), attention_mask).float().cpu()
        scores = checked_rewards(scores, prompts, texts, f"reward.model {cfg.reward.model}", iteration, RunError)
    else:
        scores = checked_rewards(m.reward_fn(prompts, texts), prompts, texts,
                                 f"reward.function {cfg.reward.function}", iteration, InputError)
    return scores.to(input_ids.device), ref_logprobs


@torch.no_grad()
def rollout(m: PPOModels, cfg: PPOConfig, engine: Engine, tokenizer, controller,
            prompts: list[list[int]], iteration: int) -> tuple[Rollout, dict[str, float]]:
    """Sample, score and compute the KL-penalised per-token rewards, values, GAE advantages and returns."""
    query, query_mask, responses, mask, has_eos = sample(m, cfg, engine, tokenizer, prompts)
    input_ids = torch.cat([query, responses], dim=1)
    attention_mask = torch.cat([query_mask, mask.long()], dim=1)
    q = query.shape[1]
    with engine.accelerator.autocast():
        logprobs, values, _, logits = policy_forward(m, engine, input_ids, attention_mask, q,
                                                     cfg.rollout.temperature)
        entropy = entropy_from_logits(response_logits(logits, q, cfg.rollout.temperature))
        scores, ref_logprobs = scores_and_reference(m, cfg, tokenizer, input_ids, attention_mask, query,
                                                    responses, iteration)
    scores = scores - cfg.reward.no_eos_penalty * (~has_eos).float()
    kl = rl.kl_penalty(logprobs, ref_logprobs, cfg.kl.estimator) * mask
    rewards = -controller.value * kl
    last = mask.sum(1).long().clamp(min=1) - 1
    rewards[torch.arange(len(last), device=rewards.device), last] += scores
    values = values.float() * mask
    advantages, returns = rl.gae(rewards, values, mask, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam)
    if cfg.ppo.whiten_advantages:
        advantages = rl.masked_whiten(advantages, mask)
    seq_kl = kl.sum(1)
    stats = {"reward": float(scores.mean()), "kl": float(seq_kl.mean()),
             "non_score_reward": float((-controller.value * seq_kl).mean()),
             "rlhf_reward": float((scores - controller.value * seq_kl).mean()),
             "entropy": float(rl.masked_mean(entropy, mask)), "response_length": float(mask.sum(1).mean()),
             "no_eos_fraction": float((~has_eos).float().mean()), "kl_coef": controller.value}
    return Rollout(input_ids, attention_mask, mask, logprobs, values, advantages, returns, q), stats


# ------------------------------------------------------------------------------------------------ update

def ppo_step(m: PPOModels, cfg: PPOConfig, engine: Engine, ro: Rollout, ptx: Iterator[dict] | None,
             idx: torch.Tensor, ctx: StepContext) -> StepOutput:
    """Clipped policy loss + vf_coef x clipped value loss (+ ptx.coef x the LM loss) on the rollouts
    ``idx``."""
    mask = ro.mask[idx]
    logprobs, values, ptx_nll, _ = policy_forward(m, engine, ro.input_ids[idx], ro.attention_mask[idx],
                                                  ro.query_len, cfg.rollout.temperature,
                                                  next(ptx) if ptx is not None else None)
    pg, pg_clipped = ppo_policy_loss(logprobs, ro.logprobs[idx], ro.advantages[idx],
                                     clip_range=cfg.ppo.clip_range)
    vf, vf_clipped = ppo_value_loss(values.float(), ro.values[idx], ro.returns[idx],
                                    clip_range=cfg.ppo.value_clip_range)
    policy_loss, value_loss = rl.masked_mean(pg, mask), rl.masked_mean(vf, mask)
    loss = policy_loss + cfg.ppo.vf_coef * value_loss
    ptx_loss = torch.zeros((), device=loss.device)
    if ptx_nll is not None:
        ptx_loss = ptx_nll[0] / ptx_nll[1].clamp(min=1)
        loss = loss + cfg.ptx.coef * ptx_loss
    log_ratio = logprobs.detach() - ro.logprobs[idx]
    metrics = {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
               "clipfrac": rl.masked_mean(pg_clipped, mask),
               "value_clipfrac": rl.masked_mean(vf_clipped, mask),
               "approx_kl": rl.masked_mean(0.5 * log_ratio**2, mask), "ptx_loss": ptx_loss.detach()}
    return StepOutput(loss, metrics, units=len(idx))


def update(m: PPOModels, cfg: PPOConfig, engine: Engine, optimizer, scheduler, ro: Rollout, iteration: int,
           ptx: Iterator[dict] | None) -> dict[str, float]:
    """ppo.epochs passes over the rollouts in seeded shuffled micro-batches, each optimizer step the engine's;
    the means of the steps' metrics (steps skipped as non-finite count in engine.nonfinite_steps only)."""
    params = [p for p in m.model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(cfg.optim.seed * 1_000_003 + iteration)
    step_fn = partial(ppo_step, m, cfg, engine, ro, ptx)
    steps = len(ro.mask) // (cfg.optim.batch_size * cfg.optim.gradient_accumulation_steps)
    sums: dict[str, float] = {}
    done = 0
    for _ in range(cfg.ppo.epochs):
        order = torch.randperm(len(ro.mask), generator=g).to(engine.device)
        micro = iter(order.split(cfg.optim.batch_size))
        for _ in range(steps):
            out = engine.optimizer_step(m.model, params, optimizer, scheduler, micro, step_fn,
                                        cfg.optim.max_grad_norm)
            if out is not None:
                out.pop("units")
                sums = {k: sums.get(k, 0.0) + float(v) for k, v in out.items()}
                done += 1
    return {k: v / done for k, v in sums.items()}


# -------------------------------------------------------------------------------------------------- save

def write_final(m: PPOModels, tokenizer, folder: Path, value_dir: Path) -> None:
    """The policy (LoRA adapter or whole model) and tokenizer into ``folder``; the critic into ``value_dir``:
    the value model's save_pretrained folder, or the value head's weights."""
    models.save_pretrained(m.lm, tokenizer, folder)
    if m.actor_critic.value_model is not None:
        m.actor_critic.value_model.model.save_pretrained(value_dir, safe_serialization=True)
        return
    from safetensors.torch import save_file

    value_dir.mkdir(parents=True, exist_ok=True)
    head = m.actor_critic.policy.value_head
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
              str(value_dir / models.VALUE_HEAD_FILE))


# --------------------------------------------------------------------------------------------------- run

def mean_over_processes(engine: Engine, stats: dict[str, float]) -> dict[str, float]:
    if engine.world == 1:
        return stats
    t = torch.tensor(list(stats.values()), dtype=torch.float64, device=engine.device)
    return dict(zip(stats, engine.accelerator.reduce(t, reduction="mean").tolist()))


@releases_output_dir
def run(cfg: PPOConfig) -> dict:
    """Set up models and data, then ppo.iterations of rollout + update, then save; returns the summary (also
    in summary.json)."""
    engine = Engine(cfg, seed=cfg.optim.seed,
                    gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
                    unit="rollouts", name="ppo", run_files=(DATA_STATS, VALUE_DIR), owner="llm ppo")
    cfg = engine.cfg
    tokenizer = models.load_tokenizer(cfg.model.name_or_path)
    prompts, ptx, prompt_stats = setup_data(cfg, engine, tokenizer)
    actor_critic, reference, reward_model, reward_fn = setup_models(cfg, engine, tokenizer.pad_token_id)
    steps_per_iteration = cfg.ppo.epochs * cfg.rollout.batch_size // (
        cfg.optim.batch_size * cfg.optim.gradient_accumulation_steps)
    optimizer, scheduler = build_optimizer(actor_critic.parameters(), cfg.optim,
                                           cfg.ppo.iterations * steps_per_iteration, engine.world)
    model, optimizer = engine.prepare(actor_critic, optimizer)
    m = PPOModels(actor_critic, model, reference, reward_model, reward_fn)
    controller = (rl.AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
                  else rl.FixedKLController(cfg.kl.coef))

    history = []
    for iteration in tqdm(range(1, cfg.ppo.iterations + 1), desc="ppo", disable=not engine.is_main):
        t0 = time.perf_counter()
        ro, stats = rollout(m, cfg, engine, tokenizer, controller, next(prompts), iteration)
        t1 = time.perf_counter()
        stats |= update(m, cfg, engine, optimizer, scheduler, ro, iteration, ptx)
        stats = mean_over_processes(engine, stats | {"rollout_s": t1 - t0,
                                                     "update_s": time.perf_counter() - t1})
        stats |= {"lr": scheduler.get_last_lr()[0], "nonfinite_steps": engine.nonfinite_steps}
        controller.update(stats["kl"], n_steps=len(ro.mask) * engine.world)
        history.append(stats)
        if iteration % cfg.log_every == 0 or iteration == cfg.ppo.iterations:
            engine.log(stats, step=iteration)

    value_dir = engine.out / VALUE_DIR
    final = engine.save_final(actor_critic, lambda folder: write_final(m, tokenizer, folder, value_dir))
    if engine.is_main:
        (engine.out / DATA_STATS).write_text(json.dumps({"prompts": prompt_stats}, indent=2) + "\n")
    tail = max(1, len(history) // 5)
    return engine.finish({
        "final": str(final), "value": str(value_dir), "metrics": str(engine.metrics_path),
        "iterations": cfg.ppo.iterations, "reward_first": sum(h["reward"] for h in history[:tail]) / tail,
        "reward_last": sum(h["reward"] for h in history[-tail:]) / tail, "kl_last": history[-1]["kl"],
        "kl_coef": controller.value, "data": {"prompts": prompt_stats},
        "weight_digests": engine.digests(actor_critic)})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(PPOConfig, sys.argv[1:] if argv is None else argv, prog="diffusion-dpo llm ppo",
                     description=__doc__)
    summary = run(cfg)
    if summary["process_index"] == 0:
        print(f"wrote {summary['final']} ({summary['iterations']} iterations; reward "
              f"{summary['reward_first']:.3f} -> {summary['reward_last']:.3f}, KL {summary['kl_last']:.3f})")
    return 0
