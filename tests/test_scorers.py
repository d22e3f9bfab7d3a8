"""Scorers against their formulas, computed directly with transformers / open_clip on the same tiny random
weights; HPS preprocessing against a hand-built reference; batch-size invariance; bad inputs; JPEG sizes;
the combo; offline errors. Tiny models are built from configs here, never downloaded."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_dpo.errors import InputError
from scorers import load_scorer
from scorers.base import to_rgb

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
PROMPTS = ["a red dog", "a blue circle on a white background", "photo", "a big green tree in the city sky",
           "cat"]


def _image(seed: int, width: int, height: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


@pytest.fixture(scope="module")
def images():
    """Five images of different sizes and aspect ratios, all RGB."""
    return [_image(i, w, h) for i, (w, h) in enumerate([(32, 32), (48, 20), (20, 48), (64, 64), (33, 40)])]


# ------------------------------------------------------------------------------------- tiny model builders


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A transformers CLIP folder (model + CLIPProcessor: 32 px images, 16-token tokenizer), 16-d embeddings."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from diffusion_dpo.tiny import write_clip_tokenizer

    path = tmp_path_factory.mktemp("tiny_clip")
    write_clip_tokenizer(path, max_length=16)
    tok = CLIPTokenizer.from_pretrained(str(path))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=3.0,
    )
    CLIPModel(config).save_pretrained(str(path))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    """An open_clip model-config JSON (32 px ViT, 16-token text tower) and a random checkpoint saved the way
    HPS ships its weights: {"state_dict": ...}."""
    import open_clip

    path = tmp_path_factory.mktemp("tiny_hps")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
    (path / "tiny-vit.json").write_text(json.dumps(cfg))
    torch.manual_seed(1)
    model = open_clip.CLIP(**cfg).eval()
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path / "hps.pt")
    torch.save(model.state_dict(), path / "bare.pt")
    return {"arch": str(path / "tiny-vit.json"), "checkpoint": str(path / "hps.pt"), "bare": str(path / "bare.pt"),
            "model": model, "tokenizer": open_clip.tokenizer.SimpleTokenizer(context_length=16)}


@pytest.fixture(scope="module")
def tiny_aesthetic(tmp_path_factory):
    """Random head weights for 16-d embeddings, saved as a plain state dict like the published .pth."""
    from scorers.aesthetic import AestheticMLP

    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("tiny_aesthetic") / "head.pth"
    torch.save(AestheticMLP(16).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def scorers(tiny_clip, tiny_hps, tiny_aesthetic):
    """Factories for every tiny scorer, by registry name, taking extra options."""
    return {
        "pickscore": lambda **o: load_scorer("pickscore", model=tiny_clip, processor=tiny_clip, **o),
        "clip": lambda **o: load_scorer("clip", model=tiny_clip, **o),
        "aesthetic": lambda **o: load_scorer("aesthetic", weights=tiny_aesthetic, clip_model=tiny_clip, **o),
        "hpsv2": lambda **o: load_scorer("hpsv2", arch=tiny_hps["arch"], checkpoint=tiny_hps["checkpoint"], **o),
        "jpeg_incompressibility": lambda **o: load_scorer("jpeg_incompressibility", **o),
    }


# --------------------------------------------------------------------------- formulas, library-direct


def _clip_reference(model_dir, images, prompts):
    """Normalised image and text embeddings and logit scale, straight from transformers."""
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(model_dir)
    model = CLIPModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        text = processor.tokenizer(prompts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        image_embeds = model.get_image_features(pixel_values=pixels).pooler_output
        text_embeds = model.get_text_features(**text).pooler_output
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return image_embeds, text_embeds, model.logit_scale.exp().item()


def test_pickscore_is_scaled_cosine_and_probabilities_softmax(scorers, tiny_clip, images):
    """PickScore = exp(logit_scale) * cos(image, text); exp(3.0) = 20.09 is the tiny model's scale."""
    scorer = scorers["pickscore"](batch_size=2)
    image_embeds, text_embeds, scale = _clip_reference(tiny_clip, images, PROMPTS)
    assert scale == pytest.approx(np.exp(3.0), rel=1e-6)
    expected = scale * (image_embeds * text_embeds).sum(-1)
    got = scorer.score(images, PROMPTS)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (5,)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    # Probabilities for one prompt: softmax over the set, summing to 1, ordered like the scores.
    probs = scorer.probabilities(images, PROMPTS[0])
    one_prompt = scale * (image_embeds * text_embeds[0]).sum(-1)
    torch.testing.assert_close(probs, torch.softmax(one_prompt, 0), atol=1e-5, rtol=1e-5)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_clip_score_is_100_times_clamped_cosine(scorers, tiny_clip, images):
    scorer = scorers["clip"](batch_size=3)
    image_embeds, text_embeds, _ = _clip_reference(tiny_clip, images, PROMPTS)
    cosine = (image_embeds * text_embeds).sum(-1)
    torch.testing.assert_close(scorer.score(images, PROMPTS), 100 * cosine.clamp(min=0), atol=1e-3, rtol=1e-5)


