"""PickScore (Kirstain et al., 2023, "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image
Generation"): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

    score(x, prompt) = exp(logit_scale) * cos(E_img(x), E_txt(prompt))

as in the authors' published inference code (the model card's ``calc_probs``): the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` prepares images (shortest side to 224 bicubic, center crop,
CLIP mean/std) and text (padded, truncated to 77 tokens); embeddings are L2-normalised and their dot
product is scaled by the learned temperature exp(logit_scale) (CLIP training caps it at 100). The
preference probability among images for one prompt is the softmax of their scores
(:meth:`PickScore.probabilities`), the paper's Bradley-Terry / softmax model.

    scorer = load_scorer("pickscore")                                       # hub weights
    scorer = load_scorer("pickscore", model="ckpt/PickScore_v1", processor="ckpt/clip-h")  # local folders
"""

from __future__ import annotations

import torch

from scorers.base import Scorer, clip_embeddings, clip_pixel_values, clip_text_inputs, load_pretrained
from scorers.errors import InputError

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore(Scorer):
    """Options: ``model`` (hub id or local folder of a transformers CLIPModel; default
    yuvalkirstain/PickScore_v1), ``processor`` (hub id or local folder of a CLIPProcessor; default
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K), plus ``device``, ``dtype``, ``batch_size``."""

    name = "pickscore"

    def __init__(self, *, model: str = DEFAULT_MODEL, processor: str = DEFAULT_PROCESSOR, **common):
        super().__init__(**common)
        from transformers import CLIPModel, CLIPProcessor

        self.processor = load_pretrained(CLIPProcessor, processor, option="processor",
                                         what="PickScore processor (image preprocessing and tokenizer)")
        self.model = load_pretrained(CLIPModel, model, option="model", what="PickScore model")
        self.model.eval().requires_grad_(False).to(self.device)

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        pixel_values = clip_pixel_values(self.processor.image_processor, images, self.device)
        text = clip_text_inputs(self.processor.tokenizer, prompts, self.model, self.device)
        image_embeds = clip_embeddings(self.model, pixel_values=pixel_values)
        text_embeds = clip_embeddings(self.model, text=text)
        return self.model.logit_scale.exp().float() * (image_embeds * text_embeds).sum(-1)

    def probabilities(self, images, prompt: str) -> torch.Tensor:
        """Preference probability of each image among ``images`` for the one ``prompt``: softmax of the
        scores, float32 [N] on the CPU summing to 1 (the authors' ``calc_probs``)."""
        if not isinstance(prompt, str):
            raise InputError(f"probabilities() compares images for one prompt; got {type(prompt).__name__}, "
                             "expected a string")
        return torch.softmax(self.score(images, prompt), dim=0)
