"""GenEval (Ghosh et al. 2023): is an image correct for its prompt's objects, counts, colours and positions?

Each GenEval prompt carries metadata (``prompts/evaluation_metadata.jsonl`` of github.com/djghosh13/geneval, shipped in
``diffusion_dpo/assets/prompts/geneval/``): a ``tag`` (one of :data:`TASKS`), ``include`` clauses (``class``,
``count``, optionally ``color`` and ``position`` = [relation, index of an earlier include clause]) and
``exclude`` clauses (``class``, ``count``: at least that many is wrong). The rules, as the official
``evaluation/evaluate_images.py`` applies them to a detector's output:

- keep the detections of a class scoring above :data:`THRESHOLD` (0.3; :data:`COUNTING_THRESHOLD` 0.9 for
  the ``counting`` task), the :data:`MAX_OBJECTS` (16) best, most confident first, less those overlapping a kept
  one by IoU >= ``max_overlap`` (1.0 by default: none removed);
- an include clause needs ``count`` kept objects of its class; with ``color``, at least ``count`` of the
  ``count`` most confident are classified that colour (CLIP zero-shot over :data:`GENEVAL_COLORS` on the
  object's crop); with ``position``, every one of them stands in that relation to every object of the
  clause it refers to (:func:`relative_position`, margin :data:`POSITION_THRESHOLD`);
- an exclude clause fails when the class has at least ``count`` kept objects;
- the image is correct when every clause holds. A benchmark's task score is the share of correct images
  of that tag, and the overall score the mean of the six task scores.

    scorer = load_scorer("geneval")                      # Mask2Former (COCO) + CLIP ViT-L/14 colours
    scorer.score(images, ["a photo of two clocks", ...])  # 1.0 correct, 0.0 not; prompts must be GenEval's

A detector is any callable ``detect(image) -> list of (label, score, box, mask)`` (box (x0, y0, x1, y1) in
pixels, mask a boolean [H, W] array or None; :class:`Detection` is such a tuple); a colour classifier any
callable ``classify(image, detections, classname) -> list of colour names``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from scorers.base import Scorer, to_pil
from scorers.errors import InputError

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
THRESHOLD = 0.3  # detection score kept for every task but counting
COUNTING_THRESHOLD = 0.9  # detection score kept for the counting task
MAX_OBJECTS = 16  # per class, most confident first
MAX_OVERLAP = 1.0  # IoU at or above which a less confident box of the same class is dropped (1: never)
POSITION_THRESHOLD = 0.1  # of the two boxes' summed sides, taken off the centre offset before the relation
METADATA_FILE = Path(__file__).resolve().parent.parent / "diffusion_dpo" / "assets" / "prompts" / "geneval" / \
    "evaluation_metadata.jsonl"


class Detection(NamedTuple):
    """One detected object: ``box`` (x0, y0, x1, y1) in pixels, ``mask`` boolean [H, W] or None."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: object = None


Detector = Callable[[object], Sequence[tuple]]
ColourClassifier = Callable[[object, list[Detection], str], list[str]]


def load_metadata(path: str | Path | None = None) -> dict[str, dict]:
    """prompt -> metadata of every line of a GenEval metadata JSONL (the shipped one by default)."""
    path = Path(path) if path else METADATA_FILE
    if not path.is_file():
        raise InputError(f"GenEval metadata file {path} (option metadata=) does not exist")
    out = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"GenEval metadata {path}, line {number}: not JSON: {e}") from None
        check_metadata(row, f"{path}, line {number}")
        out[row["prompt"].strip()] = row
    if not out:
        raise InputError(f"GenEval metadata {path} holds no prompt")
    return out


