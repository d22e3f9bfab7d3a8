"""The configuration of ``diffusion-dpo llm ppo`` (``diffusion_dpo.recipes.llm_ppo``): prompts, reward,
critic, KL penalty, sampling, PPO updates, PPO-ptx and the KL reference, each key with its check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from diffusion_dpo.config import ConfigError, at_least_one, option
from diffusion_dpo.llm import models
from diffusion_dpo.run_options import OptimSection, TrainingRunOptions


def _fraction(v) -> bool:
    return 0 <= v <= 1


def _non_negative(v) -> bool:
    return v >= 0


@dataclass
class PromptData:
    source: str = option("trl-lib/ultrafeedback-prompt",
                         "prompts: hub dataset id or local parquet/JSON/JSONL "
                         "file or folder (a preference set gives its shared prompts)")
    subset: str | None = option(None, "hub dataset configuration name; null = default")
    split: str = option("train", "split of the prompts")
    max_rows: int | None = option(None, "read at most this many prompts (null = all)",
                                  lambda v: v is None or v >= 1, "null or at least 1 row")
    prompt_column: str = option("prompt", "column of the prompt (text or conversation)")
    max_prompt_length: int = option(256, "prompts longer than this are cut on the prompt_truncation side "
                                    "(counted as truncated)", at_least_one, "at least 1 token")
    prompt_truncation: Literal["left", "right"] = option(
        "left", "side of a too-long prompt that is cut: left drops its oldest tokens and keeps the end (the "
        "latest turns and the generation header); right keeps its start")


@dataclass
class RewardSection:
    model: str | None = option(None,
                               "reward model folder or hub id (as written by `llm reward`); its score at "
                               "the last token is the reward")
    function: str | None = option(None, "rule-based reward instead: 'package.module:name' or "
                                  "'path/file.py:name', called as name(prompts: list[str], responses: "
                                  "list[str]) -> floats")
    no_eos_penalty: float = option(1.0,
                                   "subtracted from the score of a response that never emits EOS (0 = off)")


@dataclass
class ValueSection:
    kind: Literal["model", "head"] = option(
        "model", "model: a separate value model (all its weights trained, even when the policy uses LoRA); "
        "head: a linear head on the policy's last hidden state")
    model: str | None = option(None, "kind model: where the value model starts; null = the reward model, or "
                               "the policy when the reward is a function")


@dataclass
class KLSection:
    coef: float = option(0.05, "initial KL penalty coefficient beta", _non_negative, "0 or more")
    estimator: Literal["k1", "k3"] = option("k1",
                                            "per-token KL estimator: k1 = log p - log ref; k3 = (r - 1) - "
                                            "log r with r = ref / p (never negative)")
    adaptive: bool = option(False, "adapt beta towards kl.target (Ziegler et al.'s proportional controller)")
    target: float = option(6.0, "adaptive: target KL per response, nats", lambda v: v > 0,
                           "a positive number")
    horizon: int = option(10000, "adaptive: controller horizon, in rollouts", at_least_one, "at least 1")


@dataclass
class RolloutSection:
    batch_size: int = option(16, "prompts per process per iteration", at_least_one, "at least 1 prompt")
    max_new_tokens: int = option(64, "response length limit, tokens", at_least_one, "at least 1 token")
    temperature: float = option(1.0, "sampling temperature (log-probs are computed at the same temperature)",
                                lambda v: v > 0, "a positive number")
    top_k: int = option(0, "top-k sampling (0 = off)", _non_negative, "0 (off) or more")
    top_p: float = option(1.0, "nucleus sampling (1 = off)", lambda v: 0 < v <= 1, "a number in (0, 1]")


@dataclass
class PPOSection:
    iterations: int = option(200, "rollout + update iterations", at_least_one, "at least 1 iteration")
    epochs: int = option(4, "PPO epochs over each rollout batch", at_least_one, "at least 1 epoch")
    clip_range: float = option(0.2, "policy ratio clip epsilon", lambda v: v > 0, "a positive number")
    value_clip_range: float = option(0.2, "value clip epsilon", lambda v: v > 0, "a positive number")
    vf_coef: float = option(0.1, "weight of the value loss", _non_negative, "0 or more")
    gamma: float = option(1.0, "discount", _fraction, "a number in [0, 1]")
    lam: float = option(0.95, "GAE lambda", _fraction, "a number in [0, 1]")
    whiten_advantages: bool = option(True, "normalise advantages to mean 0, variance 1 over the batch")


@dataclass
class PtxSection:
    coef: float = option(0.0,
                         "PPO-ptx: weight gamma of the language-modelling loss on pre-training text "
                         "(0 = off)", _non_negative, "0 (off) or more")
    source: str | None = option(None, "pre-training text: hub dataset id or local file/folder")
    split: str = option("train", "split of the pre-training text")
    text_column: str = option("text", "column of the text")
    max_length: int = option(512, "tokens per text (the start is kept)", lambda v: v >= 2,
                             "at least 2 tokens")
    batch_size: int = option(4, "texts per PPO micro-batch", at_least_one, "at least 1 text")
    max_rows: int | None = option(10000, "read at most this many texts", lambda v: v is None or v >= 1,
                                  "null or at least 1 row")


@dataclass
class PPOReference:
    kind: Literal["copy", "adapter"] = option("copy", "copy: a frozen copy of the starting policy (or of "
                                              "reference.model); adapter: the policy with LoRA disabled")
    model: str | None = option(None, "kind copy: the reference model; null = the starting policy")


@dataclass
class PPOConfig(TrainingRunOptions):
    output_dir: str = option("runs/llm-ppo", "config.yaml, metrics.jsonl, final/ (policy) and value/ go here")
    log_every: int = option(1, "iterations between metrics.jsonl rows", at_least_one, "at least 1 iteration")
    checkpoint_every: int = option(0, "PPO writes no checkpoints", lambda v: v == 0,
                                   "0 (PPO has no checkpoints)")
    model: models.ModelConfig = option(models.ModelConfig, "the policy (usually the SFT model)")
    reference: PPOReference = option(PPOReference, "the KL anchor")
    reward: RewardSection = option(RewardSection, "the reward: a reward model or a function")
    value: ValueSection = option(ValueSection, "the critic")
    kl: KLSection = option(KLSection, "KL penalty")
    data: PromptData = option(PromptData, "prompts")
    rollout: RolloutSection = option(RolloutSection, "sampling")
    ppo: PPOSection = option(PPOSection, "PPO updates")
    optim: OptimSection = option(
        OptimSection(learning_rate=1e-6, scheduler="constant", batch_size=8),
        "optimizer and schedule of policy and value parameters; batch_size: rollouts per micro-batch; "
        "epochs and max_steps are not used (ppo.iterations and ppo.epochs are)")
    ptx: PtxSection = option(PtxSection, "PPO-ptx pre-training term")

    def check(self) -> None:
        if (self.reward.model is None) == (self.reward.function is None):
            raise ConfigError("config key 'reward.model': set exactly one of reward.model (a reward model) "
                              "and reward.function (a rule)")
        if self.reference.kind == "adapter" and not self.model.lora.enabled:
            raise ConfigError("config key 'reference.kind': 'adapter' needs model.lora.enabled=true")
        if self.ptx.coef > 0 and self.ptx.source is None:
            raise ConfigError("config key 'ptx.source': ptx.coef > 0 needs pre-training text, got null")
        if self.resume is not None:
            raise ConfigError(f"config key 'resume': expected null (PPO writes no checkpoints), got "
                              f"{self.resume!r}")
        if self.optim.max_steps is not None or self.optim.epochs != 1.0:
            raise ConfigError("config key 'optim.max_steps': PPO runs ppo.iterations x ppo.epochs; leave "
                              "optim.max_steps null and optim.epochs 1")
        per_step = self.optim.batch_size * self.optim.gradient_accumulation_steps
        if self.rollout.batch_size % per_step:
            raise ConfigError(f"config key 'rollout.batch_size': expected a multiple of optim.batch_size x "
                              f"optim.gradient_accumulation_steps = {per_step}, got "
                              f"{self.rollout.batch_size}")