def test_aesthetic_is_affine_head_on_normalised_embedding(scorers, tiny_clip, tiny_aesthetic, images):
    """The published head: five Linear layers at Sequential indices 0, 2, 4, 6, 7, no activations."""
    state = torch.load(tiny_aesthetic, weights_only=True)
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    image_embeds, _, _ = _clip_reference(tiny_clip, images, PROMPTS)
    x = image_embeds
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    scorer = scorers["aesthetic"](batch_size=2)
    torch.testing.assert_close(scorer.score(images), x.squeeze(-1), atol=1e-5, rtol=1e-5)


def _hps_pad_reference(image: Image.Image, size: int) -> torch.Tensor:
    """Hand-built HPS input before normalisation: bicubic resize of the longest side to ``size``, pasted on
    a black square at (pad // 2) from the left/top."""
    w, h = image.size
    scale = size / max(w, h)
    new_w, new_h = round(w * scale), round(h * scale)
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = np.asarray(image.resize((new_w, new_h), Image.BICUBIC)) / 255.0
    return torch.from_numpy(canvas).permute(2, 0, 1)


def test_hps_preprocessing_pads_taller_and_wider_images(scorers):
    """19x40 (taller): scale 32/40 = 0.8, new width round(15.2) = 15, padding 17 = 8 left + 9 right.
    40x19 (wider): the same transposed, 8 rows on top, 9 below. 32x20: longest side already 32, still
    padded to a square (6 rows above, 6 below). Padding is black: (0 - mean) / std after normalisation."""
    scorer = scorers["hpsv2"]()
    tall, wide, exact = _image(10, 19, 40), _image(11, 40, 19), _image(12, 32, 20)
    pixels = scorer.preprocess([tall, wide, exact])
    assert pixels.shape == (3, 3, 32, 32)
    assert scorer.preprocess([_image(13, 300, 1)]).shape == (1, 3, 32, 32)   # a 1-px strip keeps one row
    black = (-CLIP_MEAN / CLIP_STD).expand(3, 32, 32)
    for got, image in zip(pixels, [tall, wide, exact]):
        torch.testing.assert_close(got, (_hps_pad_reference(image, 32) - CLIP_MEAN) / CLIP_STD, atol=1e-6, rtol=0)
    torch.testing.assert_close(pixels[0][:, :, :8], black[:, :, :8])      # 8 black columns on the left
    torch.testing.assert_close(pixels[0][:, :, 23:], black[:, :, 23:])    # 9 on the right (15 image columns)
    assert not torch.allclose(pixels[0][:, :, 8], black[:, :, 8])
    torch.testing.assert_close(pixels[1][:, :8, :], black[:, :8, :])
    torch.testing.assert_close(pixels[1][:, 23:, :], black[:, 23:, :])
    torch.testing.assert_close(pixels[2][:, :6, :], black[:, :6, :])
    torch.testing.assert_close(pixels[2][:, 26:, :], black[:, 26:, :])
    # The exact-size image is not resampled: its pixels pass through unchanged.
    torch.testing.assert_close(pixels[2][:, 6:26, :] * CLIP_STD + CLIP_MEAN,
                               torch.from_numpy(np.asarray(exact) / 255.0).float().permute(2, 0, 1), atol=1e-6, rtol=0)


