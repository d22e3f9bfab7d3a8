"""LAION aesthetic predictor v2 (Schuhmann, "improved-aesthetic-predictor", 2022): a linear head on CLIP
ViT-L/14 image embeddings, trained on SAC + LAION-Logos + AVA ratings (1-10 scale; LAION-Aesthetics
"6.5+" means a predicted 6.5 or more). DDPO (Black et al., 2023) uses it as its aesthetic reward.

    score(x) = MLP(e / ||e||),  e = E_img(x) from openai/clip-vit-large-patch14 (768-d)

The MLP is the published one: Linear 768-1024, Dropout 0.2, Linear 1024-128, Dropout 0.2, Linear 128-64,
Dropout 0.1, Linear 64-16, Linear 16-1, with no activations (so it is affine overall), held in a
``layers`` Sequential so the keys of ``sac+logos+ava1-l14-linearMSE.pth`` (``layers.0.weight`` ...
``layers.7.bias``) load unchanged. The prompt is not used.

Weights: ``weights=`` a local .pth file, else the hub mirror ``trl-lib/ddpo-aesthetic-predictor``
(``aesthetic-model.pth``, the same file TRL's DDPO example loads), else the authors' GitHub URL.
"""

from __future__ import annotations

import torch
from torch import nn

from scorers.base import (
    Scorer,
    clip_embeddings,
    clip_pixel_values,
    hub_file,
    hub_offline,
    load_pretrained,
    load_state_dict,
)
from scorers.errors import InputError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
HUB_REPO, HUB_FILENAME = "trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"
URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
       "sac+logos+ava1-l14-linearMSE.pth")


class AestheticMLP(nn.Module):
    """The predictor's head; ``dim`` is the CLIP embedding width (768 for ViT-L/14)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[n, dim] L2-normalised embeddings -> [n] predicted ratings."""
        return self.layers(embeddings).squeeze(-1)


class AestheticScore(Scorer):
    """Options: ``weights`` (local .pth of the head; default: hub mirror, then the published URL),
    ``clip_model`` (hub id or local folder of a transformers CLIPModel + processor; default
    openai/clip-vit-large-patch14), plus ``device``, ``dtype``, ``batch_size``."""

    name = "aesthetic"
    needs_prompts = False

    def __init__(self, *, weights: str | None = None, clip_model: str = DEFAULT_CLIP, **common):
        super().__init__(**common)
        from transformers import CLIPImageProcessor, CLIPModel

        state = _head_state_dict(weights)  # first: a missing head fails before CLIP is loaded for nothing
        self.image_processor = load_pretrained(CLIPImageProcessor, clip_model, option="clip_model",
                                               what="CLIP image processor of the aesthetic predictor")
        self.clip = load_pretrained(CLIPModel, clip_model, option="clip_model",
                                    what="CLIP model of the aesthetic predictor")
        self.clip.eval().requires_grad_(False).to(self.device)
        self.head = AestheticMLP(self.clip.config.projection_dim)
        where = weights or "the downloaded aesthetic head"
        try:
            self.head.load_state_dict(state)
        except RuntimeError as e:
            raise InputError(f"aesthetic head weights {where} (option weights=) do not fit the MLP on "
                             f"{self.clip.config.projection_dim}-d CLIP embeddings: {' '.join(str(e).split())[:400]}"
                             ) from None
        self.head.eval().requires_grad_(False).to(self.device)

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        pixel_values = clip_pixel_values(self.image_processor, images, self.device)
        embeddings = clip_embeddings(self.clip, pixel_values=pixel_values)
        # The head was fitted on fp32 numpy embeddings; keep it out of autocast.
        with torch.autocast(device_type=self.device.type, enabled=False):
            return self.head(embeddings.float())


def _head_state_dict(weights: str | None) -> dict:
    """The head's tensors: from ``weights`` if given, else the hub mirror, else the published URL."""
    if weights is not None:
        return load_state_dict(weights, option="weights", what="aesthetic head weights")
    try:
        path = hub_file(HUB_REPO, HUB_FILENAME, option="weights", what="aesthetic predictor head")
        return load_state_dict(path, option="weights", what="aesthetic head weights")
    except InputError as hub_error:
        if hub_offline():
            raise InputError(f"{hub_error} (also published at {URL}, not tried offline)") from None
        try:
            return torch.hub.load_state_dict_from_url(URL, map_location="cpu", weights_only=True, progress=False)
        except (OSError, RuntimeError, ValueError) as e:
            raise InputError(f"cannot load the aesthetic predictor head: the hub file {HUB_REPO}/{HUB_FILENAME} "
                             f"and {URL} both failed ({' '.join(str(e).split())[:200]}). Download "
                             "sac+logos+ava1-l14-linearMSE.pth and pass it with weights=PATH") from None
