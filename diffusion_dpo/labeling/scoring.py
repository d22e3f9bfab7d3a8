"""The scorer section of the commands that score images (label, score, grpo) and loading the scorer it names.

``ScorerConfig`` is the ``scorer.*`` keys; :func:`load_scorer` builds the scorer with this process's device
unless the options name one; :func:`scorer_identity` is what of the section decides the scores (the part a
resumed run must share with the run it continues).
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from diffusion_dpo.config import option
from diffusion_dpo.errors import InputError

# Options that change how fast a scorer runs, not what it returns: they may differ between a run and its
# resumption (another GPU, another batch size) without changing the dataset.
PERFORMANCE_ONLY_SCORER_OPTIONS = ("device", "batch_size")
# How a remote scorer reaches its server, not what the server computes.
REMOTE_CONNECTION_OPTIONS = ("url", "token", "timeout", "retries", "backoff")

@dataclass
class ScorerConfig:
    name: str = option("pickscore", "scorer from the registry (pickscore, hpsv2, hpsv2.1, clip, aesthetic, "
                       "jpeg_compressibility, combo, ...); a higher score means preferred")
    options: dict[str, Any] = option({}, "keyword options handed to scorers.load_scorer (weights path, "
                                     "dtype, batch_size, device, combo weights...); device defaults to "
                                     "the command's (label: this process's device; score: device)")
    url: Optional[str] = option(None, "with name=remote: the scoring server's address (http://host:port, "
                                "started with diffusion-dpo serve); null: not a remote scorer")
    token: Optional[str] = option(None, "with name=remote: the server's bearer token; null: the "
                                  "DIFFUSION_DPO_SCORER_TOKEN environment variable (which keeps it out of the "
                                  "run's config.yaml), else none")

    # Where the server is and how to reach it do not change the scores: a resumed run may name another.
    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset({"url", "token"})

    def check(self) -> None:
        if self.name != "remote" and (self.url is not None or self.token is not None):
            raise InputError(f"config keys 'scorer.url' and 'scorer.token' are for scorer.name=remote; "
                             f"scorer.name is {self.name!r}")

    def load_options(self) -> dict[str, Any]:
        """``options`` with ``url`` and ``token`` added (the remote scorer's keyword arguments)."""
        out = dict(self.options)
        for key in ("url", "token"):
            if getattr(self, key) is not None:
                if key in out:
                    raise InputError(f"config keys 'scorer.{key}' and 'scorer.options.{key}' both given; "
                                     "give one")
                out[key] = getattr(self, key)
        return out

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

    options = scorer_options(section.name, section.load_options(), device)
    try:
        return scorers.load_scorer(section.name, **options)
    except InputError as e:
        raise InputError(command_line_keys(str(e), section.name)) from None
    except (OSError, TypeError) as e:  # missing weights, an option the scorer does not take
        raise InputError(f"cannot load scorer {section.name!r} with options {shown(options)}: {e}") from None


def shown(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` as an error message may print them: a remote scorer's token masked."""
    return {k: "***" if k == "token" and v else v for k, v in options.items()}


def command_line_keys(message: str, name: str) -> str:
    """A scorer's error ``message`` with the options it names (``option processor=``, ``with model=PATH``)
    written as the command's keys (``scorer.options.processor=``): the scorers library cannot know them.
    A combo's parts take their options under ``scorer.options.options.<part>``, so its message stays."""
    if name == "combo":
        return message
    return re.sub(r"\b(option |with )(\w+)=", r"\1scorer.options.\2=", message)


def scorer_identity(section: ScorerConfig) -> dict[str, Any]:
    """The name and the options that change the scores (not device or batch size, nor a remote scorer's
    address, token, timeout and retries: the server may move between a run and its resumption)."""
    opts = {k: v for k, v in section.options.items() if k not in PERFORMANCE_ONLY_SCORER_OPTIONS
            and not (section.name == "remote" and k in REMOTE_CONNECTION_OPTIONS)}
    return {"name": section.name, "options": opts}
