"""The model-family interface, and the two noise processes the families share.

A :class:`Family` knows one kind of pipeline: its components and how they load, how captions become the
denoiser's conditioning, what per-image conditioning it takes, which noise process trains it, how its
denoiser is called, which modules LoRA adapts, and how final/ is written and loaded back. Everything else
(the data, the shared noise per pair, the errors, the loss) is the same for every family.

Noise processes, for clean latents x0 and noise eps (both [N, C, h, w]) at a per-image time:

    DDPMNoise  t integer in [0, T): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; target eps, v or x0
               as the scheduler's prediction_type says (Ho et al. 2020; Salimans & Ho 2022)
    FlowNoise  sigma in (0, 1): x_t = (1 - sigma) x0 + sigma eps; target v = eps - x0 (rectified flow,
               Esser et al. 2024, eq. 2-3); the model sees the timestep 1000 sigma

The per-image error is the squared error of prediction against target reduced over the latent elements
(mean, as Diffusion-DPO, or sum).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from diffusion_dpo.config import ConfigError, option
from diffusion_dpo.denoising import uniform_timestep
from diffusion_dpo.errors import InputError
from diffusion_dpo.models import DEFAULT_LORA_TARGETS

Tensor = torch.Tensor


@dataclass
class NoiseConfig:
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = option(
        "uniform", "flow-matching families: how u in (0, 1) is drawn before the shift (Esser et al. 2024, sec. "
        "3.1): uniform, logit_normal (sigmoid of a normal) or mode (mode_scale); DDPM families (SD1.x/2.x, "
        "SDXL) draw t uniformly from [0, T) and accept only uniform")
    logit_mean: float = option(0.0, "logit_normal: mean of the normal before the sigmoid")
    logit_std: float = option(1.0, "logit_normal: std of the normal before the sigmoid", lambda v: v > 0,
                              "a positive number")
    mode_scale: float = option(1.29, "mode: the scale s of u -> 1 - u - s (cos^2(pi u / 2) - 1 + u)")
    shift: float | None = option(None, "flow-matching families: sigma = shift u / (1 + (shift - 1) u); null: "
                                 "the scheduler's shift (1 when it shifts by resolution, as FLUX's does)",
                                 lambda v: v is None or v > 0, "null or a positive number")
    reduction: Literal["mean", "sum"] = option("mean", "how a per-image denoising error reduces over the "
                                               "latent elements: mean (Diffusion-DPO's, and beta's scale) or sum")


def reduce_error(prediction: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Squared error over every axis but the first, in fp32: [N, ...] -> [N] (mean or sum)."""
    diff = prediction.float() - target.float()
    square = diff.pow(2)
    dims = tuple(range(1, diff.ndim))
    return square.mean(dim=dims) if reduction == "mean" else square.sum(dim=dims)


