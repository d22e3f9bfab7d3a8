"""A tiny Qwen-Image pipeline (QwenImagePipeline), built from configs, offline, at a size that trains in seconds on
a CPU. ``tiny.build_tiny_pipeline(path, family="qwen_image")`` calls this.

The layout of Qwen/Qwen-Image: a Qwen2.5-VL model as text encoder (2 layers, 32 wide, a one-block vision
tower it never uses), a Qwen2 byte-level BPE tokenizer whose merges spell the prompt template's words, so
the template's system turn and user-turn start are 34 tokens as with Qwen's own tokenizer (the count the
pipeline drops), an AutoencoderKLQwenImage with one spatial halving and 4 latent channels whose
latents_mean / latents_std are set away from (0, 1) so the normalisation is exercised, a one-block
QwenImageTransformer2DModel over 2x2 patches, and Qwen-Image's scheduler settings (dynamic shift of the
packed length, exponential time shift, terminal sigma 0.02).
"""

from __future__ import annotations

import re
from pathlib import Path

from diffusion_dpo.families.qwen_image import PROMPT_TEMPLATE

LATENT_CHANNELS = 4


def template_words() -> tuple[str, ...]:
    """The words of the prompt template's system turn, as written (one token each in the tiny tokenizer)."""
    return tuple(dict.fromkeys(re.findall(r"[A-Za-z]+", PROMPT_TEMPLATE.split("<|im_end|>")[0])))


def _text_encoder(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id)  # Qwen2.5's <|endoftext|> and <|im_end|>
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **ids,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2], "rope_type": "default"})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))


def write_tokenizer(path: str | Path, words, max_length: int = 64) -> Path:
    """Save a Qwen2 tokenizer (byte-level BPE, Qwen's special tokens) in which each of the template's words
    (as written), the chat roles and each of ``words`` (lower-cased), alone or after a space, is one token:
    each word's merges are added until the BPE learned so far spells it whole, and a later merge never
    splits an earlier word. Any other text falls back to bytes. The order is fixed, so the vocabulary, and a
    seeded text encoder, is the same in every process."""
    from tokenizers import models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys([*template_words(), "system", "user", "assistant", *(w.lower() for w in words)]):
        for spelled in (word, "\u0120" + word):  # the word, and the word after a space
            while len(parts := [t.value for t in models.BPE(vocab=dict(vocab), merges=list(merges)).tokenize(
                    spelled)]) > 1:
                merges.append((parts[0], parts[1]))
                vocab.setdefault(parts[0] + parts[1], len(vocab))
    return save_qwen_tokenizer(vocab, merges, path, max_length)


def save_qwen_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], path: str | Path, max_length: int,
                        chat_template: str | None = None) -> Path:
    """A Qwen2 tokenizer over the byte-level BPE ``vocab`` / ``merges`` with Qwen's special tokens (and
    ``chat_template`` if given), saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, model_max_length=max_length, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None, bos_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(path))
    return Path(path)


def tiny_qwen_image_pipeline(path: Path, words):
    """A QwenImagePipeline with random weights (seed the global generator first); its tokenizer is written
    to ``path``/_qwen_tokenizer_build (``tiny._save`` removes it) and loaded back."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2TokenizerFast

    tokenizer = Qwen2TokenizerFast.from_pretrained(str(write_tokenizer(path / "_qwen_tokenizer_build", words)))
    text_encoder = _text_encoder(tokenizer)
    g = torch.Generator().manual_seed(1)
    mean = (torch.rand(LATENT_CHANNELS, generator=g) - 0.5).tolist()
    std = (torch.rand(LATENT_CHANNELS, generator=g) * 1.5 + 0.5).tolist()
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=LATENT_CHANNELS, dim_mult=[1, 2], num_res_blocks=1,
                                 temperal_downsample=[False], latents_mean=mean, latents_std=std)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
