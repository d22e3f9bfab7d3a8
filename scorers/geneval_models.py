"""The models behind ``geneval``: an instance-segmentation detector with COCO labels and GenEval's CLIP
colour classifier, both through transformers (a base dependency; the detector also needs scipy, the
``geneval`` extra).

GenEval's official stack is mmdetection's Mask2Former Swin-S (COCO, 8x2 LSJ 50e) with open_clip ViT-L/14
(OpenAI weights). Here the detector is transformers' port of a Mask2Former Swin-S COCO instance model and
the colour classifier transformers' CLIP ViT-L/14 (the same OpenAI weights): the rules are GenEval's, the
detector's scores and masks are close to but not bit-equal with mmdetection's.
"""

from __future__ import annotations

import torch

from scorers.base import clip_embeddings, clip_pixel_values, clip_text_inputs, load_pretrained, resolve_device
from scorers.errors import InputError
from scorers.geneval import GENEVAL_COLORS, Detection

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
# COCO names in transformers' label maps -> the names GenEval's metadata uses.
LABEL_NAMES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
# GenEval's three prompt templates per colour; a colour's text embedding is their normalised mean.
COLOUR_TEMPLATES = ("a photo of a {c} {o}", "a photo of a {c}-colored {o}", "a photo of a {c} object")
# Crops show the object on this grey (GenEval's default bgcolor "#999"), the rest of its box masked out.
CROP_BACKGROUND = (153, 153, 153)


class Mask2FormerDetector:
    """``detect(image) -> list[Detection]``: every instance Mask2Former finds (score > 0), its box the
    extent of its mask, labels in GenEval's COCO names."""

    def __init__(self, *, device=None, model: str = DEFAULT_DETECTOR):
        import importlib.util

        if importlib.util.find_spec("scipy") is None:
            raise InputError("geneval's Mask2Former detector needs scipy, which is not installed: "
                             "pip install 'diffusion-dpo[geneval]' (or pass another detector=)")
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        self.device = resolve_device(device)
        self.processor = load_pretrained(AutoImageProcessor, model, option="detector_model",
                                         what="GenEval detector's image processor")
        self.model = load_pretrained(Mask2FormerForUniversalSegmentation, model, option="detector_model",
                                     what="GenEval detector").to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, image) -> list[Detection]:
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        result = self.processor.post_process_instance_segmentation(
            outputs, threshold=0.0, target_sizes=[(image.height, image.width)], return_binary_maps=True)[0]
        masks = result["segmentation"]
        if masks is None:
            return []
        detections = []
        labels = self.model.config.id2label
        for k, info in enumerate(result["segments_info"]):
            mask = masks[k].bool().cpu()
            ys, xs = torch.nonzero(mask, as_tuple=True)
            if len(xs) == 0:
                continue
            name = labels[info["label_id"]]
            box = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
            detections.append(Detection(LABEL_NAMES.get(name, name), float(info["score"]), box, mask.numpy()))
        return detections


class ClipColours:
    """``classify(image, detections, classname) -> colour names``: CLIP zero-shot over GENEVAL_COLORS on each
    object's crop (its mask on grey, cut to its box), GenEval's templates averaged per colour."""

    def __init__(self, *, device=None, model: str = DEFAULT_CLIP):
        from transformers import CLIPModel, CLIPProcessor

        self.device = resolve_device(device)
        self.processor = load_pretrained(CLIPProcessor, model, option="clip_model", what="GenEval colour CLIP")
        self.model = load_pretrained(CLIPModel, model, option="clip_model",
                                     what="GenEval colour CLIP").to(self.device).eval()
        self._classes: dict[str, torch.Tensor] = {}

    def _text(self, classname: str) -> torch.Tensor:
        """[n_colours, d] normalised class embeddings for objects of ``classname``."""
        if classname not in self._classes:
            rows = []
            for colour in GENEVAL_COLORS:
                texts = [t.format(c=colour, o=classname) for t in COLOUR_TEMPLATES]
                tokens = clip_text_inputs(self.processor.tokenizer, texts, self.model, self.device)
                rows.append(torch.nn.functional.normalize(clip_embeddings(self.model, text=tokens).mean(0), dim=0))
            self._classes[classname] = torch.stack(rows)
        return self._classes[classname]

    @torch.inference_mode()
    def __call__(self, image, detections: list[Detection], classname: str) -> list[str]:
        if not detections:
            return []
        crops = [crop(image, d) for d in detections]
        pixels = clip_pixel_values(self.processor.image_processor, crops, self.device)
        logits = clip_embeddings(self.model, pixel_values=pixels) @ self._text(classname).T
        return [GENEVAL_COLORS[i] for i in logits.argmax(1).tolist()]


def crop(image, detection: Detection):
    """The object's pixels (inside its mask, grey elsewhere) cut to its box, as GenEval feeds CLIP."""
    from PIL import Image

    image = image.convert("RGB")
    if detection.mask is not None:
        import numpy as np

        mask = Image.fromarray(np.asarray(detection.mask, dtype=np.uint8) * 255, mode="L")
        image = Image.composite(image, Image.new("RGB", image.size, CROP_BACKGROUND), mask)
    return image.crop(tuple(detection.box))
