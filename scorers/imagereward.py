"""ImageReward v1.0 (Xu et al., 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation"), rebuilt on transformers' BLIP classes and loading the official checkpoint.

    h      = BLIP text encoder (BERT with cross-attention to the image) on the prompt, state of [CLS]
    image  = BLIP ViT-L/16 tokens of the image (224 px: shortest side bicubic to 224, centre crop, CLIP mean/std)
    score  = (MLP(h) - 0.16717362830052426) / 1.0333394966054072

The MLP is the same five-layer affine head as the LAION aesthetic predictor (768-1024-128-64-16-1, no
activations); the two constants are the published mean and standard deviation of its raw output, so the
scores are roughly standard normal over the authors' data. Prompts are tokenised as the reference package
does: bert-base-uncased with ``[DEC]`` and ``[ENC]`` added (vocabulary 30524), padded to 35 tokens,
truncated there, starting with ``[CLS]``.

Weights: the reference package's ``ImageReward.pt`` (hub ``THUDM/ImageReward``) is a state dict of its
``blip.visual_encoder`` (a timm-style ViT), ``blip.text_encoder`` (BLIP's BERT) and ``mlp``; the ViT's names
are mapped onto ``BlipVisionModel`` (``blocks.i.attn.qkv`` -> ``encoder.layers.i.self_attn.qkv`` ...) and
the BERT's match ``BlipTextModel`` as they are. The text encoder's shape comes from ``med_config.json``
(same repo); the ViT's width, depth, patch and image size from the checkpoint's tensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from scorers.aesthetic import AestheticMLP
from scorers.base import Scorer, hub_file, load_pretrained, load_state_dict, to_pil
from scorers.errors import InputError

HUB_REPO = "THUDM/ImageReward"
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PROMPT_TOKENS = 35

# timm ViT names (after "blip.visual_encoder.") -> transformers BlipVisionModel names; {i} is the block.
_VIT_NAMES = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VIT_BLOCK_NAMES = {
    "norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}


def vision_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``blip.visual_encoder.*`` tensors of an ImageReward checkpoint under BlipVisionModel's names."""
    out = {}
    prefix = "blip.visual_encoder."
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if block:
            index, module, kind = block.groups()
            if module in _VIT_BLOCK_NAMES:
                out[f"encoder.layers.{index}.{_VIT_BLOCK_NAMES[module]}.{kind}"] = value
        elif key in _VIT_NAMES:
            out[_VIT_NAMES[key]] = value
    return out


