"""Tiny Stable Diffusion pipelines and preference-pair sets built from configs, offline.

They have the exact layout of the real checkpoints (a diffusers pipeline folder with unet/, vae/,
text_encoder/, tokenizer/, scheduler/; SDXL adds text_encoder_2/ and tokenizer_2/; SD3 a transformer/ and
three text encoders, CLIP-L, CLIP-G and T5; FLUX.1 a transformer/, CLIP-L and T5) at a size that trains in
seconds on a CPU. The tests, the README's first command and the benchmarks use them.

    path = build_tiny_pipeline("tiny-sd")                    # SD1.5 layout, 32 px images, 16 px latents
    path = build_tiny_pipeline("tiny-sdxl", sdxl=True)       # SDXL layout (or family="sdxl")
    path = build_tiny_pipeline("tiny-sd3", family="sd3")     # SD3 layout, FlowMatchEulerDiscreteScheduler
    path = build_tiny_pipeline("tiny-flux", family="flux")   # FLUX.1-dev layout (guidance embedding)
    path = build_tiny_pipeline("tiny-flux2", family="flux2")  # FLUX.2-dev (or family="flux2_klein")
    path = build_tiny_pipeline("tiny-z-image", family="z_image")  # Z-Image layout (Qwen3 text encoder)
    path = build_tiny_pipeline("tiny-qwen-image", family="qwen_image")  # Qwen-Image (Qwen2.5-VL, video VAE)
    path = build_tiny_pipeline("tiny-wan", family="wan")       # Wan 2.1 T2V (UMT5, video VAE; or "wan_experts")
    write_tiny_pairs("pairs/", n_pairs=16)                # Pick-a-Pic schema parquet shard
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

# A vocabulary big enough for test prompts and for the demo world's prompts. Words outside it still
# tokenize (into single characters), so any prompt works.
DEFAULT_WORDS = (
    "a an the of on in with and photo painting anime concept art style picture image small large big tiny "
    "red green blue yellow orange purple pink white black gray grey brown cyan magenta circle square "
    "triangle background dog cat house tree car flower mountain city sky sea portrait landscape"
).split()

FLUX2_TINY = ("flux2", "flux2_klein")  # built by diffusion_dpo.tiny_flux2

# model.pretrained values that build a tiny pipeline, and its family
TINY = {"tiny": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux",
        "tiny-flux2": "flux2", "tiny-flux2-klein": "flux2_klein", "tiny-z-image": "z_image",
        "tiny-qwen-image": "qwen_image", "tiny-wan": "wan"}
# The chat template of the tiny Qwen tokenizers: Qwen's turns, and Qwen3's empty think block when a caller
# turns thinking off (ZImagePipeline turns it on, so none).
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
    "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def write_clip_tokenizer(path: str | Path, words: list[str] | tuple[str, ...] = DEFAULT_WORDS,
                         max_length: int = 16) -> Path:
    """Save a CLIPTokenizer whose BPE merges make each of ``words`` a single token.

    The merges are learned by the ``tokenizers`` BPE trainer on ``words``; the base vocabulary holds every
    printable ASCII character, alone and word-final (``x</w>``), so text outside ``words`` falls back to
    characters instead of an unknown token. The ids are canonical: the same in every process.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    alphabet = [chr(code) for code in range(33, 127)]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000, min_frequency=1, special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=alphabet, end_of_word_suffix="</w>", continuing_subword_prefix="", show_progress=False,
    )
    bpe.train_from_iterator([w.lower() for w in words], trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for char in alphabet:
        vocab.setdefault(char + "</w>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    # The trainer numbers single characters in a hash-set order that changes between processes; renumber
    # (special tokens, single characters sorted, merged tokens in merge order) so the same words give the
    # same ids in every process, and so the same weights for a seeded text encoder.
    specials = ["<|startoftext|>", "<|endoftext|>"]
    merged = list(dict.fromkeys("".join(m) for m in merges))
    singles = sorted(set(vocab) - set(specials) - set(merged))
    vocab = {token: i for i, token in enumerate(specials + singles + merged)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tokenizer.save_pretrained(str(path))
    return Path(path)


def write_t5_tokenizer(path: str | Path, words: list[str] | tuple[str, ...] = DEFAULT_WORDS,
                       max_length: int = 16) -> Path:
    """Save a T5 tokenizer (a SentencePiece-style Unigram) whose pieces are ``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2, the word-start marker, each of ``words`` as one piece and every lower-case letter and digit
    (so any text tokenizes); ``</s>`` is appended, as T5 tokenizes."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w.lower(), -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(str(path))
    return Path(path)


def write_qwen_tokenizer(path: str | Path, words: list[str] | tuple[str, ...] = DEFAULT_WORDS,
                         max_length: int = 64) -> Path:
    """Save a Qwen2 tokenizer (byte-level BPE) with Qwen's special tokens and a chat template. Its merges
    spell each of ``words`` and the chat roles left to right (so they take few tokens; any other text falls
    back to bytes) in a fixed order, so the vocabulary, and a seeded text encoder, is the same in every
    process."""
    from tokenizers import pre_tokenizers

    from diffusion_dpo.tiny_qwen_image import save_qwen_tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(alphabet)}
    merges = []
    for word in dict.fromkeys([w.lower() for w in words] + ["user", "assistant", "system"]):
        for spelled in (word, "\u0120" + word):  # the word, and the word after a space
            token = spelled[0]
            for char in spelled[1:]:
                if token + char not in vocab:
                    merges.append((token, char))
                    vocab[token + char] = len(vocab)
                token += char
    return save_qwen_tokenizer(vocab, merges, path, max_length, QWEN_CHAT_TEMPLATE)


def build_tiny_pipeline(
    path: str | Path,
    *,
    sdxl: bool = False,
    family: str | None = None,
    resolution: int = 32,
    prediction_type: str = "epsilon",
    words: list[str] | tuple[str, ...] = DEFAULT_WORDS,
    unet_channels: tuple[int, ...] = (32, 64),
    seed: int = 0,
) -> Path:
    """Write a randomly initialised pipeline folder of ``family`` ("sd", "sdxl", "sd3", "flux", "z_image",
    "flux2", "flux2_klein", "qwen_image", "wan" or "wan_experts" (Wan 2.2 A14B's two experts); default
    "sdxl" if ``sdxl`` else "sd") and return its path. The VAE downsamples by 2 (two blocks; Wan's by 4), so
    ``resolution`` px images have ``resolution // 2`` px latents. ``prediction_type`` and ``unet_channels``
    apply to the UNet families.
    """
    import torch
    from transformers import CLIPTokenizer

    family = family or ("sdxl" if sdxl else "sd")
    if family not in ("sd", "sdxl", "sd3", "flux", "z_image", "qwen_image", "wan", "wan_experts", *FLUX2_TINY):
        raise ValueError(f"build_tiny_pipeline: family {family!r}, expected sd, sdxl, sd3, flux, z_image, qwen_image, "
                         f"wan, wan_experts, "
                         f"{' or '.join(FLUX2_TINY)}")
    path = Path(path)
    torch.manual_seed(seed)
    if family in FLUX2_TINY:
        from diffusion_dpo.tiny_flux2 import tiny_flux2_pipeline

        tiny_flux2_pipeline(family, path, words, resolution).save_pretrained(str(path))
        return path
    if family == "z_image":
        return _save(_tiny_z_image_pipeline(path, words, resolution), path)
    if family == "qwen_image":
        from diffusion_dpo.tiny_qwen_image import tiny_qwen_image_pipeline

        return _save(tiny_qwen_image_pipeline(path, words), path)
    if family in ("wan", "wan_experts"):
        from diffusion_dpo.tiny_wan import tiny_wan_pipeline

        tokenizer = _t5_tokenizer(path / "_t5_tokenizer_build", words)
        return _save(tiny_wan_pipeline(tokenizer, experts=family == "wan_experts"), path)
    tok_dir = write_clip_tokenizer(path / "_tokenizer_build", words)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    text_config = dict(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=64,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length, projection_dim=32,
    )
    if family in ("sd", "sdxl"):
        pipe = _tiny_unet_pipeline(family, tokenizer, text_config, resolution, prediction_type, unet_channels)
    else:
        t5_tokenizer = _t5_tokenizer(path / "_t5_tokenizer_build", words)
        pipe = (_tiny_sd3_pipeline if family == "sd3" else _tiny_flux_pipeline)(
            tokenizer, t5_tokenizer, text_config, resolution)
    return _save(pipe, path)


def _save(pipe, path: Path) -> Path:
    """Save ``pipe`` to ``path`` and remove the tokenizer folders its builder wrote there."""
    pipe.save_pretrained(str(path))
    for folder in path.glob("_*tokenizer_build"):
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    return path


def _t5_tokenizer(folder: Path, words):
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(write_t5_tokenizer(folder, words)))


def _tiny_vae(resolution: int, **kwargs):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=resolution, **kwargs,
    )


def _tiny_unet_pipeline(family, tokenizer, text_config, resolution, prediction_type, unet_channels):
    """SD1.5 or SDXL layout. The modules are created in a fixed order, so a seed gives the same weights."""
    from diffusers import (
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    vae = _tiny_vae(resolution)
    unet_kwargs = dict(
        sample_size=resolution // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=unet_channels, norm_num_groups=16, attention_head_dim=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(unet_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(unet_channels) - 1) + ("UpBlock2D",),
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    if family == "sdxl":
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
        unet = UNet2DConditionModel(
            **unet_kwargs, cross_attention_dim=64, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
            transformer_layers_per_block=1,
        )
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
        )
    unet = UNet2DConditionModel(**unet_kwargs, cross_attention_dim=32)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _tiny_t5(t5_tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=d_model, d_ff=64, d_kv=8, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def _tiny_sd3_pipeline(tokenizer, t5_tokenizer, text_config, resolution):
    """SD3 layout: CLIP-L and CLIP-G with projection (32 + 32 wide: pooled 64), T5 80 wide (so the CLIP
    states are zero-padded as in the real model), a 4-channel VAE with SD3.5's shift and scale, shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    t5 = _tiny_t5(t5_tokenizer, 80)
    vae = _tiny_vae(resolution, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                    use_post_quant_conv=False)
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=80, caption_projection_dim=32,
        pooled_projection_dim=64, pos_embed_max_size=resolution // 2,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_l, tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )


def _tiny_flux_pipeline(tokenizer, t5_tokenizer, text_config, resolution):
    """FLUX.1-dev layout: CLIP-L (pooled 32), T5 48 wide, a 4-channel VAE with FLUX's shift and scale (so
    16 features per packed 2x2 token), a guidance embedding, and FLUX's resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    clip_l = CLIPTextModel(CLIPTextConfig(**text_config))
    t5 = _tiny_t5(t5_tokenizer, 48)
    vae = _tiny_vae(resolution, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                    use_post_quant_conv=False)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip_l, tokenizer=tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)


def _tiny_z_image_pipeline(path: Path, words, resolution):
    """Z-Image layout: a Qwen3 model 32 wide (3 layers: the pipeline reads the second-to-last), a 4-channel
    VAE with FLUX's shift and scale (Z-Image's VAE), a single-stream transformer over 2x2 patches with one
    refiner layer per stream, and Z-Image-Turbo's static shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3Model

    tokenizer = Qwen2TokenizerFast.from_pretrained(str(write_qwen_tokenizer(path / "_qwen_tokenizer_build", words)))
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id))
    vae = _tiny_vae(resolution, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                    use_post_quant_conv=False)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32])
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)