def test_hps_is_cosine_of_open_clip_features(scorers, tiny_hps, images):
    model, tokenizer = tiny_hps["model"], tiny_hps["tokenizer"]
    pixels = torch.stack([(_hps_pad_reference(im, 32) - CLIP_MEAN) / CLIP_STD for im in images])
    with torch.no_grad():
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokenizer(PROMPTS), normalize=True)
    expected = torch.diagonal(image_features @ text_features.T)   # the authors' formula
    scorer = scorers["hpsv2"](batch_size=2)
    assert scorer.report_scale == 100.0
    torch.testing.assert_close(scorer.score(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    # A bare state dict (no "state_dict" key) and hpsv2.1 (same formula) load the same weights.
    bare = load_scorer("hpsv2.1", arch=tiny_hps["arch"], checkpoint=tiny_hps["bare"])
    torch.testing.assert_close(bare.score(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)


def test_hps_bad_arch_and_checkpoint(tiny_hps, tmp_path):
    with pytest.raises(InputError, match="neither an open_clip model name"):
        load_scorer("hpsv2", arch="ViT-Nonsense-99", checkpoint=tiny_hps["checkpoint"])
    with pytest.raises(InputError, match="does not exist"):
        load_scorer("hpsv2", arch=str(tmp_path / "missing.json"), checkpoint=tiny_hps["checkpoint"])
    other = json.loads(open(tiny_hps["arch"]).read())
    other["embed_dim"] = 8
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(InputError, match="does not fit open_clip model"):
        load_scorer("hpsv2", arch=str(tmp_path / "other.json"), checkpoint=tiny_hps["checkpoint"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable torch checkpoint"):
        load_scorer("hpsv2", arch=tiny_hps["arch"], checkpoint=str(tmp_path / "junk.pt"))


# ------------------------------------------------------------------------------------ shared behaviour


@pytest.mark.parametrize("name", ["pickscore", "clip", "aesthetic", "hpsv2", "jpeg_incompressibility"])
def test_batch_size_invariance_and_tensor_input(scorers, name, images):
    """Batches of 1 and of 4 (prompts of different lengths, so different padding) give the same scores;
    a float tensor scores like the PIL images it rounds to."""
    one, four = scorers[name](batch_size=1), scorers[name](batch_size=4)
    torch.testing.assert_close(one.score(images, PROMPTS), four.score(images, PROMPTS), atol=1e-5, rtol=1e-5)
    torch.manual_seed(3)
    tensor = torch.rand(3, 3, 24, 40)
    rounded = [Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for t in tensor]
    torch.testing.assert_close(four.score(tensor, PROMPTS[:3]), four.score(rounded, PROMPTS[:3]), atol=1e-5,
                               rtol=1e-5)


def test_single_prompt_is_broadcast(scorers, images):
    scorer = scorers["pickscore"]()
    torch.testing.assert_close(scorer.score(images, "a red dog"), scorer.score(images, ["a red dog"] * 5))


@pytest.mark.parametrize("images, prompts, message", [
    (torch.rand(2, 3, 8, 8) * 2, None, r"span \[.*\]; expected \[0, 1\]"),
    (-torch.rand(2, 3, 8, 8), None, r"expected \[0, 1\]"),
    (torch.rand(3, 8, 8), None, r"shape \(3, 8, 8\); expected \[N, 3, H, W\]"),
    (torch.rand(2, 1, 8, 8), None, r"expected \[N, 3, H, W\]"),
    (torch.rand(0, 3, 8, 8), None, "empty"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), None, "divide uint8 pixels by 255"),
    (torch.full((1, 3, 8, 8), float("nan")), None, "NaN"),
    ([], None, "empty"),
    ([np.zeros((8, 8, 3))], None, "image 0 is a ndarray"),
    ("cat.png", None, "got str"),
    ([Image.new("RGB", (8, 8))] * 3, ["a", "b"], "got 2 prompts for 3 images"),
    ([Image.new("RGB", (8, 8))], [3], "prompt 0 is a int"),
    ([Image.new("F", (8, 8))], None, "mode F"),
])
def test_bad_inputs_raise_input_error(scorers, images, prompts, message):
    with pytest.raises(InputError, match=message):
        scorers["jpeg_incompressibility"]().score(images, prompts)


def test_prompts_required_and_bad_options(scorers, images):
    with pytest.raises(InputError, match="needs a prompt"):
        scorers["hpsv2"]().score(images)
    with pytest.raises(InputError, match="batch_size=0"):
        load_scorer("jpeg_compressibility", batch_size=0)
    with pytest.raises(InputError, match="dtype='int8'"):
        load_scorer("jpeg_compressibility", dtype="int8")
    with pytest.raises(InputError, match="unknown scorer"):
        load_scorer("no_such_scorer")


def test_modes_become_rgb():
    """Transparent pixels: white under alpha="white" (transformers' rule), the stored colour under "drop"
    (PIL convert, open_clip's rule). 16-bit gray 40000 -> 40000 / 257 = 155.6 -> 156."""
    rgba = Image.new("RGBA", (2, 2), (200, 10, 10, 0))
    assert to_rgb(rgba, "white").getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(rgba, "drop").getpixel((0, 0)) == (200, 10, 10)
    half = Image.new("LA", (2, 2), (0, 128))
    assert to_rgb(half, "white").getpixel((0, 0)) == (127, 127, 127)
    gray16 = Image.fromarray(np.full((2, 2), 40000, dtype=np.uint16))
    assert gray16.mode.startswith("I;16") and to_rgb(gray16).getpixel((0, 0)) == (156, 156, 156)
    for mode in ("L", "P", "1", "CMYK", "PA", "LAB"):
        assert to_rgb(Image.new("RGB", (3, 5), (30, 60, 90)).convert(mode)).mode == "RGB"


def test_any_mode_scores_like_its_rgb(scorers):
    """A palette image scores like its RGB conversion; RGBA with opaque alpha like the RGB image."""
    scorer = scorers["pickscore"]()
    base = _image(5, 30, 20)
    opaque = base.convert("RGBA")
    palette = base.convert("P")
    got = scorer.score([base, opaque, palette, palette.convert("RGB")], "a dog")
    assert got[0] == pytest.approx(got[1].item(), abs=1e-5)
    assert got[2] == pytest.approx(got[3].item(), abs=1e-5)


# ------------------------------------------------------------------------------------------------ JPEG


def _jpeg_kb(image: Image.Image) -> float:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return len(buf.getvalue()) / 1000


def test_jpeg_scores_are_signed_kilobytes(images):
    """Noise compresses badly, a flat image well: sizes from an independent encode, in kB of 1000 bytes."""
    flat = Image.new("RGB", (64, 64), (120, 130, 140))
    batch = images + [flat]
    sizes = torch.tensor([_jpeg_kb(im) for im in batch])
    incompressible = load_scorer("jpeg_incompressibility", batch_size=2).score(batch)
    compressible = load_scorer("jpeg_compressibility").score(batch, "prompts are ignored")
    torch.testing.assert_close(incompressible, sizes)
    assert not incompressible.is_inference()   # callers may modify the result in place
    torch.testing.assert_close(compressible, -sizes)
    assert incompressible[3] > 5 * incompressible[5]   # 64x64 noise vs 64x64 flat colour


# ----------------------------------------------------------------------------------------------- combo


def test_combo_is_weighted_sum(tiny_hps, images):
    parts = {"jpeg_incompressibility": 2.0, "hpsv2": -0.5}
    combo = load_scorer("combo", parts=parts, options={"hpsv2": {"arch": tiny_hps["arch"],
                                                                 "checkpoint": tiny_hps["checkpoint"]}},
                        batch_size=2, device="cpu")
    jpeg = load_scorer("jpeg_incompressibility").score(images)
    hps = load_scorer("hpsv2", arch=tiny_hps["arch"], checkpoint=tiny_hps["checkpoint"]).score(images, PROMPTS)
    got = combo.score(images, PROMPTS)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, 2.0 * jpeg - 0.5 * hps, atol=1e-5, rtol=1e-6)
    separate = combo.score_parts(images, PROMPTS)
    torch.testing.assert_close(separate["hpsv2"], hps, atol=1e-6, rtol=1e-6)
    assert all(scorer.batch_size == 2 for _, _, scorer in combo.parts)
    with pytest.raises(InputError, match="needs a prompt"):
        combo.score(images)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs parts"),
    ({"parts": {"jpeg_compressibility": "high"}}, "expected a finite number"),
    ({"parts": {"no_such_scorer": 1.0}}, "unknown scorer"),
    ({"parts": {"jpeg_compressibility": 1.0}, "options": {"pickscore": {}}}, "not among parts"),
    ({"parts": {"jpeg_compressibility": 1.0}, "model": "x"}, "unknown option"),
])
def test_combo_bad_options(kwargs, message):
    with pytest.raises(InputError, match=message):
        load_scorer("combo", **kwargs)


# --------------------------------------------------------------------------------- missing weights offline


def test_offline_missing_weights_name_the_hub_id_and_option(monkeypatch, tiny_clip, tiny_hps):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"nobody-xyz/no-such-model.*model=PATH") as err:
        load_scorer("pickscore", model="nobody-xyz/no-such-model", processor=tiny_clip)
    assert "HF_HUB_OFFLINE" in str(err.value) and "Traceback" not in str(err.value)
    with pytest.raises(InputError, match=r"nobody-xyz/no-such-processor.*processor=PATH"):
        load_scorer("pickscore", model=tiny_clip, processor="nobody-xyz/no-such-processor")
    with pytest.raises(InputError, match=r"xswu/HPSv2/HPS_v2\.1_compressed\.pt.*checkpoint=PATH"):
        load_scorer("hpsv2.1", arch=tiny_hps["arch"])
    with pytest.raises(InputError, match=r"trl-lib/ddpo-aesthetic-predictor/aesthetic-model\.pth.*weights=PATH"):
        load_scorer("aesthetic", clip_model=tiny_clip)
    with pytest.raises(InputError, match=r"openai/clip-vit-large-patch14.*model=PATH"):
        load_scorer("clip")
    with pytest.raises(InputError, match="local folder ./no/such/folder"):
        load_scorer("clip", model="./no/such/folder")


def test_unreachable_hub_fails_fast_with_the_option(monkeypatch, tiny_hps):
    """No HF_HUB_OFFLINE, but the hub's host refuses connections (port 9 on this machine): one probe, then
    the error, instead of minutes of retries inside the hub client."""
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(InputError, match=r"xswu/HPSv2/HPS_v2_compressed\.pt.*127\.0\.0\.1.*cannot be reached.*"
                                         r"checkpoint=PATH"):
        load_scorer("hpsv2", arch=tiny_hps["arch"])