def vision_config(state: dict[str, torch.Tensor], num_heads: int):
    """A BlipVisionConfig read off the checkpoint's ViT tensors (timm's LayerNorm eps 1e-6, GELU, MLP x4)."""
    from transformers import BlipVisionConfig

    try:
        pos = state["blip.visual_encoder.pos_embed"]
        patch = state["blip.visual_encoder.patch_embed.proj.weight"]
    except KeyError as e:
        raise InputError(f"ImageReward checkpoint lacks {e.args[0]}; expected the state dict of the reference "
                         "package's ImageReward model (blip.visual_encoder.*, blip.text_encoder.*, mlp.*)") from None
    width, patch_size = pos.shape[-1], patch.shape[-1]
    side = round((pos.shape[1] - 1) ** 0.5)
    depth = len({k.split(".")[3] for k in state if k.startswith("blip.visual_encoder.blocks.")})
    if width % num_heads:
        raise InputError(f"vision_heads={num_heads}: the checkpoint's ViT width {width} is not divisible by it")
    return BlipVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                            num_attention_heads=num_heads, image_size=side * patch_size, patch_size=patch_size,
                            hidden_act="gelu", layer_norm_eps=1e-6)


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP text encoder with cross-attention + the MLP head; ``forward`` gives normalised scores."""

    def __init__(self, vision_cfg, text_cfg):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        text_cfg.encoder_hidden_size = vision_cfg.hidden_size
        text_cfg.is_decoder = True  # builds the cross-attention layers; forward runs bidirectionally
        self.vision = BlipVisionModel(vision_cfg)
        self.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """pixel_values [n, 3, S, S] normalised, input_ids / attention_mask [n, 35] -> scores [n]."""
        image_tokens = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                         encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state
        with torch.autocast(device_type=text.device.type, enabled=False):
            raw = self.mlp(text[:, 0].float())
        return (raw - REWARD_MEAN) / REWARD_STD


def load_imagereward_model(state: dict[str, torch.Tensor], med_config: dict, vision_heads: int, where: str):
    """An :class:`ImageRewardModel` holding the reference checkpoint's ``state`` (names mapped)."""
    from transformers import BlipTextConfig

    fields = {k: v for k, v in med_config.items() if k in BlipTextConfig().to_dict()}
    text_cfg = BlipTextConfig(**fields)
    model = ImageRewardModel(vision_config(state, vision_heads), text_cfg)
    text_state = {k.removeprefix("blip.text_encoder."): v for k, v in state.items()
                  if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")}
    mlp_state = {k.removeprefix("mlp."): v for k, v in state.items() if k.startswith("mlp.")}
    for part, part_state in ((model.vision, vision_state_dict(state)), (model.text, text_state),
                             (model.mlp, mlp_state)):
        try:
            part.load_state_dict(part_state)
        except RuntimeError as e:
            raise InputError(f"ImageReward checkpoint {where} (option checkpoint=) does not fit the model made "
                             f"from med_config and vision_heads={vision_heads}: {' '.join(str(e).split())[:400]}"
                             ) from None
    return model


class ImageReward(Scorer):
    """Options: ``checkpoint`` (local ImageReward.pt; default from hub THUDM/ImageReward), ``med_config``
    (local med_config.json of the text encoder; default from the same repo), ``tokenizer`` (hub id or folder
    of a BERT tokenizer; default bert-base-uncased, to which [DEC] and [ENC] are added), ``vision_heads``
    (attention heads of the ViT, default 16 for ViT-L), plus ``device``, ``dtype``, ``batch_size``."""

    name = "imagereward"

    def __init__(self, *, checkpoint: str | None = None, med_config: str | None = None,
                 tokenizer: str = "bert-base-uncased", vision_heads: int = 16, **common):
        super().__init__(**common)
        from transformers import AutoTokenizer

        if checkpoint is None:
            checkpoint = hub_file(HUB_REPO, "ImageReward.pt", option="checkpoint", what="ImageReward checkpoint")
        if med_config is None:
            med_config = hub_file(HUB_REPO, "med_config.json", option="med_config",
                                  what="ImageReward text-encoder config")
        try:
            config = json.loads(Path(med_config).expanduser().read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"ImageReward med_config {med_config} (option med_config=) is not a readable JSON "
                             f"file: {e}") from None
        state = load_state_dict(checkpoint, option="checkpoint", what="ImageReward checkpoint")
        self.model = load_imagereward_model(state, config, vision_heads, str(checkpoint))
        self.model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = load_pretrained(AutoTokenizer, tokenizer, option="tokenizer",
                                         what="ImageReward tokenizer (BERT)")
        add_blip_tokens(self.tokenizer)
        self.image_size = self.model.vision.config.image_size

    def preprocess(self, images) -> torch.Tensor:
        """A chunk as pixel values [n, 3, S, S] on the CPU: the reference transform (shortest side to S with
        PIL bicubic resizing, centre crop, CLIP mean/std)."""
        from torchvision import transforms

        # On PIL images, as the reference does: PIL's bicubic resize, so the pixels match it exactly.
        transform = transforms.Compose([
            transforms.Resize(self.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(self.image_size),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ])
        return torch.stack([transform(image) for image in to_pil(images)])

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.device)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                return_tensors="pt")
        return self.model(pixels, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))


def add_blip_tokens(tokenizer) -> None:
    """BLIP's two extra tokens, as the reference's ``init_tokenizer`` adds them: ``[DEC]`` as the bos token,
    ``[ENC]`` as an additional special token (ids 30522 and 30523 on bert-base-uncased)."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
