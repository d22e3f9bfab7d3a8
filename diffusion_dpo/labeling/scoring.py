"""The scorer section of the commands that score images (label, score) and loading the scorer it names.

``ScorerConfig`` is the ``scorer.*`` keys; :func:`load_scorer` builds the scorer with this process's device
unless the options name one; :func:`scorer_identity` is what of the section decides the scores (the part a
resumed run must share with the run it continues).
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any

from diffusion_dpo.config import option
from diffusion_dpo.errors import InputError

# Options that change how fast a scorer runs, not what it returns: they may differ between a run and its
# resumption (another GPU, another batch size) without changing the dataset.
PERFORMANCE_ONLY_SCORER_OPTIONS = ("device", "batch_size")

@dataclass
class ScorerConfig:
    name: str = option("pickscore", "scorer from the registry (pickscore, hpsv2, hpsv2.1, clip, aesthetic, "
                       "jpeg_compressibility, combo, ...); a higher score means preferred")
    options: dict[str, Any] = option({}, "keyword options handed to scorers.load_scorer (weights path, "
                                     "dtype, batch_size, device, combo weights...); device defaults to "
                                     "the command's (label: this process's device; score: device)")

def scorer_options(name: str, options: dict[str, Any], device) -> dict[str, Any]:
    """``options``, plus ``device`` (this process's device) when the scorer takes one and none was given (so
    each process of a multi-GPU run scores on its own GPU); ``device=None`` leaves the scorer's default."""
    import scorers

    out = dict(options)
    if device is not None and "device" not in out and name in scorers.REGISTRY:
        module, factory = scorers.REGISTRY[name].split(":")
        params = inspect.signature(getattr(importlib.import_module(module), factory)).parameters.values()
        if any(p.name == "device" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            out["device"] = str(device)
    return out

def load_scorer(section: ScorerConfig, device):
    """The scorer ``section`` names, on ``device`` unless its options give one; a missing weights file, an
    unknown name or an option the scorer does not take is an InputError."""
    import scorers

    options = scorer_options(section.name, section.options, device)
    try:
        return scorers.load_scorer(section.name, **options)
    except InputError as e:
        raise InputError(command_line_keys(str(e), section.name)) from None
    except (OSError, TypeError) as e:  # missing weights, an option the scorer does not take
        raise InputError(f"cannot load scorer {section.name!r} with options {options}: {e}") from None


def command_line_keys(message: str, name: str) -> str:
    """A scorer's error ``message`` with the options it names (``option processor=``, ``with model=PATH``)
    written as the command's keys (``scorer.options.processor=``): the scorers library cannot know them.
    A combo's parts take their options under ``scorer.options.options.<part>``, so its message stays."""
    if name == "combo":
        return message
    return re.sub(r"\b(option |with )(\w+)=", r"\1scorer.options.\2=", message)


def scorer_identity(section: ScorerConfig) -> dict[str, Any]:
    """The name and the options that change the scores (not device or batch size)."""
    opts = {k: v for k, v in section.options.items() if k not in PERFORMANCE_ONLY_SCORER_OPTIONS}
    return {"name": section.name, "options": opts}
