"""HPSv3 (Ma et al., 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score"): Qwen2-VL-7B-Instruct
fine-tuned with an uncertainty-aware ranking loss, read by a small head at a special token.

    text   = the authors' instruction with the prompt filled in, ending "... of this image: <|Reward|>",
             after the image in the processor's chat template (generation prompt added)
    image  = resized with PIL bicubic to the multiple-of-28 size nearest in aspect ratio to 256 * 28 * 28
             pixels (256 visual tokens), then Qwen2-VL's own normalisation
    h      = last hidden state of the language model at the <|Reward|> token
    (mu, sigma) = head(h),  head = Linear(D, 1024) - ReLU - Linear(1024, 16) - ReLU - Linear(16, 2), in fp32
    score  = mu

as the reference package's ``HPSv3RewardInferencer`` computes it. One detail of that code is kept on
purpose: it feeds the language model without multimodal rotary positions (image tokens numbered like text
tokens, 0..L-1 along the sequence, the same in all three M-RoPE sections), because its forward bypasses
Qwen2-VL's position computation; the head was trained on those positions, so they are what gives its
scores. The instruction is shipped verbatim as ``scorers/templates/hpsv3_instruction.txt`` (from the
``hpsv3`` package, MIT licence, Copyright (c) 2024 HPSv3 Team): the model was trained on that exact text.

Weights: ``HPSv3.safetensors`` (hub ``MizzenAI/HPSv3``), a state dict of the reference model in the
transformers 4.45 layout (``model.layers.*``, ``visual.*``, ``lm_head``, ``rm_head.*``), mapped onto
transformers' current ``Qwen2VLForConditionalGeneration`` (``model.language_model.*``, ``model.visual.*``);
the architecture and processor come from ``Qwen/Qwen2-VL-7B-Instruct`` (``base=``), with ``<|Reward|>``
added to its tokenizer.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from scorers.base import Scorer, hub_file, load_pretrained, load_state_dict, to_pil, why
from scorers.errors import InputError

HUB_REPO, HUB_FILENAME = "MizzenAI/HPSv3", "HPSv3.safetensors"
DEFAULT_BASE = "Qwen/Qwen2-VL-7B-Instruct"
INSTRUCTION = Path(__file__).parent / "templates" / "hpsv3_instruction.txt"
REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28  # the reference fixes min_pixels = max_pixels to this
FACTOR = 28  # patch 14 x spatial merge 2


def reward_head(width: int) -> nn.Sequential:
    """HPSv3's head on hidden states [.., width] -> (mu, sigma) [.., 2]; keys 0, 3, 5 as in the checkpoint."""
    return nn.Sequential(nn.Linear(width, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))


def target_size(height: int, width: int, pixels: int = PIXELS, factor: int = FACTOR) -> tuple[int, int]:
    """(height, width), both multiples of ``factor``, holding about ``pixels`` pixels at the image's aspect
    ratio: sides rounded to the factor, then scaled down (floored) or up (ceiled) when the area falls
    outside [pixels, pixels] (Qwen2-VL's smart resize with min = max)."""
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"an image of {width}x{height} pixels is too elongated for HPSv3 (aspect ratio above 200)")
    new_h, new_w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if new_h * new_w > pixels:
        beta = math.sqrt(height * width / pixels)
        new_h = math.floor(height / beta / factor) * factor
        new_w = math.floor(width / beta / factor) * factor
    elif new_h * new_w < pixels:
        beta = math.sqrt(pixels / (height * width))
        new_h = math.ceil(height * beta / factor) * factor
        new_w = math.ceil(width * beta / factor) * factor
    return new_h, new_w


