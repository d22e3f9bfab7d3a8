"""The model-family interface.

A :class:`Family` knows one kind of pipeline: its components and how they load, how captions become the
denoiser's conditioning, what per-image conditioning it takes, which noise process trains it, how its
denoiser is called, which modules LoRA adapts, and how final/ is written and loaded back. Everything else
(the data, the shared noise per pair, the errors, the loss) is the same for every family.

The noise processes the families share live in :mod:`diffusion_dpo.noise`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from diffusion_dpo.config import ConfigError
from diffusion_dpo.errors import InputError
from diffusion_dpo.noise import DDPMNoise, FlowNoise, NoiseConfig, reduce_error, shifted_sigma

# The attention projections, the modules LoRA adapts unless a family or model.lora_targets says otherwise.
DEFAULT_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]

__all__ = ["DDPMNoise", "DEFAULT_LORA_TARGETS", "Family", "FlowNoise", "NoiseConfig", "reduce_error", "shifted_sigma",
           "lora_state_dict", "tokenize"]

Tensor = torch.Tensor


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
    # Diffusion-DPO's beta when a command leaves it to the family: the paper's 5000 for DDPM families (its
    # SD1.5 and SDXL runs); flow families set 100 (flow_grpo's DPO script on SD3.5, and docs/train.md's "beta").
    dpo_beta = 5000.0
    # How the pipeline applies its guidance_scale: classifier-free, u + w (c - u), against the empty prompt
    # (False), or as a value the denoiser embeds, with no unconditional pass (True: FLUX.1).
    guidance_embedded = False
    online_guidance_scale = 4.5  # grpo's sampling.guidance_scale when null (Flow-GRPO's SD3.5 setting)
    # The guidance_scale at which the pipeline skips the unconditional pass: 1 for u + w (c - u), 0 for a
    # pipeline whose guidance is c + w (c - u) (Z-Image).
    unguided_scale = 1.0
    # The image side in px the pipeline generates without height/width when it fixes one rather than
    # deriving it from its denoiser's sample_size (None: derived).
    # whether preference pairs may be videos ([3, F, H, W] pixels encoded to [C, F', h, w] latents; Wan)
    trains_videos = False
    native_resolution: int | None = None

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
    def choose_expert(self, expert: str | None, index: dict[str, Any], pretrained: str) -> None:
        """Take model.expert, the denoiser that trains in a two-expert pipeline (model_index.json ``index``);
        a family with one denoiser takes only null."""
        if expert is not None:
            raise InputError(f"config key 'model.expert': {pretrained!r} is a {self.name} pipeline with one "
                             f"denoiser; expected null, got {expert!r}")

    def load(self, pretrained: str, load: Callable[..., Any], vae: str | None = None) -> dict[str, Any]:
        """Load the components with ``load(name, weights=bool)`` (the shared loader: the class named in
        model_index.json, from the pipeline's subfolder); the text encoders and VAE frozen in eval mode.
        Returns the keyword arguments of ``models.Components``."""
        from diffusers import AutoencoderKL

        tokenizers = [load(tok, weights=False) for tok, _ in self.text_components]
        encoders = [load(enc, weights=True) for _, enc in self.text_components]
        denoiser = load(self.denoiser_name, weights=True)
        image_vae = AutoencoderKL.from_pretrained(vae) if vae else load("vae", weights=True)
        for module in [image_vae, *encoders]:
            module.requires_grad_(False).eval()
        return {"denoiser": denoiser, "vae": image_vae, "text_encoders": encoders, "tokenizers": tokenizers,
                "noise_scheduler": self.training_scheduler(pretrained, load), "family": self}

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

    def pipeline_images(self, pipe, num_frames: int = 1, **kwargs) -> list:
        """The PIL images of one pipeline call ``pipe(**kwargs)`` (``output_type="pil"``), one per prompt (a
        video family's: videos, lists of PIL frames, at ``num_frames`` > 1; an image family takes only 1)."""
        if num_frames != 1:
            raise ConfigError(f"config key 'sampling.num_frames': {self.name} generates images; expected 1, "
                              f"got {num_frames}")
        return list(pipe(**kwargs).images)

    def guidance_options(self, guidance_scale: float, batch_size: int) -> dict[str, Any]:
        """The keyword arguments that give the pipeline ``__call__`` our guidance scale for a batch of
        ``batch_size`` prompts: its ``guidance_scale`` here (classifier-free or embedded, as ``guide`` and
        ``guidance_embedded`` say)."""
        return {"guidance_scale": guidance_scale}

    def sampling_mu(self, scheduler_config, latent_hw: tuple[int, int], num_inference_steps: int):
        """The ``mu`` a dynamically shifting scheduler's ``set_timesteps`` takes for latents [C, h, w]
        (``latent_hw`` = (h, w)): FluxPipeline's ``calculate_shift`` of the packed length h/2 * w/2; None
        when the scheduler does not shift dynamically."""
        if not scheduler_config.get("use_dynamic_shifting", False):
            return None
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = scheduler_config
        return calculate_shift(latent_hw[0] * latent_hw[1] // 4, c.base_image_seq_len, c.max_image_seq_len,
                               c.base_shift, c.max_shift)

    def latent_shape(self, vae_config, side: int, num_frames: int = 1) -> tuple[int, ...]:
        """(C, h, w): the denoiser's latent of a ``side`` px square image (the VAE's channels, side / f; a
        video VAE's as ``vae_layout`` reads its config). A video family (Wan) gives (C, F', h, w) for a
        ``num_frames``-frame video; an image family takes only num_frames 1."""
        from diffusion_dpo.vae_layout import latent_channels, spatial_factor

        if num_frames != 1:
            raise ConfigError(f"config key 'sampling.num_frames': {self.name} generates images; expected 1, "
                              f"got {num_frames}")
        h = side // spatial_factor(vae_config)
        return (latent_channels(vae_config), h, h)

    def default_resolution(self, vae_config) -> int:
        """The image side in px online tuning samples when ``sampling.resolution`` is null: the VAE's
        sample_size."""
        return vae_config.sample_size

    def prepare_vae(self, vae) -> None:
        """Make the VAE's config carry what maps its samples into the denoiser's latent space (FLUX.2's
        batch-norm statistics); nothing here, where scaling_factor and shift_factor already do."""

    def sampling_sigmas(self, num_inference_steps: int):
        """The sigmas the family's pipeline hands its flow-matching scheduler's ``set_timesteps`` (before the
        scheduler's shift), or None when the pipeline lets the scheduler space them (SD3)."""
        return None

    def guide(self, uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
        """The guided prediction [N, C, h, w] from the unconditional and conditional ones, as the pipeline
        combines them: classifier-free guidance u + w (c - u) (Ho & Salimans 2022, eq. 6)."""
        return uncond + scale * (cond - uncond)

    # ----------------------------------------------------------------------------------- saving, loading
    def save_lora(self, denoiser, folder) -> None:
        """``folder/pytorch_lora_weights.safetensors`` for the pipeline class's ``load_lora_weights``."""
        import diffusers

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

    def frozen_modules(self) -> list:
        """Frozen modules the family holds beyond the VAE and text encoders (none here), which
        ``models.freeze_to`` moves to the device in the compute dtype."""
        return []

    def tuned_component(self, tuned: str) -> str:
        """The pipeline component a tuned denoiser folder or LoRA weights ``tuned`` (a final/) replaces or
        adapts: the family's denoiser."""
        return self.denoiser_name

    def load_lora(self, pipe, lora: str, fuse: bool = False) -> None:
        """Load LoRA weights into the pipeline's tuned component (``pipe.load_lora_weights``), fused if asked."""
        pipe.load_lora_weights(lora)
        if fuse:
            pipe.fuse_lora()

    def load_pipeline(self, pretrained: str, *, denoiser: str | None = None, lora: str | None = None,
                      **kwargs):
        """The diffusers pipeline of ``pretrained``, with a tuned denoiser folder or LoRA weights if given."""
        import diffusers

        if denoiser:
            kwargs[self.tuned_component(denoiser)] = self.load_denoiser(denoiser,
                                                                        torch_dtype=kwargs.get("torch_dtype"))
        pipe = getattr(diffusers, self.pipeline_class).from_pretrained(pretrained, **kwargs)
        if lora:
            self.load_lora(pipe, lora)
        return pipe


def tokenize(tokenizer, captions: list[str], max_length: int, device) -> Tensor:
    """Token ids [B, max_length], padded to max_length and truncated, as the pipelines tokenize."""
    return tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)



def save_peft_layout_lora(pipeline_class: str, denoiser, folder) -> None:
    """``folder/pytorch_lora_weights.safetensors`` in peft's own key layout (lora_A / lora_B) for the
    pipeline class's ``load_lora_weights``: the loaders of the newer transformer pipelines (FLUX.2,
    Qwen-Image) read it whole, while the older diffusers layout of :func:`lora_state_dict` renames only some
    projections and a mixed file loads without the renamed ones."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    getattr(diffusers, pipeline_class).save_lora_weights(str(folder),
                                                         transformer_lora_layers=get_peft_model_state_dict(denoiser))


def lora_state_dict(denoiser) -> dict[str, Tensor]:
    """The adapter weights in the key layout ``pipe.load_lora_weights`` reads."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