class DDPMNoise:
    """The DDPM forward process of a diffusers scheduler (its betas and prediction_type)."""

    def __init__(self, scheduler, reduction: str = "mean"):
        self.scheduler, self.reduction = scheduler, reduction
        self.num_train_timesteps = scheduler.config.num_train_timesteps

    def draw_time(self, generator: torch.Generator) -> Tensor:
        """One timestep, long [1], uniform in [0, T)."""
        return uniform_timestep(self.num_train_timesteps)(generator)

    def noisy(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return self.scheduler.add_noise(x0, eps, t)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return eps
        if kind == "v_prediction":
            return self.scheduler.get_velocity(x0, eps, t)
        if kind == "sample":
            return x0
        raise InputError(f"scheduler prediction_type {kind!r} is not one of ['epsilon', 'sample', 'v_prediction']")

    def model_timestep(self, t: Tensor) -> Tensor:
        return t


def shifted_sigma(u: Tensor, shift: float) -> Tensor:
    """sigma = shift u / (1 + (shift - 1) u): the time shift of SD3 (Esser et al. 2024, eq. 23 with
    shift = sqrt(m / n)), the same map FlowMatchEulerDiscreteScheduler applies to its sigmas."""
    return shift * u / (1 + (shift - 1) * u)


class FlowNoise:
    """Rectified flow: sigma per image from the configured density and shift; target eps - x0."""

    def __init__(self, cfg: NoiseConfig, shift: float, num_train_timesteps: int = 1000):
        self.cfg, self.shift, self.reduction = cfg, shift, cfg.reduction
        self.num_train_timesteps = num_train_timesteps

    def draw_time(self, generator: torch.Generator) -> Tensor:
        """One sigma, float [1]: u from diffusers' SD3 density (uniform, logit-normal or mode), shifted."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        c = self.cfg
        u = compute_density_for_timestep_sampling(c.timestep_sampling, 1, logit_mean=c.logit_mean,
                                                  logit_std=c.logit_std, mode_scale=c.mode_scale,
                                                  generator=generator)
        return shifted_sigma(u, self.shift)

    def _sigma(self, t: Tensor, like: Tensor) -> Tensor:
        return t.to(like).view(-1, *([1] * (like.ndim - 1)))

    def noisy(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        sigma = self._sigma(t, x0)
        return (1 - sigma) * x0 + sigma * eps

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return eps - x0

    def model_timestep(self, t: Tensor) -> Tensor:
        return t.float() * self.num_train_timesteps


Forward = Callable[[Any, Tensor, Tensor, dict, dict], Tensor]


class Family(ABC):
    """One kind of pipeline. Subclasses set the class attributes and implement encode_text and forward.

    ``text_components``: (tokenizer, text encoder) component names in model_index.json, in the order
    ``Components.tokenizers`` / ``text_encoders`` hold them.
    """

    name = ""
    pipeline_class = ""  # diffusers pipeline class name (model_index.json's _class_name)
    denoiser_name = "unet"  # the component that trains: "unet" or "transformer"
    denoiser_class = ""
    text_components: tuple[tuple[str, str], ...] = ()
    lora_targets: tuple[str, ...] = tuple(DEFAULT_LORA_TARGETS)  # the attention projections
    flow = False  # flow matching (FlowNoise) or DDPM (DDPMNoise)

    @classmethod
    def matches(cls, index: dict[str, Any]) -> bool:
        return index.get("_class_name") == cls.pipeline_class

    def shard_blocks(self, denoiser) -> list:
        """The denoiser's submodules that parallel.strategy=fsdp shards as one unit each: by default the
        instances of the classes its own ``_no_split_modules`` names (SD3's joint transformer blocks, FLUX's
        double- and single-stream blocks), outermost first."""
        names = set(getattr(type(denoiser), "_no_split_modules", None) or ())
        found, covered = [], []
        for path, module in denoiser.named_modules():
            if type(module).__name__ in names and not any(path.startswith(c + ".") for c in covered):
                found.append(module)
                covered.append(path)
        return found

    # ------------------------------------------------------------------------------------------ loading
    def load(self, pretrained: str, load: Callable[..., Any], vae: str | None = None):
        """Load the components with ``load(name, weights=bool)`` (the shared loader: the class named in
        model_index.json, from the pipeline's subfolder); the text encoders and VAE frozen in eval mode."""
        from diffusers import AutoencoderKL

        from diffusion_dpo.models import Components

        tokenizers = [load(tok, weights=False) for tok, _ in self.text_components]
        encoders = [load(enc, weights=True) for _, enc in self.text_components]
        denoiser = load(self.denoiser_name, weights=True)
        image_vae = AutoencoderKL.from_pretrained(vae) if vae else load("vae", weights=True)
        for module in [image_vae, *encoders]:
            module.requires_grad_(False).eval()
        return Components(denoiser, image_vae, encoders, tokenizers, self.training_scheduler(pretrained, load),
                          family=self)

    def training_scheduler(self, pretrained: str, load: Callable[..., Any]):
        """DDPM families train with the DDPM forward process of the pipeline's schedule, whatever sampler it
        ships with (the betas and prediction_type carry over); flow families with their own scheduler."""
        from diffusers import DDPMScheduler

        return load("scheduler", weights=False, cls=None if self.flow else DDPMScheduler)

    def noise_process(self, scheduler, cfg: NoiseConfig):
        if not self.flow:
            if cfg.timestep_sampling != "uniform" or cfg.shift is not None:
                raise ConfigError(f"config keys 'noise.timestep_sampling' / 'noise.shift': {self.name} is a DDPM "
                                  f"model (uniform integer timesteps); expected uniform and null, got "
                                  f"{cfg.timestep_sampling!r} / {cfg.shift!r}")
            return DDPMNoise(scheduler, cfg.reduction)
        shift = cfg.shift
        if shift is None:
            dynamic = scheduler.config.get("use_dynamic_shifting", False)
            shift = 1.0 if dynamic else float(scheduler.config.get("shift", 1.0))
        return FlowNoise(cfg, shift, scheduler.config.num_train_timesteps)

    # ------------------------------------------------------------------------------------- conditioning
    @abstractmethod
    def encode_text(self, comps, captions: list[str]) -> dict[str, Tensor]:
        """Per-caption conditioning tensors [B, ...] (what the denoiser's forward reads)."""

    def encode_empty_prompt(self, comps) -> dict[str, Tensor]:
        """The unconditional side of classifier-free guidance, [1, ...]: the empty caption encoded, as the
        pipeline encodes its default negative prompt."""
        return self.encode_text(comps, [""])

    def image_conditioning(self, batch: dict[str, Any], size: tuple[int, int]) -> dict[str, Tensor]:
        """Per-image conditioning [B, 2, ...] from a data batch (SDXL's micro-conditioning); none here."""
        return {}

    @abstractmethod
    def forward(self, denoiser, noisy: Tensor, timestep: Tensor, text: dict[str, Tensor],
                image: dict[str, Tensor]) -> Tensor:
        """The denoiser's prediction [N, C, h, w] for noisy latents [N, C, h, w] at model timesteps [N]."""

    def call_options(self, pipe) -> dict[str, Any]:
        """Keyword arguments the family's pipeline ``__call__`` needs so sampling conditions the denoiser as
        training does (beyond prompt, seed, steps, guidance and size); none here."""
        return {}

    # ----------------------------------------------------------------------------------- saving, loading
    def save_lora(self, denoiser, folder) -> None:
        """``folder/pytorch_lora_weights.safetensors`` for the pipeline class's ``load_lora_weights``."""
        import diffusers

        from diffusion_dpo.models import lora_state_dict

        pipeline = getattr(diffusers, self.pipeline_class)
        pipeline.save_lora_weights(str(folder), **{f"{self.denoiser_name}_lora_layers": lora_state_dict(denoiser)})

    def save_final(self, denoiser, folder, is_lora: bool) -> None:
        if is_lora:
            self.save_lora(denoiser, folder)
        else:
            denoiser.save_pretrained(str(folder))

    def load_denoiser(self, folder: str, **kwargs):
        """A tuned denoiser from a final/ folder of a full fine-tune."""
        import diffusers

        return getattr(diffusers, self.denoiser_class).from_pretrained(folder, **kwargs)

    def load_pipeline(self, pretrained: str, *, denoiser: str | None = None, lora: str | None = None,
                      **kwargs):
        """The diffusers pipeline of ``pretrained``, with a tuned denoiser folder or LoRA weights if given."""
        import diffusers

        if denoiser:
            kwargs[self.denoiser_name] = self.load_denoiser(denoiser, torch_dtype=kwargs.get("torch_dtype"))
        pipe = getattr(diffusers, self.pipeline_class).from_pretrained(pretrained, **kwargs)
        if lora:
            pipe.load_lora_weights(lora)
        return pipe


def tokenize(tokenizer, captions: list[str], max_length: int, device) -> Tensor:
    """Token ids [B, max_length], padded to max_length and truncated, as the pipelines tokenize."""
    return tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)