def check_metadata(row: dict, where: str) -> None:
    """Refuse a metadata row the rules cannot read, naming ``where`` it is and what was expected."""
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or row.get("tag") not in TASKS:
        raise InputError(f"GenEval metadata {where}: expected an object with a 'prompt' string and a 'tag' in "
                         f"{', '.join(TASKS)}")
    includes = row.get("include", [])
    for kind in ("include", "exclude"):
        for clause in row.get(kind, []):
            if not isinstance(clause.get("class"), str) or not isinstance(clause.get("count"), int):
                raise InputError(f"GenEval metadata {where}: every {kind} clause needs a 'class' string and a "
                                 f"'count' integer; got {clause}")
            if clause.get("color") is not None and clause["color"] not in GENEVAL_COLORS:
                raise InputError(f"GenEval metadata {where}: colour {clause['color']!r} is not one of "
                                 f"{', '.join(GENEVAL_COLORS)}")
    for k, clause in enumerate(includes):
        if "position" in clause:
            relation, target = clause["position"]
            if relation not in RELATIONS or not isinstance(target, int) or not 0 <= target < k:
                raise InputError(f"GenEval metadata {where}: position {clause['position']} must be [relation in "
                                 f"{', '.join(RELATIONS)}, index of an earlier include clause]")


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes with GenEval's inclusive pixel convention (side = x1 - x0 + 1)."""
    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      margin: float = POSITION_THRESHOLD) -> set[str]:
    """Where A is relative to B: a subset of RELATIONS (image y grows downwards).

    The centre offset A - B loses ``margin`` x (side of A + side of B) per axis (never crossing zero); of
    the remaining offset over the full offset's length, a component beyond 0.5 names the relation. Boxes
    overlapping that much give the empty set.
    """
    ca = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    cb = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    sides = (abs(box_a[2] - box_a[0]) + abs(box_b[2] - box_b[0]), abs(box_a[3] - box_a[1]) + abs(box_b[3] - box_b[1]))
    offset = (ca[0] - cb[0], ca[1] - cb[1])
    revised = [max(abs(o) - margin * s, 0.0) * ((o > 0) - (o < 0)) for o, s in zip(offset, sides)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    length = (offset[0] ** 2 + offset[1] ** 2) ** 0.5
    dx, dy = revised[0] / length, revised[1] / length
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def keep_detections(detections: Sequence[tuple], tag: str, *, threshold: float = THRESHOLD,
                    counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
                    max_overlap: float = MAX_OVERLAP) -> dict[str, list[Detection]]:
    """class -> its kept detections, most confident first (the filtering rules in the module docstring)."""
    cutoff = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[Detection]] = {}
    for d in detections:
        d = Detection(*d)
        if d.score > cutoff:
            by_class.setdefault(d.label, []).append(d)
    kept = {}
    for label, found in by_class.items():
        ordered = sorted(found, key=lambda d: -d.score)[:max_objects]
        chosen: list[Detection] = []
        while ordered:
            best = ordered.pop(0)
            chosen.append(best)
            if max_overlap < 1:
                ordered = [d for d in ordered if box_iou(best.box, d.box) < max_overlap]
        kept[label] = chosen
    return kept


def judge(image, objects: dict[str, list[Detection]], metadata: dict, classify: ColourClassifier,
          margin: float = POSITION_THRESHOLD) -> tuple[bool, list[str]]:
    """(correct, reasons it is not) of ``image`` whose kept detections are ``objects`` for ``metadata``."""
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []  # per include clause: its matched objects, None if it failed
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = objects.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and clause.get("color"):
            colours = classify(image, found, name)
            if colours.count(clause["color"]) < count:
                ok = False
                reasons.append(f"expected {clause['color']} {name}>={count}, found colours {colours}")
        if ok and "position" in clause:
            relation, target = clause["position"]
            if groups[target] is None:
                ok = False
                reasons.append(f"no target for {name} to be {relation}")
            elif not all(relation in relative_position(obj.box, other.box, margin)
                         for obj in found for other in groups[target]):
                ok = False
                reasons.append(f"expected {name} {relation} {metadata['include'][target]['class']}")
        groups.append(found if ok else None)
    for clause in metadata.get("exclude", []):
        n = len(objects.get(clause["class"], []))
        if n >= clause["count"]:
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {n}")
    return not reasons, reasons


