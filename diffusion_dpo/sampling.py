"""Loading a pipeline (base checkpoint plus optional tuned weights) and generating with one seed per image.

Every image gets its own ``torch.Generator`` seeded from its recorded seed, so an image depends only on
(checkpoint, prompt, seed, sampler settings), never on which batch it landed in: any image can be
regenerated from its row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from diffusion_dpo.errors import InputError
from scorers.hub import from_hub, looks_local


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 on GPU (the speed and memory everyone uses there), fp32 on CPU where bf16 convs are slow.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def precision_dtype(mixed_precision: str, device: torch.device | str) -> torch.dtype:
    """The weights dtype a ``mixed_precision`` config value names (auto: :func:`default_dtype`)."""
    from diffusion_dpo.engine import DTYPES

    return default_dtype(torch.device(device)) if mixed_precision == "auto" else DTYPES[mixed_precision]


def load_pipeline(pretrained: str, *, denoiser: str | None = None, lora: str | None = None,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  scheduler: str | None = None, option: str = "model.pretrained"):
    """A diffusers text-to-image pipeline for ``pretrained`` (hub id or local folder) of any family.

    ``denoiser``: a folder of the family's denoiser (a UNet for SD1.x/2.x/SDXL, a transformer for SD3 and
    FLUX), such as a full fine-tune's ``final/``, replacing the base's. ``lora``: LoRA weights (a folder or
    .safetensors file from ``pipe.save_lora_weights``, such as a LoRA run's ``final/``), fused into the
    denoiser. ``scheduler``: a diffusers scheduler class name (``sampling.scheduler``) replacing the
    checkpoint's own, built from its config. ``option``: the config key ``pretrained`` came from, named in the
    error when it cannot load.
    """
    from diffusers import DiffusionPipeline

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if scheduler:
        scheduler_class(scheduler)  # a bad name fails before the weights load
    if looks_local(pretrained):
        try:
            pipe = DiffusionPipeline.from_pretrained(pretrained, dtype=dtype)
        except OSError as e:
            raise InputError(f"cannot load pipeline {pretrained!r} (option {option}=, a local diffusers "
                             f"folder): {e}") from None
    else:
        pipe = from_hub(lambda local_only: DiffusionPipeline.from_pretrained(
            pretrained, dtype=dtype, local_files_only=local_only), "diffusers pipeline",
            f"hub id {pretrained!r}", option)
    family = pipeline_family(pipe)
    if denoiser:
        name = family.tuned_component(denoiser)
        try:
            tuned = family.load_denoiser(denoiser, dtype=dtype)
        except OSError as e:
            # A whole pipeline repo (the paper's mhdang/dpo-sd1.5-text2image-v1 is one) keeps it in a subfolder.
            try:
                tuned = family.load_denoiser(denoiser, subfolder=name, dtype=dtype)
            except OSError:
                raise InputError(f"cannot load tuned {family.denoiser_class} from {denoiser!r} (nor its {name}/ "
                                 f"subfolder): {e}") from None
        _check_same_shapes(getattr(pipe, name), tuned, denoiser)
        setattr(pipe, name, tuned)
    if lora:
        if not Path(lora).exists() and not _looks_like_hub_id(lora):
            raise InputError(f"LoRA weights {lora!r} do not exist")
        try:
            family.load_lora(pipe, lora, fuse=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise InputError(f"LoRA weights {lora!r} do not fit the base {pretrained!r}: {e}") from None
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def set_scheduler(pipe, name: str | None) -> None:
    """Replace ``pipe``'s scheduler by the diffusers class ``name`` built from its config (None: keep it)."""
    if name:
        pipe.scheduler = scheduler_class(name).from_config(pipe.scheduler.config)


def scheduler_class(name: str):
    """The diffusers scheduler class called ``name``, or an InputError naming ``sampling.scheduler``."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise InputError(f"config key 'sampling.scheduler': {name!r} is not a diffusers scheduler class "
                         "(e.g. DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler)")
    return cls


def pipeline_family(pipe):
    """The :class:`~diffusion_dpo.families.base.Family` of a loaded pipeline (from its model_index)."""
    from diffusion_dpo.families import detect_index

    name = type(pipe).__name__
    return detect_index({**dict(pipe.config), "_class_name": name}, name)


def native_size(pipe) -> int:
    """The image side in px a pipeline generates when no height/width is given (its own default)."""
    fixed = pipeline_family(pipe).native_resolution
    if fixed:
        return fixed
    latent = getattr(pipe, "default_sample_size", None) or denoiser_of(pipe).config.sample_size
    return int(latent * pipe.vae_scale_factor)


def denoiser_of(pipe):
    """The pipeline's denoiser module: its UNet or its transformer."""
    return getattr(pipe, pipeline_family(pipe).denoiser_name)


def _looks_like_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/"))


def _check_same_shapes(base, tuned, where: str) -> None:
    base_shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    for k, v in tuned.state_dict().items():
        if base_shapes.get(k) != tuple(v.shape):
            raise InputError(
                f"tuned denoiser {where} does not fit the base: parameter {k} has shape {tuple(v.shape)}, "
                f"the base has {base_shapes.get(k, 'no such parameter')}"
            )
    if set(base_shapes) != set(tuned.state_dict()):
        missing = sorted(set(base_shapes) - set(tuned.state_dict()))[:3]
        raise InputError(f"tuned denoiser {where} does not fit the base: parameters missing, e.g. {missing}")


def batched(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.inference_mode()
def generate(pipe, prompts: list[str], seeds: list[int], *, num_inference_steps: int = 30,
             guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
             batch_size: int = 8, progress=None, num_frames: int = 1) -> list:
    """One PIL image per (prompt, seed), generated ``batch_size`` at a time.

    ``progress``: an optional tqdm bar, advanced by the number of images of each batch. ``guidance_scale``
    is classifier-free guidance for SD1.x/2.x, SDXL and SD3, FLUX.1-dev's embedded guidance value
    (FluxPipeline's guidance_scale; [schnell] ignores it), and Qwen-Image's true_cfg_scale against its
    negative prompt (``Family.guidance_options``). ``height``/``width`` None: the pipeline's default. A video
    family's pipeline (Wan) generates one-frame videos, its images (``Family.pipeline_images``), or at
    ``num_frames`` > 1 videos, each a list of PIL frames.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    images = []
    family = pipeline_family(pipe)
    options = family.call_options(pipe)
    # Generators on CPU: the same seed gives the same starting noise on any device.
    for idx in batched(list(range(len(prompts))), batch_size):
        generators = [torch.Generator("cpu").manual_seed(int(seeds[i])) for i in idx]
        images.extend(family.pipeline_images(
            pipe, num_frames, prompt=[prompts[i] for i in idx], generator=generators, num_inference_steps=num_inference_steps,
            height=height, width=width, output_type="pil", **family.guidance_options(guidance_scale, len(idx)),
            **options,
        ))
        if progress is not None:
            progress.update(len(idx))
    return images