def remap_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the VLM's tensors under current transformers names, the head's tensors) of an HPSv3 state dict."""
    vlm, head = {}, {}
    for key, value in state.items():
        if key.startswith("rm_head."):
            head[key.removeprefix("rm_head.")] = value
        elif key.startswith("visual."):
            vlm["model." + key] = value
        elif key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
            vlm["model.language_model." + key.removeprefix("model.")] = value
        else:
            vlm[key] = value
    return vlm, head


class HPSv3Model(nn.Module):
    """A Qwen2-VL and the reward head; ``forward`` gives (mu, sigma) [n, 2] in fp32."""

    def __init__(self, vlm, reward_token_id: int):
        super().__init__()
        self.vlm = vlm
        self.head = reward_head(vlm.config.text_config.hidden_size).float()
        self.reward_token_id = reward_token_id

    def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw) -> torch.Tensor:
        """input_ids / attention_mask [n, L] (one <|Reward|> per row), pixel_values and image_grid_thw as the
        Qwen2-VL processor makes them -> [n, 2]."""
        embeds = self.vlm.get_input_embeddings()(input_ids)
        image = self.vlm.model.get_image_features(pixel_values, image_grid_thw)
        image = getattr(image, "pooler_output", image)  # transformers 5 wraps the per-image embeddings
        image = torch.cat(list(image)) if isinstance(image, (list, tuple)) else image
        image_slots = (input_ids == self.vlm.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_slots, image.to(embeds.dtype))
        # No position_ids: positions 0..L-1 in every M-RoPE section, as the reference model sees them.
        hidden = self.vlm.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        at_reward = input_ids == self.reward_token_id
        if not bool((at_reward.sum(1) == 1).all()):
            raise InputError(f"each HPSv3 input must hold exactly one {REWARD_TOKEN} token; the instruction or "
                             "the prompt holds another")
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.head(hidden[at_reward].float())


class HPSv3(Scorer):
    """Options: ``checkpoint`` (local HPSv3 .safetensors or .pt; default from hub MizzenAI/HPSv3), ``base``
    (hub id or folder with the Qwen2-VL config and processor; default Qwen/Qwen2-VL-7B-Instruct),
    ``pixels`` (image area the images are resized to, default 256 * 28 * 28 as trained), plus ``device``,
    ``dtype`` (also the dtype the VLM's weights are held in; the head stays fp32), ``batch_size``."""

    name = "hpsv3"

    def __init__(self, *, checkpoint: str | None = None, base: str = DEFAULT_BASE, pixels: int = PIXELS, **common):
        super().__init__(**common)
        require_transformers("4.52", "hpsv3")
        from transformers import AutoConfig, AutoProcessor

        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < FACTOR * FACTOR:
            raise InputError(f"pixels={pixels!r}: expected an integer image area of at least {FACTOR * FACTOR}")
        self.pixels = pixels
        self.instruction = INSTRUCTION.read_text(encoding="utf-8")
        if checkpoint is None:
            checkpoint = hub_file(HUB_REPO, HUB_FILENAME, option="checkpoint", what="HPSv3 checkpoint")
        vlm_state, head_state = remap_checkpoint(_read_checkpoint(checkpoint))
        self.processor = load_pretrained(AutoProcessor, base, option="base", what="HPSv3 processor (Qwen2-VL)")
        self.processor.tokenizer.padding_side = "right"
        self.processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        config = load_pretrained(AutoConfig, base, option="base", what="HPSv3 base config (Qwen2-VL)")
        embed = vlm_state.get("model.language_model.embed_tokens.weight")
        if embed is None:
            raise InputError(f"HPSv3 checkpoint {checkpoint} (option checkpoint=) has no model.embed_tokens.weight; "
                             "expected the state dict of the reference HPSv3 model")
        config.text_config.vocab_size = embed.shape[0]
        self.model = HPSv3Model(_build_vlm(config, vlm_state, self.dtype, str(checkpoint)),
                                self.processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN))
        try:
            self.model.head.load_state_dict(head_state)
        except RuntimeError as e:
            raise InputError(f"HPSv3 checkpoint {checkpoint} (option checkpoint=): its rm_head does not fit the "
                             f"reference head: {why(e)}") from None
        self.model.eval().requires_grad_(False).to(self.device)

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        return self.mu_sigma(images, prompts)[:, 0]

    def mu_sigma(self, images, prompts: list[str]) -> torch.Tensor:
        """(mu, sigma) [n, 2] of one chunk: the predicted preference score and the model's uncertainty."""
        from PIL import Image

        resized = []
        for image in to_pil(images):
            height, width = target_size(image.height, image.width, self.pixels)
            resized.append(image.resize((width, height), Image.BICUBIC))
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": self.instruction.replace("{text_prompt}", p)}]}],
            tokenize=False, add_generation_prompt=True) for p in prompts]
        inputs = self.processor(text=texts, images=resized, padding=True, return_tensors="pt")
        return self.model(inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device),
                          inputs["pixel_values"].to(self.device), inputs["image_grid_thw"].to(self.device))


def require_transformers(minimum: str, extra: str) -> None:
    """InputError naming ``pip install diffusion-dpo[extra]`` when transformers is older than ``minimum``."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(minimum):
        raise InputError(f"the {extra} scorer needs transformers >= {minimum} (found {transformers.__version__}): "
                         f"pip install diffusion-dpo[{extra}]")


def _read_checkpoint(path) -> dict[str, torch.Tensor]:
    """The tensors of an HPSv3 checkpoint (.safetensors, or a torch file, possibly under "model")."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        if not Path(path).expanduser().is_file():
            raise InputError(f"HPSv3 checkpoint {path} (option checkpoint=) does not exist")
        try:
            return load_file(str(Path(path).expanduser()), device="cpu")
        except (OSError, RuntimeError, ValueError) as e:
            raise InputError(f"HPSv3 checkpoint {path} (option checkpoint=) is not a readable safetensors file: "
                             f"{why(e)}") from None
    state = load_state_dict(path, option="checkpoint", what="HPSv3 checkpoint")
    return state["model"] if isinstance(state.get("model"), dict) else state


def _build_vlm(config, state: dict[str, torch.Tensor], dtype: torch.dtype, where: str):
    """A Qwen2VLForConditionalGeneration from ``config`` holding ``state``, its weights in ``dtype``; built
    without random initialisation (every weight is overwritten by the checkpoint)."""
    from transformers import Qwen2VLForConditionalGeneration

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            vlm = Qwen2VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    if "lm_head.weight" not in state and getattr(config, "tie_word_embeddings", False):
        state = {**state, "lm_head.weight": state["model.language_model.embed_tokens.weight"]}
    try:
        # assign: the checkpoint's tensors become the parameters, so a 7B model is not held twice.
        vlm.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise InputError(f"HPSv3 checkpoint {where} (option checkpoint=) does not fit the Qwen2-VL of option base=: "
                         f"{why(e)}") from None
    return vlm.to(dtype)