def _pattern_image(rng: random.Random, size: int, color: tuple[int, int, int]):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
    draw.ellipse([x0, y0, x0 + size // 2, y0 + size // 2], fill=color)
    return img


def encode_image(image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_tiny_pairs(path: str | Path, *, n_pairs: int = 16, size: int = 32, seed: int = 0,
                     n_ties: int = 0, shards: int = 1) -> Path:
    """Write ``n_pairs`` Pick-a-Pic-schema rows as parquet shards under folder ``path``.

    Winners are drawn with a red disc, losers with a blue one, so a model that learns the preference has
    something to learn. The winner is put in column 0 or 1 at random (label_0/label_1 say which); the last
    ``n_ties`` rows are ties (0.5/0.5).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    rows: dict[str, list] = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1")}
    subjects = ["circle", "dog", "house", "flower", "car", "tree"]
    for i in range(n_pairs):
        win = encode_image(_pattern_image(rng, size, (220, 30, 30)))
        lose = encode_image(_pattern_image(rng, size, (30, 30, 220)))
        tie = i >= n_pairs - n_ties
        swap = rng.random() < 0.5
        rows["caption"].append(f"a red {rng.choice(subjects)}")
        rows["jpg_0"].append(lose if swap else win)
        rows["jpg_1"].append(win if swap else lose)
        label_0 = 0.5 if tie else (0.0 if swap else 1.0)
        rows["label_0"].append(label_0)
        rows["label_1"].append(1.0 - label_0)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    table = pa.table(rows)
    per = -(-n_pairs // shards)
    for s in range(shards):
        pq.write_table(table.slice(s * per, per), path / f"train-{s:05d}-of-{shards:05d}.parquet")
    return path
