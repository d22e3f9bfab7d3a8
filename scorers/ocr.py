"""OCR text reward of Flow-GRPO (Liu et al., 2025, "Flow-GRPO: Training Flow Matching Models via Online RL",
the text-rendering task; reward as in the authors' ``flow_grpo/ocr.py``):

    target     = the text between the first pair of double quotes in the prompt
    recognised = every piece of text the OCR engine reads in the image (confidence > 0), joined
    both normalised: spaces removed, lower-cased
    d          = 0 if target occurs inside recognised, else Levenshtein(recognised, target)
    reward     = 1 - min(d, len(target)) / len(target)        in [0, 1]

So a picture showing exactly the quoted text (or the text among other words) scores 1, one wrong
character out of ten scores 0.9, and a picture with no legible text (or far too much unrelated text)
scores 0. A prompt without quoted text is an error: there is nothing to read.

Flow-GRPO reads the text with PaddleOCR; this scorer uses EasyOCR (``pip install diffusion-dpo[ocr]``),
which installs from the registry without the Paddle stack, so absolute numbers can differ from the
paper's by the engines' reading accuracy; the formula is the same. Any engine plugs in through
``recognizer=``: a callable taking a PIL RGB image and returning the recognised text.
"""

from __future__ import annotations

from typing import Callable

import torch

from scorers.base import Scorer, to_pil
from scorers.errors import InputError

EXTRA_HINT = "pip install diffusion-dpo[ocr]"


def normalise_text(text: str) -> str:
    """Flow-GRPO's normalisation: spaces removed (other whitespace kept), lower-cased."""
    return text.replace(" ", "").lower()


def quoted_text(prompt: str, where: str = "prompt") -> str:
    """The text between the first two double quotes of ``prompt`` ('a sign saying "Open"' -> 'Open')."""
    parts = prompt.split('"')
    if len(parts) < 3 or not normalise_text(parts[1]):
        raise InputError(f'{where} {prompt!r} has no text in double quotes; the ocr scorer compares the image\'s '
                         'text with the quoted text of the prompt, e.g. \'a shop sign reading "OPEN 24 HOURS"\'')
    return parts[1]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions that turn
    ``a`` into ``b``. Dynamic programming over one row, O(len(a) * len(b)) time."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1,                       # delete char_a
                               current[j - 1] + 1,                    # insert char_b
                               previous[j - 1] + (char_a != char_b)))  # substitute (free when equal)
        previous = current
    return previous[-1]


def ocr_reward(recognised: str, target: str) -> float:
    """Flow-GRPO's reward in [0, 1] for ``recognised`` text against the ``target`` text (both raw)."""
    recognised, target = normalise_text(recognised), normalise_text(target)
    if not target:
        raise InputError("the ocr scorer's target text is empty after removing spaces")
    distance = 0 if target in recognised else edit_distance(recognised, target)
    return 1.0 - min(distance, len(target)) / len(target)


class OCRScore(Scorer):
    """Options: ``recognizer`` (a callable PIL RGB image -> text; default EasyOCR), ``languages`` (EasyOCR
    language codes, default ``["en"]``), ``model_dir`` (EasyOCR's model folder; default its own,
    ``~/.EasyOCR``), plus ``device`` (EasyOCR runs on the GPU when it is cuda), ``batch_size``."""

    name = "ocr"

    def __init__(self, *, recognizer: Callable | None = None, languages: list[str] | str = ("en",),
                 model_dir: str | None = None, **common):
        common.setdefault("dtype", "float32")  # no autocast: the engine is not a torch model of ours
        super().__init__(**common)
        if recognizer is not None and not callable(recognizer):
            raise InputError(f"recognizer={recognizer!r}: expected a callable taking a PIL image and returning text")
        self.recognizer = recognizer or easyocr_recognizer(languages, model_dir, self.device.type == "cuda")

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        targets = [quoted_text(prompt) for prompt in prompts]
        rewards = []
        for image, target in zip(to_pil(images), targets):
            text = self.recognizer(image)
            if not isinstance(text, str):
                raise InputError(f"the ocr recognizer returned a {type(text).__name__}; expected the text as a str")
            rewards.append(ocr_reward(text, target))
        return torch.tensor(rewards, dtype=torch.float64)


def easyocr_recognizer(languages, model_dir: str | None, gpu: bool) -> Callable:
    """EasyOCR as a recognizer: every text box it reads with confidence > 0, joined in its reading order."""
    try:
        import easyocr
    except ImportError:
        raise InputError(f"the ocr scorer's default engine needs EasyOCR: {EXTRA_HINT} (or pass recognizer=, "
                         "a callable image -> text)") from None
    import numpy as np

    languages = [languages] if isinstance(languages, str) else list(languages)
    kwargs = {"model_storage_directory": model_dir} if model_dir else {}
    try:
        reader = easyocr.Reader(languages, gpu=gpu, verbose=False, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"cannot start EasyOCR for languages {languages} (options languages=, model_dir=): "
                         f"{' '.join(str(e).split())[:300]}") from None

    def recognise(image) -> str:
        boxes = reader.readtext(np.asarray(image), detail=1)
        return "".join(text for _box, text, confidence in boxes if confidence > 0)

    return recognise
