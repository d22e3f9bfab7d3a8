"""Model families behind one interface, detected from a pipeline's ``model_index.json``.

    family = detect("stabilityai/stable-diffusion-3.5-medium")   # an SD3Family
    comps = models.load_components(pretrained)                    # comps.family is the detected family

A new family is one new module with a :class:`~diffusion_dpo.families.base.Family` subclass, listed in
``FAMILIES`` (the first whose ``matches(index)`` is true wins).
"""

from __future__ import annotations

from typing import Any

from diffusion_dpo.errors import InputError
from diffusion_dpo.families.base import DEFAULT_LORA_TARGETS, DDPMNoise, Family, FlowNoise, NoiseConfig
from diffusion_dpo.families.flux import FluxFamily
from diffusion_dpo.families.flux2 import Flux2Family, Flux2KleinDistilledFamily, Flux2KleinFamily
from diffusion_dpo.families.qwen_image import QwenImageFamily
from diffusion_dpo.families.sd import SDFamily, SDXLFamily
from diffusion_dpo.families.sd3 import SD3Family
from diffusion_dpo.families.wan import WanFamily
from diffusion_dpo.families.z_image import ZImageFamily
from scorers.hub import from_hub, looks_local

__all__ = ["FAMILIES", "DEFAULT_LORA_TARGETS", "DDPMNoise", "Family", "FlowNoise", "NoiseConfig", "detect", "detect_index", "by_name", "pipeline_index"]

FAMILIES: tuple[type[Family], ...] = (SD3Family, FluxFamily, SDXLFamily, SDFamily, ZImageFamily,
                                      Flux2Family, Flux2KleinFamily, Flux2KleinDistilledFamily, QwenImageFamily,
                                      WanFamily)


def detect_index(index: dict[str, Any], pretrained: str = "") -> Family:
    """The family of a pipeline from its model_index.json (``_class_name`` and components)."""
    for family in FAMILIES:
        if family.matches(index):
            return family()
    raise InputError(f"model.pretrained {pretrained!r}: pipeline {index.get('_class_name')!r} is not a supported "
                     f"family (expected one of {', '.join(f.pipeline_class for f in FAMILIES)}, or a UNet pipeline)")


def pipeline_index(pretrained: str, revision: str | None = None) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (component name -> [library, class]), from a folder or the hub.

    A hub id that is neither cached nor fetchable (offline, hub unreachable, no such repo) is an error saying
    so; the components are then fetched by their own loaders.
    """
    from diffusers import DiffusionPipeline

    if not looks_local(pretrained):
        return dict(from_hub(lambda local_only: DiffusionPipeline.load_config(
            pretrained, revision=revision, local_files_only=local_only), "diffusers pipeline",
            f"hub id {pretrained!r}", "model.pretrained"))
    try:
        return dict(DiffusionPipeline.load_config(pretrained, revision=revision))
    except (OSError, ValueError) as e:
        raise InputError(
            f"model.pretrained {pretrained!r}: not a diffusers pipeline (a hub id such as "
            f"stable-diffusion-v1-5/stable-diffusion-v1-5, or a local folder with model_index.json): {e}"
        ) from None


def detect(pretrained: str, revision: str | None = None) -> Family:
    return detect_index(pipeline_index(pretrained, revision), pretrained)


def by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family()
    raise InputError(f"unknown model family {name!r}: expected one of {[f.name for f in FAMILIES]}")
