"""The configuration of ``diffusion-dpo grpo``: online reward tuning (GRPO, online DPO) of a text-to-image
denoiser, in sections (model, prompts, scorer, sampling, online, optim, eval)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from diffusion_dpo.config import ConfigError, at_least_one, non_negative, option, positive
from diffusion_dpo.families import NoiseConfig
from diffusion_dpo.labeling.scoring import ScorerConfig
from diffusion_dpo.pipeline_config import ModelConfig
from diffusion_dpo.run_options import OptimSection, TrainingRunOptions


@dataclass
class PromptsSection:
    source: str = option("hpsv2-offline", "training prompts: hpsv2-offline[:style] (built in), a folder of "
                         "<style>.json, or a .txt (one per line) / .json / .tsv file[:style]")
    max_prompts: Optional[int] = option(None, "use only the first N prompts (null: all)",
                                        lambda v: v is None or v >= 1, "null or at least 1")


@dataclass
class StochasticSamplingSection:
    num_inference_steps: int = option(10, "T: stochastic denoising steps per image (every one is recorded)",
                                      at_least_one, "at least 1")
    guidance_scale: Optional[float] = option(
        None, "guidance when sampling, recomputing log-probs and evaluating (null: the family's: 4.5, Flow-GRPO's "
        "SD3.5 setting, for SD1.x/2.x, SDXL and SD3; 3.5 for FLUX.1; 1 for method=nft, CFG-free as "
        "DiffusionNFT). Classifier-free for SD and SD3 (1: none); "
        "FLUX.1-dev embeds it in the transformer with no unconditional pass, as FluxPipeline does",
        lambda v: v is None or v >= 1, "null or at least 1")
    eta: float = option(1.0, "DDPM families (SD1.x/2.x, SDXL): DDIM eta of the stochastic sampler (DDPO: 1.0)",
                        positive, "a positive number")
    noise_level: float = option(0.7, "flow families (SD3, FLUX.1): the SDE's a in sigma_t = a sqrt(t / (1 - "
                                "t)) (Flow-GRPO: 0.7)", positive, "a positive number")
    resolution: Optional[int] = option(None, "image side in px (null: the denoiser's sample_size x the VAE's "
                                       "downsampling, the native size: 1024 for SD3.5-M; Flow-GRPO's SD3.5 "
                                       "runs use 512)", lambda v: v is None or v >= 8, "null or at least 8")
    num_frames: int = option(1, "video families (Wan): frames per sampled video, t k + 1 for the VAE's temporal "
                             "factor t (Wan: 1, 5, 9, ..., 81); every frame is scored and a video's reward is "
                             "its frames' mean. Image families: 1", at_least_one, "at least 1")
    sde: Literal["flow_grpo", "cps"] = option(
        "flow_grpo", "flow families: the stochastic step, flow_grpo (the Flow-GRPO SDE, std sigma_t sqrt(|dt|)) or "
        "cps (coefficients-preserving: re-noises the predicted x0 to exactly the next sigma, std sigma_next "
        "sin(noise_level pi/2); its last step is deterministic and never trained)")
    logprob_reduction: Literal["mean", "sum"] = option(
        "mean", "a transition's log-prob over the latent elements: mean (DDPO's and Flow-GRPO's; the clip "
        "range does not depend on the image size) or sum")


@dataclass
class OnlineSection:
    prompts_per_step: int = option(8, "prompts per process per step (each gets a whole group)", at_least_one,
                                   "at least 1")
    group_size: int = option(8, "G: images sampled per prompt (Flow-GRPO's SD3.5 configs: 24)", lambda v: v >= 2,
                             "at least 2")
    train_steps: Optional[int] = option(None, "K: transitions trained per image, drawn per image from the T "
                                        "(null: all T)", lambda v: v is None or v >= 1, "null or at least 1")
    sde_window_size: int = option(
        0, "noise, and training, only on a window of this many consecutive steps, the others deterministic (the "
        "ODE / eta 0); 0: every step is stochastic (Flow-GRPO, DDPO). Flow-GRPO-Fast: 1-2; MixGRPO: 4",
        non_negative, "0 or more steps")
    sde_window: Literal["random", "sliding", "fixed"] = option(
        "random", "where the window lies each step: random (Flow-GRPO-Fast), sliding from sde_window_start by "
        "sde_window_stride every sde_window_shift_every steps, wrapping (MixGRPO), or fixed at sde_window_start")
    sde_window_start: int = option(0, "first step of a fixed window, or where a sliding one starts", non_negative,
                                   "0 or more")
    sde_window_stride: int = option(1, "sliding window: steps it moves each shift", at_least_one, "at least 1")
    sde_window_shift_every: int = option(1, "sliding window: sampling steps between shifts", at_least_one,
                                         "at least 1")
    shared_start_noise: bool = option(
        False, "grpo / online_dpo: the G images of a prompt start from the same noise, so they differ only by the "
        "sampler's noise, the noise of the steps that are trained (DanceGRPO's shared initialisation noise); "
        "false: each image its own starting noise (DDPO, Flow-GRPO)")
    first_steps: int = option(0, "of the K, always train the first (noisiest) this many", non_negative,
                              "0 or more")
    inner_epochs: int = option(1, "optimizer steps on each step's samples (PPO epochs)", at_least_one,
                               "at least 1")
    updates_per_epoch: int = option(1, "optimizer steps per inner epoch: a step's rows, shuffled, are cut into "
                                    "this many equal parts (DDPO's batches per epoch)", at_least_one, "at least 1")
    clip_range: float = option(1e-4, "GRPO: PPO clip range of the importance ratio (DDPO: 1e-4)", positive,
                               "a positive number")
    kl_coef: float = option(0.04, "GRPO: weight of the per-transition KL to the reference (0 skips the reference "
                            "forward). Flow-GRPO's paper gives 0.04 (its PickScore config 0.01) with its code's "
                            "KL, which is online.kl_convention=flow_grpo_code; with the default paper convention "
                            "the same value weighs the KL 1/|dt| times more (3.7-112x at SD3.5, T=10)",
                            non_negative, "0 or more")
    kl_convention: Literal["paper", "flow_grpo_code"] = option(
        "paper", "GRPO's KL to the reference: paper = the exact KL of the two Gaussian SDE steps (mean "
        "difference over sigma_t^2 |dt|); flow_grpo_code = over sigma_t^2, as flow_grpo's script computes it "
        "(flow families only)")
    advantage_scope: Literal["group", "batch", "group_batch_std"] = option(
        "group", "group: normalise rewards within each prompt's group (GRPO); batch: over the whole batch of all "
        "processes; group_batch_std: the group's mean over the std of the whole batch + 1e-4 (flow_grpo's code; "
        "a near-tied group keeps small advantages)")
    reward_normalization: Literal["weighted_sum", "per_reward"] = option(
        "weighted_sum", "several rewards (scorer.name=combo): normalise the weighted sum (weighted_sum), or each "
        "reward on its own within the scope above and then weight the advantages (per_reward: a reward on a "
        "large scale no longer drowns a small one; the multi-reward balancing of flow_grpo and DanceGRPO)")
    advantage_clip: float = option(5.0, "clip advantages to [-c, c] (DDPO: 5)", positive, "a positive number")
    beta_dpo: Optional[float] = option(
        None, "online_dpo: Diffusion-DPO beta, on the paper's scale (null: the family's: 5000 for SD1.x/2.x and "
        "SDXL as the paper; 100 for SD3 and FLUX as flow_grpo's DPO script)", lambda v: v is None or v > 0,
        "null or a positive number")
    trained_fraction: float = option(
        1.0, "grpo: draw the trained transitions from the first floor(fraction x T) steps only (flow_grpo: 0.99, "
        "which at T = 10 leaves out the last, nearly noiseless step)", lambda v: 0 < v <= 1, "a fraction in (0, 1]")
    drop_zero_advantage: bool = option(
        False, "grpo: leave images whose advantage is exactly 0 (a group with equal rewards) out of the update's "
        "mean, as flow_grpo's script does (false: they stay in it and add only their KL)")
    detach_uncond: bool = option(
        False, "grpo and nft: no gradient through the unconditional branch of classifier-free guidance in the update "
        "(flow_grpo detaches it; DDPO does not). The rollout runs without gradients either way")
    ref_refresh_every: int = option(0, "online_dpo: copy the policy into the reference every N steps (0: "
                                    "never; the reference stays the starting policy)", non_negative,
                                    "0 or more")
    nft_beta: float = option(1.0, "nft: strength of the implicit positive/negative policies (DiffusionNFT's configs: "
                             "1.0; 0.1 for OCR)", lambda v: v > 0, "a positive number")
    nft_kl_coef: float = option(1e-4, "nft: weight of the mean squared velocity difference to the reference "
                                "(DiffusionNFT: 1e-4; 0 skips the reference forward)", non_negative, "0 or more")
    nft_group_noise: bool = option(
        False, "nft: noise the G images of a prompt's group with the same noise at the same steps (a control "
        "variate: the group's advantages sum to 0, so the part of the gradient that comes from the noise draw "
        "cancels, as Diffusion-DPO's shared noise per pair does); false: every image its own (DiffusionNFT)")
    nft_old_decay_rate: float = option(0.001, "nft: the old (sampling) policy keeps d = min(rate x (steps - "
                                       "after), max) of itself at each step (DiffusionNFT: 0.001)", non_negative,
                                       "0 or more")
    nft_old_decay_max: float = option(0.5, "nft: the largest d (DiffusionNFT: 0.5; its OCR config 0.999)",
                                      lambda v: 0 <= v < 1, "a number in [0, 1)")
    nft_old_decay_after: int = option(0, "nft: sampling steps with d = 0 (the old policy is the current one) "
                                      "before d grows (DiffusionNFT's OCR config: 75)", non_negative, "0 or more")
    reference: Optional[Literal["adapter", "copy"]] = option(
        None, "the reference of online_dpo and of grpo's KL: adapter (LoRA only): the policy with its adapter "
        "switched off, or, with online_dpo refreshes, a second frozen adapter on the same base (no second copy "
        "of the denoiser: saves its size in memory); copy: a frozen full copy of the starting denoiser; null: "
        "adapter with LoRA, copy for a full fine-tune")


@dataclass
class EvalSection:
    prompts: Optional[str] = option(None, "held-out prompts (same forms as prompts.source); null: no "
                                    "evaluation")
    every: int = option(0, "evaluate every N steps (0: only at the end)", non_negative, "0 or more")
    seeds: int = option(2, "images per held-out prompt and model", at_least_one, "at least 1")
    num_inference_steps: Optional[int] = option(None, "the pipeline's own sampler steps (null: "
                                                "sampling.num_inference_steps)", lambda v: v is None or v >= 1,
                                                "null or at least 1")
    grid_prompts: int = option(8, "prompts per style in the grids", non_negative, "0 or more")
    n_boot: int = option(2000, "bootstrap resamples of the 95% intervals", at_least_one, "at least 1")
    batch_size: int = option(16, "images per generation batch", at_least_one, "at least 1")
    use_ema: bool = option(True, "with ema.decay > 0, evaluate the EMA weights instead of the trained ones "
                           "(logged as eval/ema_weights = 1)")


@dataclass
class GrpoConfig(TrainingRunOptions):
    output_dir: str = option("runs/grpo", "where config.yaml, metrics.jsonl, logs/, checkpoints/, eval/ and "
                             "final/ go")
    method: Literal["grpo", "online_dpo", "nft"] = option(
        "grpo", "grpo: the clipped ratio objective on advantages per group; online_dpo: Diffusion-DPO on the "
        "best vs the worst image of each group; nft: DiffusionNFT, the forward-process loss on images the "
        "deterministic sampler drew with a trailing old policy (no log-probs)")
    model: ModelConfig = option(ModelConfig(lora_rank=8), "the checkpoint to tune and how (LoRA rank 8 by "
                                "default; Flow-GRPO's SD3.5 runs: rank 32, alpha 64)")
    prompts: PromptsSection = option(PromptsSection, "training prompts, visited in a seeded order")
    scorer: ScorerConfig = option(ScorerConfig, "the reward: a registry scorer or a weighted combo")
    sampling: StochasticSamplingSection = option(StochasticSamplingSection, "the stochastic sampler")
    online: OnlineSection = option(OnlineSection, "group size, trained transitions, GRPO and online DPO settings")
    noise: NoiseConfig = option(NoiseConfig, "online_dpo: the time draw of its Diffusion-DPO loss on flow families "
                                "(as train's; flow_grpo's DPO draws noise.timestep_sampling=logit_normal)")
    optim: OptimSection = option(
        OptimSection(learning_rate=3e-4, scheduler="constant", warmup_steps=0, batch_size=8, max_steps=100),
        "optimizer; batch_size is the micro-batch in transitions (grpo) or pairs (online_dpo), max_steps counts "
        "sampling steps (each runs online.inner_epochs x online.updates_per_epoch optimizer steps)")
    eval: EvalSection = option(EvalSection, "held-out evaluation against the base (win rate, grids)")
    log_every: int = option(1, "write the monitors every N sampling steps (each step's own values, not averaged)",
                            at_least_one, "at least 1 step")
    checkpoint_every: int = option(50, "save a resumable checkpoint every N sampling steps (0: never)",
                                   non_negative, "0 (never) or a positive number of steps")

    def num_train_steps(self) -> int:
        return self.online.train_steps or self.online.sde_window_size or self.eligible_steps()

    def eligible_steps(self) -> int:
        """The first steps of the T the trained transitions (and any window) are drawn from: the trained
        fraction, less CPS's deterministic last step."""
        t = self.sampling.num_inference_steps
        return min(int(self.online.trained_fraction * t + 1e-9), t - 1 if self.sampling.sde == "cps" else t)

    def optimizer_steps_per_step(self) -> int:
        return self.online.inner_epochs * self.online.updates_per_epoch

    def rows_per_update(self) -> int:
        """Rows one process trains on per optimizer step: transitions (grpo) or pairs (online_dpo)."""
        return self.rows_per_step() // self.online.updates_per_epoch

    def rows_per_step(self) -> int:
        """Rows one process trains on per inner epoch: transitions (grpo) or pairs (online_dpo)."""
        o = self.online
        if self.method == "online_dpo":
            return o.prompts_per_step
        return o.prompts_per_step * o.group_size * self.num_train_steps()

    def reference_kind(self) -> str:
        """online.reference, or when null: adapter with LoRA, copy for a full fine-tune."""
        return self.online.reference or ("adapter" if self.model.lora_rank > 0 else "copy")

    def needs_reference(self) -> bool:
        """online_dpo's loss always has a reference; grpo's and nft's only through their KL term."""
        if self.method == "nft":
            return self.online.nft_kl_coef > 0
        return self.method == "online_dpo" or self.online.kl_coef > 0

    def check(self) -> None:
        o = self.online
        if self.method == "nft" and o.sde_window_size:
            raise ConfigError("config key 'online.sde_window_size': nft samples with the deterministic sampler "
                              f"and trains on the forward process; a noise window has no meaning there, got "
                              f"{o.sde_window_size}")
        if self.method == "nft" and o.shared_start_noise:
            raise ConfigError("config key 'online.shared_start_noise': nft samples with the deterministic sampler, "
                              "so a group starting from the same noise would be G copies of one image with "
                              "nothing to compare; expected false with method=nft")
        if self.reference_kind() == "adapter" and self.model.lora_rank == 0 and self.needs_reference():
            raise ConfigError("config key 'online.reference': a full fine-tune (model.lora_rank = 0) has no "
                              "adapter to switch off; expected online.reference=copy (a frozen full copy of the "
                              "denoiser) or model.lora_rank > 0, got 'adapter'")
        if self.optim.max_steps is None:
            raise ConfigError("config key 'optim.max_steps': expected a number of sampling steps, got null")
        if self.optim.gradient_accumulation_steps != 1:
            raise ConfigError("config key 'optim.gradient_accumulation_steps': expected 1 (each optimizer step "
                              "accumulates over all of a step's rows in micro-batches of optim.batch_size), got "
                              f"{self.optim.gradient_accumulation_steps}")
        if self.eligible_steps() < 1:
            raise ConfigError(f"config key 'online.trained_fraction': {o.trained_fraction} of "
                              f"sampling.num_inference_steps = {self.sampling.num_inference_steps} leaves no step "
                              "to train; expected at least 1 / T")
        if o.sde_window_size and o.sde_window_start + o.sde_window_size > self.eligible_steps():
            raise ConfigError(f"config keys 'online.sde_window_start' / 'online.sde_window_size': a window of "
                              f"{o.sde_window_size} from step {o.sde_window_start} does not fit the "
                              f"{self.eligible_steps()} trainable steps (trained_fraction x T, less CPS's last)")
        if o.sde_window_size and self.num_train_steps() > o.sde_window_size:
            raise ConfigError(f"config key 'online.train_steps': expected at most online.sde_window_size = "
                              f"{o.sde_window_size} (only the window's steps are stochastic), got {o.train_steps}")
        if self.num_train_steps() > self.eligible_steps():
            raise ConfigError(f"config key 'online.train_steps': expected at most online.trained_fraction x "
                              f"sampling.num_inference_steps = {self.eligible_steps()}, got {o.train_steps}")
        if o.first_steps > self.num_train_steps():
            raise ConfigError(f"config key 'online.first_steps': expected at most online.train_steps = "
                              f"{self.num_train_steps()}, got {o.first_steps}")
        unit = "pairs (one per prompt)" if self.method == "online_dpo" else \
            "transitions (prompts_per_step x group_size x train_steps)"
        if self.rows_per_step() % o.updates_per_epoch:
            raise ConfigError(f"config key 'online.updates_per_epoch': expected a divisor of the "
                              f"{self.rows_per_step()} {unit} each process trains on per step, got "
                              f"{o.updates_per_epoch}")
        if self.rows_per_update() % self.optim.batch_size:
            raise ConfigError(f"config key 'optim.batch_size': expected a divisor of the {self.rows_per_update()} "
                              f"{unit} / online.updates_per_epoch each process trains on per optimizer step, got "
                              f"{self.optim.batch_size}")
