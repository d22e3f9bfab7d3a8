"""Model families behind one interface, detected from a pipeline's ``model_index.json``.

    family = detect("stabilityai/stable-diffusion-3.5-medium")   # an SD3Family
    comps = models.load_components(pretrained)                    # comps.family is the detected family

A new family is one new module with a :class:`~diffusion_dpo.families.base.Family` subclass, listed in
``FAMILIES`` (the first whose ``matches(index)`` is true wins).
"""

from __future__ import annotations

from typing import Any

from diffusion_dpo.errors import InputError
from diffusion_dpo.families.base import DDPMNoise, Family, FlowNoise, NoiseConfig
from diffusion_dpo.families.flux import FluxFamily
from diffusion_dpo.families.sd import SDFamily, SDXLFamily
from diffusion_dpo.families.sd3 import SD3Family

__all__ = ["FAMILIES", "DDPMNoise", "Family", "FlowNoise", "NoiseConfig", "detect", "detect_index", "by_name"]

FAMILIES: tuple[type[Family], ...] = (SD3Family, FluxFamily, SDXLFamily, SDFamily)


def detect_index(index: dict[str, Any], pretrained: str = "") -> Family:
    """The family of a pipeline from its model_index.json (``_class_name`` and components)."""
    for family in FAMILIES:
        if family.matches(index):
            return family()
    raise InputError(f"model.pretrained {pretrained!r}: pipeline {index.get('_class_name')!r} is not a supported "
                     f"family (expected one of {', '.join(f.pipeline_class for f in FAMILIES)}, or a UNet pipeline)")


def detect(pretrained: str, revision: str | None = None) -> Family:
    from diffusion_dpo.models import pipeline_index

    return detect_index(pipeline_index(pretrained, revision), pretrained)


def by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family()
    raise InputError(f"unknown model family {name!r}: expected one of {[f.name for f in FAMILIES]}")
