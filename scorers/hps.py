"""Human Preference Score v2 / v2.1 (Wu et al., 2023, "Human Preference Score v2: A Solid Benchmark for
Evaluating Human Preferences of Text-to-Image Synthesis"): an open_clip ViT-H/14 fine-tuned on HPD v2.

    score(x, prompt) = cos(E_img(x), E_txt(prompt))      (raw cosine, e.g. 0.27)

as the authors' ``hpsv2.score`` returns it: the diagonal of image_features @ text_features.T with both
L2-normalised, no logit scale. Benchmark tables print it x100 (27.0): ``report_scale = 100``, and
``diffusion-dpo evaluate`` reports ``score * report_scale``.

Preprocessing is the authors' validation transform, not CLIP's usual one: the longest side is scaled to
the model's input size (bicubic), the short side padded to a square with black (left/top get
``pad // 2``, right/bottom the rest), then CLIP mean/std; nothing is cropped away. One departure: the
authors skip resizing *and padding* when the longest side already equals the input size, which leaves a
non-square input the model cannot take; here such images are padded too. Transparency is dropped (PIL
``convert("RGB")``), as open_clip does.

The model is built from the open_clip config without downloading the base CLIP weights (the HPS
checkpoint replaces all of them), then the checkpoint's ``state_dict`` is loaded.

    scorer = load_scorer("hpsv2.1")                                   # xswu/HPSv2 from the hub
    scorer = load_scorer("hpsv2", checkpoint="ckpt/HPS_v2_compressed.pt")
    scorer = load_scorer("hpsv2", arch="tiny.json", checkpoint="tiny.pt")   # any open_clip config
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import torch

from scorers.base import Scorer, hub_file, load_state_dict, to_pil
from scorers.errors import InputError

HUB_REPO = "xswu/HPSv2"
DEFAULT_ARCH = "ViT-H-14"


class HPSv2(Scorer):
    """Options: ``checkpoint`` (local .pt; default: ``HPS_v2_compressed.pt`` from hub repo xswu/HPSv2),
    ``arch`` (open_clip model name, default ViT-H-14, or the path of an open_clip model-config JSON),
    plus ``device``, ``dtype``, ``batch_size``."""

    name = "hpsv2"
    hub_filename = "HPS_v2_compressed.pt"
    alpha = "drop"
    report_scale = 100.0

    def __init__(self, *, checkpoint: str | None = None, arch: str = DEFAULT_ARCH, **common):
        super().__init__(**common)
        import open_clip

        model_name = _register_arch(arch)
        # The checkpoint first: a missing one fails in a second, before a ViT-H is built for nothing.
        if checkpoint is None:
            checkpoint = hub_file(HUB_REPO, self.hub_filename, option="checkpoint", what=f"{self.name} checkpoint")
        state = load_state_dict(checkpoint, option="checkpoint", what=f"{self.name} checkpoint")
        if isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DistributedDataParallel
        # pretrained=None: random init, no download of laion2B base weights the checkpoint overwrites.
        with _quiet_random_init_warning():
            self.model = open_clip.create_model(model_name, pretrained=None, device="cpu")
        self.tokenizer = open_clip.get_tokenizer(model_name)
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:
            raise InputError(f"{self.name} checkpoint {checkpoint} (option checkpoint=) does not fit open_clip "
                             f"model {arch!r} (option arch=): {' '.join(str(e).split())[:400]}") from None
        self.model.eval().requires_grad_(False).to(self.device)
        size = self.model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32).view(3, 1, 1)

    def preprocess(self, images) -> torch.Tensor:
        """A chunk as model input [n, 3, S, S] (CPU, float32): longest side to S, black padding, mean/std."""
        return torch.stack([(resize_longest_and_pad(image, self.image_size) - self.mean) / self.std
                            for image in to_pil(images)])

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.device)
        tokens = self.tokenizer(prompts).to(self.device)
        image_features = self.model.encode_image(pixels, normalize=True).float()
        text_features = self.model.encode_text(tokens, normalize=True).float()
        return (image_features * text_features).sum(-1)


class HPSv21(HPSv2):
    """HPS v2.1: the same model and formula, retrained on more data (``HPS_v2.1_compressed.pt``)."""

    name = "hpsv2.1"
    hub_filename = "HPS_v2.1_compressed.pt"


def resize_longest_and_pad(image, size: int) -> torch.Tensor:
    """PIL RGB image -> float tensor [3, size, size] in [0, 1]: the longest side scaled to ``size`` with
    PIL bicubic (new sides rounded with Python's ``round``), the image centred on black (left/top padding
    ``pad // 2``, right/bottom the remainder)."""
    import numpy as np
    from PIL import Image

    width, height = image.size
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))  # a 1000x1 strip keeps a row
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    pixels = torch.from_numpy(np.array(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    out = torch.zeros(3, size, size)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[:, top:top + new_h, left:left + new_w] = pixels
    return out


class _quiet_random_init_warning:
    """Drop open_clip's root-logger warning that the model was "initialized randomly" while it is built:
    true at that moment, misleading to a user whose HPS checkpoint is loaded right after."""

    @staticmethod
    def filter(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    def __enter__(self):
        logging.getLogger().addFilter(self.filter)

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self.filter)


def _register_arch(arch: str) -> str:
    """An open_clip model name for ``arch``: a built-in name as is, or a model-config JSON file (the bare
    config with embed_dim/vision_cfg/text_cfg, or open_clip_config.json's ``{"model_cfg": ...}``).

    A JSON file is registered with ``open_clip.add_model_config`` under a name made from a hash of its
    content, so it can never shadow a built-in model or another file with the same name.
    """
    import open_clip

    path = Path(arch).expanduser()
    if not arch.endswith(".json") and not path.is_file():
        if arch not in open_clip.list_models():
            raise InputError(f"arch={arch!r} is neither an open_clip model name (e.g. ViT-H-14) nor an existing "
                             "model-config .json file")
        return arch
    if not path.is_file():
        raise InputError(f"open_clip model config {arch} (option arch=) does not exist")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"open_clip model config {arch} (option arch=) is not readable JSON: {e}") from None
    cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else cfg
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise InputError(f"open_clip model config {arch} (option arch=) lacks {', '.join(missing)}; expected "
                         "an object with embed_dim, vision_cfg and text_cfg")
    text = json.dumps(cfg, sort_keys=True)
    name = "diffusion-dpo-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    if name not in open_clip.list_models():
        folder = Path(tempfile.gettempdir()) / "diffusion-dpo-open-clip-configs"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(text)
        open_clip.add_model_config(folder / f"{name}.json")
    return name