def palette_colours(image, detections: list[Detection], classname: str) -> list[str]:
    """A pixel-only colour classifier (not GenEval's): the mean colour inside each object's mask (its box
    when it has none) -> the nearest of :data:`PALETTE`. Exact on flat-coloured drawings; for tests and
    offline checks, not for photographs."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    out = []
    for d in detections:
        x0, y0, x1, y1 = (int(round(v)) for v in d.box)
        region = pixels[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1]
        if d.mask is not None:
            region = pixels[np.asarray(d.mask, dtype=bool)]
        mean = region.reshape(-1, 3).mean(0)
        out.append(min(PALETTE, key=lambda c: float(((np.array(PALETTE[c]) - mean) ** 2).sum())))
    return out


# Typical sRGB of each GenEval colour name, for :func:`palette_colours`.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (30, 170, 50),
    "blue": (30, 60, 220), "purple": (140, 40, 180), "pink": (250, 150, 200), "brown": (130, 80, 30),
    "black": (20, 20, 20), "white": (245, 245, 245),
}


def _resolve(value, builtins: dict, option: str, device, **kwargs):
    """A detector / colour classifier given as a callable, a built-in name or ``module:attribute`` (a
    factory taking ``device`` or a ready callable)."""
    if callable(value):
        return value
    if not isinstance(value, str):
        raise InputError(f"geneval option {option}={value!r}: expected one of {', '.join(builtins)} or "
                         "'module:attribute'")
    if value in builtins:
        return builtins[value](device=device, **kwargs)
    module, sep, attribute = value.partition(":")
    if not sep:
        raise InputError(f"geneval option {option}={value!r}: expected one of {', '.join(builtins)} or "
                         "'module:attribute'")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as e:
        raise InputError(f"geneval option {option}={value!r}: cannot import it: {e}") from None
    return found(device=device) if isinstance(found, type) else found


class GenEval(Scorer):
    """Registered as ``geneval``: 1.0 when an image is correct for its GenEval prompt, else 0.0.

    Options: ``detector`` (``mask2former``: transformers' Mask2Former Swin-S COCO instance model, hub id in
    ``detector_model``; a callable or ``module:attribute`` for another), ``colours`` (``clip``: CLIP ViT-L/14
    zero-shot, hub id in ``clip_model``; ``palette``: :func:`palette_colours`), ``metadata`` (a GenEval
    metadata JSONL; default the shipped 553 prompts), and GenEval's ``threshold``, ``counting_threshold``,
    ``max_objects``, ``max_overlap``, ``position_threshold``. ``last_reasons`` holds why each image of the
    last batch was wrong.
    """

    name = "geneval"
    #: a benchmark reports the mean over its tasks (the prompt set's styles) of each task's share correct
    overall = "task_mean"

    def __init__(self, *, detector="mask2former", colours="clip", metadata: str | None = None,
                 detector_model: str | None = None, clip_model: str | None = None, threshold: float = THRESHOLD,
                 counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
                 max_overlap: float = MAX_OVERLAP, position_threshold: float = POSITION_THRESHOLD, **common):
        super().__init__(**common)
        from scorers import geneval_models as models

        for option, value in (("threshold", threshold), ("counting_threshold", counting_threshold),
                              ("max_overlap", max_overlap), ("position_threshold", position_threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise InputError(f"geneval option {option}={value!r}: expected a number in [0, 1]")
        if isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 1:
            raise InputError(f"geneval option max_objects={max_objects!r}: expected a positive integer")
        self.metadata = load_metadata(metadata)
        self.rules = dict(threshold=threshold, counting_threshold=counting_threshold, max_objects=max_objects,
                          max_overlap=max_overlap)
        self.margin = position_threshold
        self.detect = _resolve(detector, {"mask2former": models.Mask2FormerDetector}, "detector", self.device,
                               **({"model": detector_model} if detector_model else {}))
        self.classify = _resolve(colours, {"clip": models.ClipColours, "palette": lambda device: palette_colours},
                                 "colours", self.device, **({"model": clip_model} if clip_model else {}))
        self.last_reasons: list[list[str]] = []

    def metadata_of(self, prompt: str) -> dict:
        row = self.metadata.get(prompt.strip())
        if row is None:
            raise InputError(f"geneval: prompt {prompt!r} is not a GenEval prompt (use prompts=geneval, or pass "
                             "metadata=<a GenEval metadata JSONL holding it>)")
        return row

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """InputError naming the first prompt without GenEval metadata (callers check before generating)."""
        for prompt in prompts:
            self.metadata_of(prompt)

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        rows = [self.metadata_of(p) for p in prompts]  # every prompt is checked before any detection
        self.last_reasons = []
        for image, row in zip(to_pil(images), rows):
            objects = keep_detections(self.detect(image), row["tag"], **self.rules)
            self.last_reasons.append(judge(image, objects, row, self.classify, self.margin)[1])
        return torch.tensor([0.0 if reasons else 1.0 for reasons in self.last_reasons])
