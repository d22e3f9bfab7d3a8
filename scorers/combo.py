"""A weighted sum of other scorers:

    combo(x, prompt) = sum_i w_i * s_i(x, prompt)

    load_scorer("combo", parts={"pickscore": 1.0, "hpsv2.1": 0.5},
                options={"pickscore": {"model": "ckpt/pickscore"}}, device="cuda")

The parts' raw scores are summed as they are, not z-normalised: a normalisation would make a score
depend on the other images in the batch (and on the batch size), and the weights already say how much
each scale counts. Mind the scales: PickScore sits around 20, HPS around 0.27 (raw cosine), CLIP score
around 30, the aesthetic predictor around 5, JPEG sizes in tens of kB.

``device``, ``dtype`` and ``batch_size`` given to the combo go to every part; ``options[name]`` adds or
overrides options for one part.
"""

from __future__ import annotations

import math

import torch

from scorers.base import Scorer, check_images, check_prompts
from scorers.errors import InputError

_SHARED = ("device", "dtype", "batch_size")


class Combo(Scorer):
    """Options: ``parts`` (registry name -> weight), ``options`` (registry name -> that part's options),
    and ``device``, ``dtype``, ``batch_size`` shared by every part."""

    name = "combo"

    def __init__(self, *, parts: dict[str, float] | None = None, options: dict[str, dict] | None = None,
                 **shared):
        from scorers import load_scorer

        unknown = sorted(set(shared) - set(_SHARED))
        if unknown:
            raise InputError(f"combo: unknown option(s) {', '.join(unknown)}; options of one part go in "
                             "options={name: {...}}, shared ones are device, dtype, batch_size")
        super().__init__(**shared)
        if not isinstance(parts, dict) or not parts:
            raise InputError("combo needs parts={name: weight, ...} naming at least one scorer, e.g. "
                             "{'pickscore': 1.0, 'hpsv2.1': 0.5}")
        options = options or {}
        if not isinstance(options, dict):
            raise InputError(f"combo options must map a part's name to its options; got {type(options).__name__}")
        stray = sorted(set(options) - set(parts))
        if stray:
            raise InputError(f"combo options given for {', '.join(stray)}, which is not among parts "
                             f"({', '.join(parts)})")
        self.parts: list[tuple[str, float, Scorer]] = []
        for part, weight in parts.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise InputError(f"combo weight of {part} is {weight!r}; expected a finite number")
            if not isinstance(options.get(part, {}), dict):
                raise InputError(f"combo options for {part} must be a mapping of option names to values")
            kwargs = dict(shared) | options.get(part, {})
            self.parts.append((part, float(weight), load_scorer(part, **kwargs)))
        self.needs_prompts = any(scorer.needs_prompts for _, _, scorer in self.parts)

    def score(self, images, prompts=None, *, progress: bool = False) -> torch.Tensor:
        """sum_i w_i * s_i: float32 [N] on the CPU (each part checks and batches the input itself)."""
        total = None
        for _, weight, part_score in self._each(images, prompts, progress):
            total = weight * part_score if total is None else total + weight * part_score
        return total.float()

    def score_parts(self, images, prompts=None, *, progress: bool = False) -> dict[str, torch.Tensor]:
        """Each part's unweighted scores, by registry name."""
        return {name: part_score.float() for name, _, part_score in self._each(images, prompts, progress)}

    def _each(self, images, prompts, progress):
        # Check once up front, so a bad input fails before any part has spent time on it.
        batch = check_images(images)
        check_prompts(prompts, len(batch), self.needs_prompts, self.name)
        for name, weight, scorer in self.parts:
            yield name, weight, scorer.score(images, prompts, progress=progress).double()

    def __repr__(self) -> str:
        return "Combo(" + ", ".join(f"{w:g} * {name}" for name, w, _ in self.parts) + ")"
