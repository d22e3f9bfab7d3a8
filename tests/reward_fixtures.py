"""Deterministic tiny inputs for the reward-model parity tests, shared with the script that produced the
reference numbers (scripts/imagereward_reference.py, run against the `image-reward` package).

Everything here is made from fixed seeds with torch's CPU generator and numpy's PCG64, so the test and
the script build the same weights, vocabulary and images without storing them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

WORDS = ["a", "red", "blue", "green", "cat", "dog", "fox", "on", "the", "in", "snow", "grass", "photo", "of",
         "painting", "small", "large", "sitting", "table", "under"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PROMPTS = ["a photo of a red fox in the snow", "a painting of a small blue cat",
           "a large green dog sitting under the table"]

# The tiny BLIP text encoder (BERT with cross-attention); encoder_width is set from the ViT.
TINY_MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 4,
    "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(SPECIAL) + len(WORDS) + 2,
    "encoder_width": 48, "add_cross_attention": True,
}
TINY_VIT = {"embed_dim": 48, "depth": 2, "num_heads": 4, "patch_size": 32, "img_size": 224}


def write_bert_vocab(folder: str | Path) -> Path:
    """A word-piece vocabulary (special tokens + :data:`WORDS`) a BertTokenizer loads from ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                              "do_lower_case": True}))
    return folder


def seeded_state(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for ``shapes`` (name -> shape): norms' weights near 1, everything else N(0, 0.1^2)
    (the MLP head's first layer smaller, so the 1024-wide sum stays of order one)."""
    state = {}
    for index, (name, shape) in enumerate(sorted(shapes.items())):
        generator = torch.Generator().manual_seed(seed * 100_003 + index)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        is_norm_weight = name.endswith("weight") and ("norm" in name.lower()) and len(shape) == 1
        state[name] = 1.0 + 0.1 * noise if is_norm_weight else 0.1 * noise
    return state


def tiny_images() -> list:
    """Three RGB images of different sizes and aspect ratios (smooth gradients plus noise)."""
    from PIL import Image

    rng = np.random.default_rng(7)
    images = []
    for height, width in [(240, 320), (256, 256), (300, 200)]:
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
        pixels = np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, mode="RGB"))
    return images


QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ ' ' + m['role'] + ' ' }}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ ' ' + c['text'] + ' ' }}"
    "{% endif %}{% endfor %}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def tiny_qwen2_vl_processor(words: list[str] | None = None, max_pixels: int = 56 * 56):
    """A Qwen2-VL processor for tiny models: a word-level tokenizer with Qwen's image tokens (pad 0, eos 1),
    images resized to at most ``max_pixels`` pixels. Builds under transformers 4 (the reference scripts'
    environment) and 5."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + QWEN_SPECIAL + (words or WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # transformers 4's Qwen2-VL processor accepts only Qwen2 tokenizer classes; 5 takes any.
    cls = transformers.PreTrainedTokenizerFast if hasattr(transformers, "Qwen2VLVideoProcessor") else \
        transformers.Qwen2TokenizerFast
    tokenizer = cls(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                     unk_token="<unk>", additional_special_tokens=QWEN_SPECIAL)
    parts = {"image_processor": transformers.Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=max_pixels),
             "tokenizer": tokenizer}
    if hasattr(transformers, "Qwen2VLVideoProcessor"):  # transformers 5 requires one
        parts["video_processor"] = transformers.Qwen2VLVideoProcessor()
    return transformers.Qwen2VLProcessor(**parts, chat_template=QWEN_CHAT_TEMPLATE)


TINY_QWEN_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "num_key_value_heads": 1, "max_position_embeddings": 1024}
TINY_QWEN_VISION = {"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "patch_size": 14,
                    "spatial_merge_size": 2, "temporal_patch_size": 2}


def tiny_qwen2_vl_config(tokenizer, vocab_size: int | None = None):
    """The tiny Qwen2-VL config (transformers 5 layout) for ``tokenizer``'s special tokens."""
    from transformers import Qwen2VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL}
    eos = tokenizer.convert_tokens_to_ids("<eos>")
    text = {**TINY_QWEN_TEXT, "vocab_size": vocab_size or len(tokenizer), "bos_token_id": eos, "eos_token_id": eos,
            "pad_token_id": 0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    return Qwen2VLConfig(text_config=text, vision_config=TINY_QWEN_VISION, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"])


def write_tiny_qwen2_vl(folder: str | Path, words: list[str] | None = None, seed: int = 0,
                        max_pixels: int = 56 * 56, with_model: bool = True) -> Path:
    """The tiny processor and config (and, with ``with_model``, a random-weight Qwen2-VL: one vision block,
    one text layer, width 32) saved to ``folder`` for ``from_pretrained``."""
    from transformers import Qwen2VLForConditionalGeneration

    folder = Path(folder)
    processor = tiny_qwen2_vl_processor(words, max_pixels)
    processor.save_pretrained(str(folder))
    config = tiny_qwen2_vl_config(processor.tokenizer)
    config.save_pretrained(str(folder))
    if with_model:
        torch.manual_seed(seed)
        Qwen2VLForConditionalGeneration(config).save_pretrained(str(folder))
    return folder
