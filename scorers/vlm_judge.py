"""A vision-language model as the judge (UnifiedReward-style; Wang et al., 2025, "Unified Reward Model for
Multimodal Understanding and Generation"): the model sees the image and a rubric naming the prompt, writes
an answer, and the answer's last "Score: N/M" becomes the reward N / M, in [0, 1].

    rubric = the template file with ``{prompt}`` replaced by the image's prompt
    answer = greedy decoding of a Qwen2-VL / Qwen2.5-VL class model (transformers' AutoModelForImageTextToText)
             on [image, rubric] in its chat template, at most ``max_new_tokens`` tokens
    score  = N / M for the last "Score: N/M" in the answer ("Score: N" alone means N / ``scale``)

The default template (``scorers/templates/vlm_judge.txt``) asks for alignment with the prompt and image
quality together on a 0-10 scale; ``template=PATH`` uses the user's own file (UTF-8 text holding
``{prompt}``; no other braces are interpreted). An answer without a score, or with one outside [0, M], is
*unparsed*: ``on_unparsed="error"`` (default) stops with an InputError quoting the answer, so a bad rubric
or model fails loudly instead of feeding a training run made-up rewards; ``on_unparsed="nan"`` scores it
NaN, counts it in ``unparsed`` and logs a warning with the answer (for evaluation, where a few failures
can be dropped). The raw answers of the last chunk are kept in ``last_answers``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

import torch

from scorers.base import Scorer, load_pretrained, to_pil
from scorers.errors import InputError

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_TEMPLATE = Path(__file__).parent / "templates" / "vlm_judge.txt"
PLACEHOLDER = "{prompt}"
_SCORE = re.compile(r"score\W{0,4}?(-?\d+(?:\.\d+)?)(?:\s*(?:/|out of)\s*(\d+(?:\.\d+)?))?", re.IGNORECASE)
logger = logging.getLogger(__name__)


def parse_score(answer: str, scale: float = 10.0) -> float | None:
    """The reward in [0, 1] written in ``answer``: its last "Score: N/M" (also "score = N", "**Score:** N out
    of M", "Final score: N") as N / M, M defaulting to ``scale``; None when there is none or it lies outside."""
    matches = _SCORE.findall(answer)
    if not matches:
        return None
    value, denominator = matches[-1]
    total = float(denominator) if denominator else scale
    if total <= 0 or not 0.0 <= float(value) <= total:
        return None
    return float(value) / total


def read_template(path: str | Path) -> str:
    """The rubric template at ``path``: UTF-8 text holding the ``{prompt}`` placeholder."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"vlm_judge template {path} (option template=) is not a readable UTF-8 text file: "
                         f"{e}") from None
    if PLACEHOLDER not in text:
        raise InputError(f"vlm_judge template {path} (option template=) lacks the {PLACEHOLDER} placeholder where "
                         "the image's prompt goes")
    return text


class VLMJudge(Scorer):
    """Options: ``model`` (hub id or folder of an image-text-to-text model; default
    Qwen/Qwen2.5-VL-7B-Instruct), ``processor`` (its processor; default: the model's), ``template`` (rubric
    file; default the packaged vlm_judge.txt), ``scale`` (the M of a bare "Score: N", default 10),
    ``max_new_tokens`` (default 256), ``on_unparsed`` ("error" or "nan"), ``generate`` (a callable
    (PIL images, rubrics) -> answers replacing the model, for tests and other engines), plus ``device``,
    ``dtype`` (also the dtype the weights load in), ``batch_size`` (default 32; generation is padded left)."""

    name = "vlm_judge"

    def __init__(self, *, model: str = DEFAULT_MODEL, processor: str | None = None,
                 template: str | Path = DEFAULT_TEMPLATE, scale: float = 10.0, max_new_tokens: int = 256,
                 on_unparsed: str = "error", generate: Callable | None = None, **common):
        super().__init__(**common)
        if on_unparsed not in ("error", "nan"):
            raise InputError(f"on_unparsed={on_unparsed!r}: expected 'error' or 'nan'")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
            raise InputError(f"scale={scale!r}: expected a positive number (the M of a bare 'Score: N')")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens={max_new_tokens!r}: expected a positive integer")
        self.template = read_template(template)
        self.scale, self.max_new_tokens, self.on_unparsed = float(scale), max_new_tokens, on_unparsed
        self.unparsed = 0
        self.last_answers: list[str] = []
        if generate is not None:
            if not callable(generate):
                raise InputError(f"generate={generate!r}: expected a callable (images, rubrics) -> answers")
            self.generate = generate
            return
        from scorers.hpsv3 import require_transformers

        require_transformers("4.56", "vlm")  # from_pretrained(dtype=)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = load_pretrained(AutoProcessor, processor or model, option="processor",
                                         what="vlm_judge processor")
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        self.model = load_pretrained(AutoModelForImageTextToText, model, option="model", what="vlm_judge model",
                                     dtype=self.dtype)
        self.model.eval().requires_grad_(False).to(self.device)
        self.generate = self.generate_answers

    def rubric(self, prompt: str) -> str:
        """The template with the image's prompt in place of ``{prompt}``."""
        return self.template.replace(PLACEHOLDER, prompt)

    def generate_answers(self, images: list, rubrics: list[str]) -> list[str]:
        """Greedy answers of the model, one per (image, rubric), without the echoed input."""
        messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rubric}]}]
                    for rubric in rubrics]
        texts = [self.processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                 for m in messages]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.device)
        tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = tokens[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        answers = list(self.generate(to_pil(images), [self.rubric(p) for p in prompts]))
        if len(answers) != len(prompts):
            raise InputError(f"vlm_judge's generator gave {len(answers)} answers for {len(prompts)} images")
        self.last_answers = answers
        scores = []
        for prompt, answer in zip(prompts, answers):
            score = parse_score(answer, self.scale)
            if score is None:
                shown = " ".join(answer.split())[:300]
                if self.on_unparsed == "error":
                    raise InputError(f"vlm_judge found no 'Score: N/{self.scale:g}' within range in the answer for "
                                     f"prompt {prompt!r}: {shown!r} (option on_unparsed=nan scores such answers "
                                     "NaN instead)")
                self.unparsed += 1
                logger.warning("vlm_judge: no score in the answer for %r (%d unparsed so far): %r", prompt,
                               self.unparsed, shown)
                score = float("nan")
            scores.append(score)
        return torch.tensor(scores, dtype=torch.float64)
