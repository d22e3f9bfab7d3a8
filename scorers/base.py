"""What every scorer shares: input checks, batching, devices and precision, loading weights offline or not.

A scorer subclasses :class:`Scorer` and implements one method::

    class MyScorer(Scorer):
        def _score_batch(self, images, prompts):   # images: list[PIL RGB] or float tensor [n, 3, H, W] in [0, 1]
            return torch.tensor([...])             # [n], any float dtype and device

:meth:`Scorer.score` checks the input (PIL images of any size and mode, or a float tensor [N, 3, H, W] in
[0, 1]; one prompt per image or a single prompt for all), cuts it into ``batch_size`` chunks, runs each
under ``torch.inference_mode`` (and autocast when ``dtype`` is bf16/fp16) and returns float32 scores on
the CPU. A chunk holds either PIL images (already RGB) or a slice of the caller's tensor, whichever the
caller passed; :func:`to_pil` and :func:`to_uint8` turn either form into the one a model's preprocessing
wants, so a tensor and the PIL images it rounds to get the same score.
"""

from __future__ import annotations

import pickle
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch

from scorers.errors import InputError

# Re-exported for the scorers, which import them from here; they live in scorers.hub, shared with diffusion_dpo.
from scorers.hub import hub_file as hub_file
from scorers.hub import hub_offline as hub_offline
from scorers.hub import load_pretrained as load_pretrained
from scorers.hub import why

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# PIL modes whose last band is an alpha channel ("LAB" has an "A" band that is a colour, not alpha).
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device; None means the GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device={device!r} is not a torch device (expected e.g. cpu, cuda, cuda:1): {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={device} was asked for, but torch sees no CUDA GPU here")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The autocast precision: None means bf16 on a GPU and fp32 on the CPU (where bf16 is slow)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif str(dtype).lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    raise InputError(f"dtype={dtype!r}: expected one of float32, bfloat16, float16 (or fp32, bf16, fp16)")


class Scorer:
    """Base of every scorer: ``score(images, prompts) -> float32 tensor [N] on the CPU``.

    Options every scorer takes: ``device`` (default: cuda when available, else cpu), ``dtype`` (autocast
    precision; default bf16 on a GPU, fp32 on the CPU; weights stay fp32), ``batch_size`` (images per
    forward pass; results do not depend on it beyond float rounding).
    """

    #: registry name, used in messages
    name = "scorer"
    #: whether :meth:`score` requires prompts (the JPEG scorers look at pixels only)
    needs_prompts = True
    #: how transparent pixels become RGB: "white" composites them on white (what transformers' CLIP
    #: processors do), "drop" discards the alpha channel (PIL's ``convert("RGB")``, what open_clip does)
    alpha = "white"
    #: reports show ``score * report_scale`` (HPS: x100, as the HPSv2 benchmark prints it)
    report_scale = 1.0

    def __init__(self, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 batch_size: int = 32):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r}: expected a positive integer (images per forward pass)")
        self.batch_size = batch_size

    def score(self, images, prompts: str | Sequence[str] | None = None, *, progress: bool = False) -> torch.Tensor:
        """One score per image: float32 tensor [N] on the CPU.

        ``images``: a list of PIL images (any size; any mode but the range-less "I" and "F") or a float
        tensor [N, 3, H, W] in [0, 1]. ``prompts``: one string per image, or one string for all.
        ``progress``: show a tqdm bar with images/s.
        """
        batch = check_images(images)
        prompts = check_prompts(prompts, len(batch), self.needs_prompts, self.name)
        starts = range(0, len(batch), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(batch), unit="img", desc=f"scoring ({self.name})")
        out = []
        with torch.inference_mode(), self.autocast():
            for start in starts:
                chunk = batch[start:start + self.batch_size]
                if isinstance(chunk, list):
                    chunk = [to_rgb(image, self.alpha, f"image {start + i}") for i, image in enumerate(chunk)]
                scores = self._score_batch(chunk, prompts[start:start + self.batch_size])
                if scores.shape != (len(chunk),):
                    raise RuntimeError(f"{type(self).__name__}._score_batch returned shape {tuple(scores.shape)} "
                                       f"for {len(chunk)} images; expected ({len(chunk)},)")
                out.append(scores.detach().float().cpu())
                if progress:
                    bar.update(len(chunk))
        if progress:
            bar.close()
        return torch.cat(out)

    def _score_batch(self, images: list | torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores [n] of one chunk: ``images`` is a list of n PIL RGB images or a float tensor [n, 3, H, W]
        in [0, 1] (on the caller's device); ``prompts`` has n strings. Runs inside inference mode and
        :meth:`autocast`."""
        raise NotImplementedError  # abstract

    def autocast(self):
        """Mixed precision for the forward passes: autocast to ``dtype`` unless it is fp32."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, dtype={self.dtype}, batch_size={self.batch_size})"


# ----------------------------------------------------------------------------------------------- inputs


def check_images(images) -> list | torch.Tensor:
    """Validate ``images``: a non-empty list of PIL images (a single image counts as a list of one) or a
    float tensor [N, 3, H, W] with values in [0, 1]. Returns the list or the tensor unchanged."""
    from PIL import Image

    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        if not images.is_floating_point():
            hint = " (divide uint8 pixels by 255)" if images.dtype == torch.uint8 else ""
            raise InputError(f"image tensor has dtype {images.dtype}; expected a float tensor in [0, 1]{hint}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"image tensor has shape {tuple(images.shape)}; expected [N, 3, H, W] (RGB, channels "
                             "first)")
        if images.shape[0] == 0:
            raise InputError("no images to score: the image tensor is empty (N = 0)")
        if images.shape[2] == 0 or images.shape[3] == 0:
            raise InputError(f"image tensor has shape {tuple(images.shape)}: height and width must be positive")
        if not torch.isfinite(images).all():
            raise InputError("image tensor holds NaN or infinite values; expected values in [0, 1]")
        low, high = images.min().item(), images.max().item()
        if low < 0.0 or high > 1.0:
            raise InputError(f"image tensor values span [{low:.4g}, {high:.4g}]; expected [0, 1] (images from "
                             "[-1, 1] need (x + 1) / 2)")
        return images
    if not isinstance(images, (list, tuple)):
        raise InputError(f"images must be a list of PIL images or a float tensor [N, 3, H, W]; got "
                         f"{type(images).__name__}")
    if not images:
        raise InputError("no images to score: the image list is empty")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise InputError(f"image {i} is a {type(image).__name__}; expected a PIL image (or pass a float "
                             "tensor [N, 3, H, W] for all images)")
        if image.width == 0 or image.height == 0:
            raise InputError(f"image {i} has size {image.width}x{image.height}; expected a non-empty image")
    return list(images)


def check_prompts(prompts, n: int, required: bool, scorer: str) -> list[str]:
    """``prompts`` as a list of ``n`` strings: a single string is used for every image."""
    if prompts is None:
        if required:
            raise InputError(f"scorer {scorer} needs a prompt per image (or one prompt for all); got none")
        return [""] * n
    if isinstance(prompts, str):
        return [prompts] * n
    if not isinstance(prompts, (list, tuple)):
        raise InputError(f"prompts must be a string or a list of strings; got {type(prompts).__name__}")
    if len(prompts) != n:
        raise InputError(f"got {len(prompts)} prompts for {n} images; give one prompt per image or a single "
                         "string for all")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InputError(f"prompt {i} is a {type(prompt).__name__}; expected a string")
    return list(prompts)


def to_rgb(image, alpha: str = "white", where: str = "image"):
    """A PIL image as RGB. Transparent pixels are composited on white (``alpha="white"``) or the alpha
    channel is dropped (``"drop"``); 16-bit grayscale is scaled to 8 bits. Modes "I" and "F" (32-bit
    integer and float pixels) have no defined range and are rejected."""
    import numpy as np
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        # 0..65535 -> 0..255 (PIL's own convert would clip everything above 255 to white).
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.round(pixels).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        raise InputError(f"{where} has PIL mode {image.mode} (32-bit pixels without a defined range); convert "
                         "it to an 8-bit mode (L or RGB) first")
    has_alpha = image.mode in _ALPHA_MODES or (image.mode in ("P", "L", "RGB") and "transparency" in image.info)
    if has_alpha and alpha == "white":
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_uint8(images, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """A chunk (PIL RGB list or float tensor [n, 3, H, W] in [0, 1]) as uint8 tensors [3, H, W].

    Floats are rounded to the nearest of the 256 levels, as saving the image would do, so a tensor and
    the PIL images made from it give the same pixels.
    """
    import numpy as np

    if isinstance(images, torch.Tensor):
        pixels = (images.to(device=device, dtype=torch.float32) * 255).round().clamp(0, 255).to(torch.uint8)
        return list(pixels.unbind(0))
    return [torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous().to(device)
            for image in images]


def to_pil(images) -> list:
    """A chunk (PIL RGB list or float tensor [n, 3, H, W] in [0, 1]) as PIL RGB images (floats rounded)."""
    from PIL import Image

    if isinstance(images, torch.Tensor):
        return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy(), mode="RGB") for p in to_uint8(images, "cpu")]
    return list(images)


# ------------------------------------------------------------------------------------------------ weights


def load_state_dict(path: str | Path, *, option: str, what: str) -> dict[str, Any]:
    """The tensors of a torch checkpoint file (loaded with ``weights_only=True``, on the CPU)."""
    path = Path(path).expanduser()
    if not path.is_file():
        problem = "is a folder; expected a file" if path.is_dir() else "does not exist"
        raise InputError(f"{what} file {path} (option {option}=) {problem}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise InputError(f"{what} file {path} (option {option}=) is not a readable torch checkpoint: {why(e)}") from None
    if not isinstance(state, dict):
        raise InputError(f"{what} file {path} (option {option}=) holds a {type(state).__name__}; expected a dict "
                         "of tensors (a state dict)")
    return state


# ------------------------------------------------------------------------------- transformers CLIP models


def clip_pixel_values(image_processor, images, device: torch.device) -> torch.Tensor:
    """A chunk through a transformers CLIP image processor: pixel_values [n, 3, S, S] on ``device``.

    Tensors go in as the uint8 pixels they round to, so they take exactly the path a PIL image takes
    (the processor's own resize, crop and normalisation, on ``device`` for the torchvision backend).
    """
    on_device = getattr(image_processor, "backend", None) == "torchvision"  # the PIL backend works on the CPU
    pixels = images if isinstance(images, list) else to_uint8(images, device if on_device else "cpu")
    kwargs = {"device": device} if on_device else {}
    out = image_processor(images=pixels, return_tensors="pt", **kwargs)
    return out["pixel_values"].to(device)


def clip_text_inputs(tokenizer, prompts: list[str], model, device: torch.device) -> dict[str, torch.Tensor]:
    """Token ids and attention mask for ``prompts``, padded to the longest and truncated to the text
    model's context (77 tokens for CLIP), as the PickScore authors call the processor."""
    max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}


def clip_embeddings(model, pixel_values: torch.Tensor | None = None, text: dict | None = None) -> torch.Tensor:
    """L2-normalised float32 image (or text) embeddings [n, d] of a transformers ``CLIPModel``.

    transformers 5 returns an output object from get_*_features; the projected embedding is its
    ``pooler_output``.
    """
    if pixel_values is not None:
        out = model.get_image_features(pixel_values=pixel_values)
    else:
        out = model.get_text_features(**text)
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.nn.functional.normalize(features.float(), dim=-1)
