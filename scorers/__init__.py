"""Image preference scorers behind one interface.

    scorer = load_scorer("pickscore", device="cuda", dtype="bfloat16", batch_size=64)
    scores = scorer.score(images, prompts)   # float32 tensor [N] on CPU, one value per image

``images``: a list of PIL images (any size or mode) or a float tensor [N, 3, H, W] in [0, 1].
``prompts``: one string per image, or a single string for all. Heavy imports happen inside the loaders,
so importing this package is cheap.
"""

from __future__ import annotations

import importlib

from scorers.errors import InputError

# name -> "module:factory"; the factory takes the options as keyword arguments.
REGISTRY: dict[str, str] = {
    "pickscore": "scorers.pickscore:PickScore",
    "hpsv2": "scorers.hps:HPSv2",
    "hpsv2.1": "scorers.hps:HPSv21",
    "clip": "scorers.clip_score:CLIPScore",
    "aesthetic": "scorers.aesthetic:AestheticScore",
    "jpeg_compressibility": "scorers.jpeg:JpegCompressibility",
    "jpeg_incompressibility": "scorers.jpeg:JpegIncompressibility",
    "brightness": "scorers.brightness:Brightness",
    "combo": "scorers.combo:Combo",
    "shapes": "scorers.shapes:ShapesScorer",
    # the moving-shapes world's clips: look (as shapes, per frame) and motion (scorers.shapes.motion)
    "shapes_video": "scorers.shapes.motion:ShapesVideoScorer",
    "imagereward": "scorers.imagereward:ImageReward",
    "ocr": "scorers.ocr:OCRScore",
    "vlm_judge": "scorers.vlm_judge:VLMJudge",
    "hpsv3": "scorers.hpsv3:HPSv3",
    # a scorer served over HTTP by `diffusion-dpo serve` (scorers.server)
    "remote": "scorers.remote:RemoteScorer",
    "geneval": "scorers.geneval:GenEval",
    "shapes_geneval": "scorers.shapes.geneval:ShapesGenEval",
}


def available() -> list[str]:
    return sorted(REGISTRY)


def load_scorer(name: str, **options):
    """Build the scorer registered under ``name`` with ``options`` (device, dtype, batch_size, weights...)."""
    if name not in REGISTRY:
        raise InputError(f"unknown scorer {name!r}; available: {', '.join(available())}")
    module_name, factory = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), factory)(**options)
