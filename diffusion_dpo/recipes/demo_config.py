"""The configuration of ``diffusion-dpo demo``'s sections: the shapes world's prompts, the sampler, and the
train.* keys, named as the train command's keys they set, with each demo base's tuning defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from diffusion_dpo.config import at_least_one, non_negative, option

# Each demo base's tuning defaults (train.* keys left null). The flow base's were measured on its pairs
# (docs/BENCHMARKS.md): flow_grpo's beta 100 on mean errors at lr 3e-4 wins the DPO loss by raising the
# losers' error and the winners' with it, and loses to the base; beta 500 improves on it, and a rank-32
# adapter at lr 5e-5 was the one setting above 50% on all three seeds' pairs.
FAMILY_TRAIN_DEFAULTS = {
    "sd": dict(model=dict(lora_rank=8), loss=dict(beta=5000.0), optim=dict(learning_rate=3e-4, max_steps=200),
               sft_optim=dict(learning_rate=3e-4, max_steps=200)),
    "flow": dict(model=dict(lora_rank=32), loss=dict(beta=500.0), optim=dict(learning_rate=5e-5, max_steps=200),
                 sft_optim=dict(learning_rate=3e-4, max_steps=200)),
    # The video base (Wan layout, rectified flow) starts from the flow base's settings.
    "video": dict(model=dict(lora_rank=32), loss=dict(beta=500.0), optim=dict(learning_rate=5e-5, max_steps=200),
                  sft_optim=dict(learning_rate=3e-4, max_steps=200)),
}

# What differs per family besides the tuning: the scorer, the prompts (the still world's 252, the moving
# world's 504), frames per sample and the side in px label, evaluate and grpo generate at (null: the
# pipeline's own default, the images' 32 px).
# eval_seeds: images per held-out prompt and model when the demo's key is null. The flow base's demos gain
# less (win rates near 60%, against 65-84% on the SD base), and with 4 images per prompt their intervals span
# about +-7 points; 16 (1008 images per model) narrow them to about +-4.5 (docs/BENCHMARKS.md).
FAMILY_WORLD = {
    "sd": dict(scorer="shapes", eval_scorers="shapes,shapes_geneval", motion=False, num_frames=1, side=None,
               eval_seeds=4),
    "flow": dict(scorer="shapes", eval_scorers="shapes,shapes_geneval", motion=False, num_frames=1, side=None,
                 eval_seeds=16),
    "video": dict(scorer="shapes_video", eval_scorers="shapes_video", motion=True, num_frames=5, side=32,
                  eval_seeds=4),
}


def null_or_positive(v) -> bool:
    return v is None or v >= 1


def null_or_positive_number(v) -> bool:
    return v is None or v > 0


@dataclass
class WorldConfig:
    held_out_fraction: float = option(0.25, "share of the world's 252 prompts (family video: the moving "
                                      "world's 504) held out from labelling and training, for evaluation", lambda v: 0.002 < v < 0.998,
                                      "a fraction in (0.002, 0.998): at least one of the 252 prompts each side")
    split_seed: int = option(0, "seed of the train/held-out prompt split (0: the split the base was "
                             "evaluated on)")
    train_prompts: int | None = option(None, "use only the first N training prompts (null: all 189; "
                                       "video: 378)",
                                       null_or_positive, "null or at least 1")
    held_out_prompts: int | None = option(None, "evaluate on only the first N held-out prompts (null: all "
                                          "63; video: 126)", null_or_positive, "null or at least 1")


@dataclass
class SamplingConfig:
    num_inference_steps: int = option(20, "sampler steps (DDIM, or the flow base's Euler) for every generated "
                                      "image (labelling and evaluation)", at_least_one, "at least 1")
    guidance_scale: float = option(4.0, "classifier-free guidance scale")
    batch_size: int = option(64, "images per generation batch", at_least_one, "at least 1")
    num_frames: int | None = option(None, "frames per sample (null: the family's: 1 sd and flow, 5 video: "
                                    "clips of 4 k + 1 frames for the Wan VAE)", null_or_positive,
                                    "null or at least 1")


# The demo's train.* keys carry the names of the train command's keys they set (train.optim.learning_rate
# sets optim.learning_rate), in sections holding only what the demo passes on.
@dataclass
class DemoModelSection:
    lora_rank: int | None = option(None, "0: full fine-tune of the denoiser; r > 0: a rank-r LoRA adapter on the "
                                   "attention projections (null: the family's: 8 sd, 32 flow and video)",
                                   lambda v: v is None or v >= 0, "null, 0 or a positive rank")


@dataclass
class DemoDataSection:
    caption_dropout: float = option(0.0, "probability a caption is dropped during tuning (DPO and SFT)",
                                    lambda v: 0 <= v <= 1, "a probability in [0, 1]")


@dataclass
class DemoLossSection:
    beta: float | None = option(None, "Diffusion-DPO beta (null: the family's: 5000, the paper's scale, for sd; "
                                "500 for flow and video)", null_or_positive_number, "null or a positive number")


@dataclass
class DemoOptimSection:
    learning_rate: float | None = option(None, "DPO learning rate, not scaled by the batch (null: the family's, "
                                         "3e-4 sd, 5e-5 flow and video); a full fine-tune (lora_rank=0) wants about 1e-5",
                                         null_or_positive_number, "null or a positive number")
    max_steps: int | None = option(None, "DPO optimizer steps per round (null: the family's, 200)",
                                   null_or_positive, "null or at least 1")
    batch_size: int = option(16, "pairs per step (DPO and SFT)", at_least_one, "at least 1")
    warmup_steps: int = option(20, "linear warm-up steps (DPO and SFT)", non_negative, "0 or more")


@dataclass
class DemoSftOptimSection:
    learning_rate: float | None = option(None, "SFT baseline learning rate (null: the family's, 3e-4)",
                                         null_or_positive_number, "null or a positive number")
    max_steps: int | None = option(None, "SFT baseline optimizer steps (null: the family's, 200)",
                                   null_or_positive, "null or at least 1")


@dataclass
class DemoTrainConfig:
    model: DemoModelSection = option(DemoModelSection, "the train command's model.* keys the demo sets")
    data: DemoDataSection = option(DemoDataSection, "the train command's data.* keys the demo sets")
    loss: DemoLossSection = option(DemoLossSection, "the DPO run's loss.* keys")
    optim: DemoOptimSection = option(DemoOptimSection, "the DPO run's optim.* keys (batch_size and warmup_steps "
                                     "also the SFT run's)")
    sft_optim: DemoSftOptimSection = option(DemoSftOptimSection, "the SFT baseline run's optim.* keys that "
                                            "differ from the DPO run's")
    # The keys' names before they took the train command's (an old name is refused with its new one).
    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "lora_rank": "model.lora_rank", "beta_dpo": "loss.beta", "learning_rate": "optim.learning_rate",
        "max_steps": "optim.max_steps", "batch_size": "optim.batch_size", "lr_warmup_steps": "optim.warmup_steps",
        "caption_dropout": "data.caption_dropout", "sft_learning_rate": "sft_optim.learning_rate",
        "sft_max_steps": "sft_optim.max_steps"}
