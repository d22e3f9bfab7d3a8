"""What a pipeline holds, counted without its weights: parameter counts from configs on the meta device, and
the activations a forward saves for backward, measured on a narrow twin of the denoiser.

    arch = describe_pipeline("flux1-dev")            # a shipped architecture, a folder, a hub id or "tiny-sd3"
    arch.denoiser.params, arch.frozen                 # exact counts: only config.json files are read
    acts = activation_model(arch, lora_rank=64)       # bytes per image = a * T_img + b * T_txt + c (fp32)

Parameter counts are exact: each component is built from its config.json on the meta device (shapes, no
storage). Activations are measured: twins of the denoiser with the same class, depth and structural settings
(dual attention, single-stream blocks, LoRA targets and rank) but one and two attention heads wide (a UNet:
its channels divided by a width factor, then doubled) run three small forwards each on CPU (fp32, or bf16
autocast as the trainer runs) under ``saved_tensors_hooks``; the bytes saved for backward, per checkpoint unit
(transformer block, UNet resnet or attention) and outside them, are fitted as ``a * T_img + b * T_txt + c`` per
image and extrapolated linearly in width to the real denoiser.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from diffusion_dpo import ASSETS
from diffusion_dpo.errors import InputError

ARCHITECTURES = ASSETS / "architectures"
# Hub ids whose configs the shipped architectures copy: planned offline from the shipped folder.
SHIPPED_HUB_IDS = {"stabilityai/stable-diffusion-3.5-medium": "sd35-medium", "black-forest-labs/FLUX.1-dev": "flux1-dev",
                   "Qwen/Qwen-Image": "qwen-image"}
TINY_FAMILIES = {"tiny": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux"}
# Pipeline class -> the denoiser kind this module knows how to count and run.
KINDS = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "QwenImagePipeline": "qwen-image"}
# The modules diffusers' gradient checkpointing recomputes: with it on, only their inputs stay saved.
CHECKPOINT_UNITS = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock",
                    "QwenImageTransformerBlock", "ResnetBlock2D", "Transformer2DModel")
# Autograd nodes of views: a parameter's cast seen through them is still the cast (not an activation).
VIEW_NODES = {"TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0", "UnsafeViewBackward0",
              "ExpandBackward0", "AsStridedBackward0", "UnsqueezeBackward0", "SqueezeBackward0", "AliasBackward0"}
# Text tokens the denoiser attends to, as the training families encode captions (Qwen-Image: its pipeline
# drops the chat template's prefix, so the count is the prompt's own length; 256 is an assumed long prompt).
DEFAULT_TEXT_TOKENS = {"sd3": 77 + 256, "flux": 512, "qwen-image": 256, "unet": 77}


def architecture_names() -> list[str]:
    return sorted(p.name for p in ARCHITECTURES.iterdir() if (p / "model_index.json").is_file())


@dataclass
class ModuleCount:
    """One module's parameters: ``params`` and ``buffers`` (element counts), parameter ``shapes``, the
    largest checkpoint unit's parameters (``largest_unit``) and the sum over units (``in_units``)."""

    params: int
    buffers: int = 0
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    largest_unit: int = 0
    in_units: int = 0


@dataclass(eq=False)  # hashed by identity: describe_pipeline's result keys activation_model's cache
class PipelineArchitecture:
    """A pipeline counted from its configs. ``frozen``: name -> parameter + buffer elements of the VAE and
    text encoders; ``latent_factor``: pixels per latent pixel along a side; ``patch``: latent pixels per token
    along a side (1 for a UNet, whose 'tokens' are latent pixels)."""

    source: str
    kind: str  # sd3 | flux | qwen-image | unet
    denoiser_class: str
    denoiser_config: dict[str, Any]
    denoiser: ModuleCount
    denoiser_module: Any  # the meta-device denoiser (shapes only)
    frozen: dict[str, int]
    latent_factor: int
    patch: int
    text_tokens: int

    def tokens(self, resolution: int) -> int:
        side = resolution // (self.latent_factor * self.patch)
        if side < 1 or side * self.latent_factor * self.patch != resolution:
            raise InputError(f"config key 'resolution': expected a multiple of {self.latent_factor * self.patch} "
                             f"px for {self.source} (latent factor x patch), got {resolution}")
        return side * side


def count_module(module: torch.nn.Module) -> ModuleCount:
    units = [m for m in module.modules() if type(m).__name__ in CHECKPOINT_UNITS]
    unit_sizes = [sum(p.numel() for p in u.parameters()) for u in units]
    return ModuleCount(params=sum(p.numel() for p in module.parameters()),
                       buffers=sum(b.numel() for b in module.buffers()),
                       shapes=[tuple(p.shape) for p in module.parameters()],
                       largest_unit=max(unit_sizes, default=0), in_units=sum(unit_sizes))


def lora_shapes(module: torch.nn.Module, targets: list[str], rank: int) -> list[tuple[int, ...]]:
    """The LoRA parameter shapes peft adds to ``module``: for each Linear whose qualified name is a target or
    ends with '.' + a target (peft's matching rule), A [rank, in] and B [out, rank]."""
    shapes = []
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            shapes += [(rank, m.in_features), (m.out_features, rank)]
    return shapes


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{what} {path}: cannot read it as JSON: {e}") from None


@functools.lru_cache(maxsize=None)
def _tiny_folder(name: str) -> str:
    from diffusion_dpo.tiny import build_tiny_pipeline

    root = tempfile.mkdtemp(prefix="diffusion-dpo-plan-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # only its configs were needed
    return str(build_tiny_pipeline(Path(root) / name, family=TINY_FAMILIES[name]))


def resolve_source(pretrained: str) -> str:
    """A folder or hub id to read configs from: a shipped architecture's folder (for its name or the hub id it
    copies), a tiny pipeline built into a temporary folder, or ``pretrained`` itself."""
    if pretrained in TINY_FAMILIES:
        return _tiny_folder(pretrained)
    pretrained = SHIPPED_HUB_IDS.get(pretrained, pretrained)
    if (ARCHITECTURES / pretrained / "model_index.json").is_file():
        return str(ARCHITECTURES / pretrained)
    return pretrained


def _meta_component(source: str, name: str, entry: Any, revision: str | None) -> torch.nn.Module:
    """Component ``name`` (model_index.json ``entry`` = [library, class]) built from its config on meta."""
    from accelerate import init_empty_weights

    library, class_name = entry
    cls = getattr(importlib.import_module(library), class_name)
    try:
        with init_empty_weights(include_buffers=True):
            if library == "diffusers":
                return cls.from_config(cls.load_config(source, subfolder=name, revision=revision))
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(source, subfolder=name, revision=revision)
            return cls._from_config(config)
    except (OSError, ValueError) as e:
        raise InputError(f"model.pretrained {source!r}: cannot read the config of component '{name}': {e}") from None


def _text_tokens(source: str, kind: str) -> int:
    """Text tokens as the training family encodes them, from the tokenizers' model_max_length when the
    folder has them (tiny pipelines), else the family's default."""
    def max_length(folder: str) -> int | None:
        path = Path(source) / folder / "tokenizer_config.json"
        return _read_json(path, "tokenizer config").get("model_max_length") if path.is_file() else None

    clip, second, third = max_length("tokenizer"), max_length("tokenizer_2"), max_length("tokenizer_3")
    if kind == "sd3" and clip and third:
        return clip + min(256, third)
    if kind == "flux" and second:
        return min(512, second)
    if kind == "unet" and clip:
        return clip
    return DEFAULT_TEXT_TOKENS[kind]


def _latent_factor(vae_config: dict[str, Any]) -> int:
    if "temperal_downsample" in vae_config:  # Qwen-Image's video VAE: 3 spatial halvings
        return 2 ** len(vae_config["temperal_downsample"])
    return 2 ** (len(vae_config.get("block_out_channels", (0,))) - 1)


@functools.lru_cache(maxsize=16)
def describe_pipeline(pretrained: str, revision: str | None = None) -> PipelineArchitecture:
    """Count ``pretrained``'s components from their configs (no weights are read or allocated)."""
    from diffusion_dpo.families import pipeline_index

    source = resolve_source(pretrained)
    index = pipeline_index(source, revision)
    kind = KINDS.get(index.get("_class_name", ""), "unet" if index.get("unet") else "")
    if not kind:
        raise InputError(f"model.pretrained {pretrained!r}: pipeline {index.get('_class_name')!r} is not one the "
                         f"memory plan counts (SD1.x/2.x, SDXL, SD3/3.5, FLUX.1, Qwen-Image)")
    denoiser_name = "unet" if kind == "unet" else "transformer"
    denoiser = _meta_component(source, denoiser_name, index[denoiser_name], revision)
    frozen = {}
    for name, entry in index.items():
        is_module = isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]
        if is_module and (name == "vae" or name.startswith("text_encoder")):
            m = _meta_component(source, name, entry, revision)
            frozen[name] = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
    vae_config = _meta_component(source, "vae", index["vae"], revision).config
    return PipelineArchitecture(
        source=pretrained, kind=kind, denoiser_class=index[denoiser_name][1], denoiser_config=dict(denoiser.config),
        denoiser=count_module(denoiser), denoiser_module=denoiser, frozen=frozen,
        latent_factor=_latent_factor(dict(vae_config)), patch=1 if kind == "unet" else 2,
        text_tokens=_text_tokens(source, kind))


# ------------------------------------------------------------------------------------- saved activations

def saved_bytes(model: torch.nn.Module, run: Callable[[], Any]) -> tuple[dict[str, int], dict[str, int]]:
    """Run ``run()`` (a forward of ``model`` with grad) and return the bytes autograd saved for backward,
    ({unit tag or "rest": bytes}, {unit tag: bytes of the unit's tensor inputs}). Unique storages count once;
    the model's own parameters and buffers are weights, not activations, and do not count, nor do autocast's
    half-precision casts of them (the plan's compute copy). Unit tags are ``<index>:<class>`` of
    :data:`CHECKPOINT_UNITS` modules in forward order."""
    seen: set[tuple[int, int]] = set()
    for q in [*model.parameters(), *model.buffers()]:
        seen.add((q.untyped_storage().data_ptr(), q.untyped_storage().nbytes()))
    parameter_ids = {id(p) for p in model.parameters()}

    def is_weight_cast(t: torch.Tensor) -> bool:
        fn = t.grad_fn  # autocast's cast of a parameter, possibly seen through views (linear saves W^T)
        for _ in range(4):
            if fn is None or type(fn).__name__ not in VIEW_NODES:
                break
            fn = fn.next_functions[0][0]
        if fn is None or type(fn).__name__ != "ToCopyBackward0":
            return False
        return any(id(getattr(f, "variable", None)) in parameter_ids for f, _ in fn.next_functions if f is not None)
    saved: dict[str, int] = {}
    inputs: dict[str, int] = {}
    stack = ["rest"]

    def new_bytes(t: torch.Tensor) -> int:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return key[1]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not is_weight_cast(t):
            saved[stack[-1]] = saved.get(stack[-1], 0) + new_bytes(t)
        return t

    held: set[tuple[int, int]] = set(seen)  # what checkpointing keeps: each unit's inputs, shared ones once

    def enter(module, args, kwargs, tag):
        stack.append(tag)
        tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
        tensors += [t for a in [*args, *kwargs.values()] if isinstance(a, tuple) for t in a
                    if isinstance(t, torch.Tensor)]  # rotary embeddings come as a (cos, sin) pair
        inputs[tag] = 0
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in held:
                held.add(key)
                inputs[tag] += key[1]

    hooks = []
    units = [m for m in model.modules() if type(m).__name__ in CHECKPOINT_UNITS]
    for i, unit in enumerate(units):
        tag = f"{i}:{type(unit).__name__}"
        hooks.append(unit.register_forward_pre_hook(functools.partial(enter, tag=tag), with_kwargs=True))
        hooks.append(unit.register_forward_hook(lambda *_: stack.pop() and None))  # None: output unchanged
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for h in hooks:
            h.remove()
    return saved, inputs


def image_tokens_fit(points: list[tuple[int, int]], values: list[float]) -> tuple[float, float, float]:
    """(a, b, c) with a * T_img + b * T_txt + c = value through three (T_img, T_txt) points."""
    matrix = torch.tensor([[ti, tt, 1.0] for ti, tt in points], dtype=torch.float64)
    solution = torch.linalg.solve(matrix, torch.tensor(values, dtype=torch.float64))
    return tuple(float(v) for v in solution)


@dataclass
class ActivationModel:
    """Saved-for-backward bytes per image as linear fits ``(a, b, c)``: ``a * T_img + b * T_txt + c`` bytes at
    the twin's width, measured in fp32 (``measured_element_bytes`` 4) or under bf16 autocast (2);
    ``width_factor`` scales them to the real denoiser's width."""

    units: dict[str, tuple[float, float, float]]  # per checkpoint unit, without checkpointing
    unit_inputs: dict[str, tuple[float, float, float]]  # per unit, what checkpointing keeps
    rest: tuple[float, float, float]  # outside the units (embedders, final layers, UNet samplers)
    width_factor: float
    measured_element_bytes: int = 4

    def bytes(self, image_tokens: int, text_tokens: int, images: int, element_bytes: int,
              checkpointing: bool) -> float:
        """Activation bytes of one forward of ``images`` images (tokens per image, compute dtype's size)."""
        def value(fit):
            return max(0.0, fit[0] * image_tokens + fit[1] * text_tokens + fit[2])

        if checkpointing:
            kept = sum(map(value, self.unit_inputs.values())) + max(map(value, self.units.values()), default=0.0)
        else:
            kept = sum(map(value, self.units.values()))
        dtype_scale = element_bytes / self.measured_element_bytes  # 1 when measured in the plan's precision
        return (kept + value(self.rest)) * self.width_factor * dtype_scale * images


def _twin(arch: PipelineArchitecture, widths: int) -> tuple[torch.nn.Module, float]:
    """A narrow twin of the denoiser (same class, depth and structure) in fp32 on CPU, ``widths`` width units
    wide (a transformer: that many attention heads; a UNet: channels / the width factor x ``widths``, one
    head per level), and the real denoiser's width in those units (the width factor)."""
    import diffusers

    config = {k: v for k, v in arch.denoiser_config.items() if not k.startswith("_")}
    if arch.kind == "unet":
        groups, channels = config.get("norm_num_groups", 32), list(config["block_out_channels"])
        factor = next(s for s in (20, 16, 10, 8, 5, 4, 2, 1)
                      if all(c % s == 0 and (c // s) % groups == 0 for c in channels))
        heads = config.get("attention_head_dim", 8)
        config.update(block_out_channels=[c // factor * widths for c in channels], num_attention_heads=None,
                      attention_head_dim=[1] * len(heads) if isinstance(heads, (list, tuple)) else 1)
    else:
        factor = config["num_attention_heads"]
        config["num_attention_heads"] = widths
        if arch.kind == "sd3":
            config["caption_projection_dim"] = config["attention_head_dim"] * widths
    torch.manual_seed(0)
    return getattr(diffusers, arch.denoiser_class).from_config(config), float(factor)


def _twin_forward(arch: PipelineArchitecture, twin, side: int, text_tokens: int) -> Callable[[], Any]:
    """A call of the twin on one image with a latent ``side`` latent pixels square and ``text_tokens``."""
    from diffusion_dpo.denoising import unet_forward
    from diffusion_dpo.families import FluxFamily, SD3Family

    c = twin.config
    if arch.kind == "qwen-image":
        tokens = torch.randn(1, (side // 2) ** 2, c.in_channels)
        text = torch.randn(1, text_tokens, c.joint_attention_dim)
        return lambda: twin(hidden_states=tokens, encoder_hidden_states=text, timestep=torch.tensor([0.5]),
                            encoder_hidden_states_mask=torch.ones(1, text_tokens), return_dict=False,
                            img_shapes=[[(1, side // 2, side // 2)]])[0]
    if arch.kind == "unet":
        text = {"hidden": torch.randn(1, text_tokens, c.cross_attention_dim)}
        image = {}
        if c.addition_embed_type == "text_time":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            text["pooled"], image["time_ids"] = torch.randn(1, pooled), torch.tensor([[side * 8.0] * 4 + [0.0] * 2])
        noisy = torch.randn(1, c.in_channels, side, side)
        return lambda: unet_forward(twin, noisy, torch.tensor([500]), text, image)
    family = SD3Family() if arch.kind == "sd3" else FluxFamily()
    channels = c.in_channels if arch.kind == "sd3" else c.in_channels // 4
    noisy = torch.randn(1, channels, side, side)
    text = {"hidden": torch.randn(1, text_tokens, c.joint_attention_dim),
            "pooled": torch.randn(1, c.pooled_projection_dim)}
    return lambda: family.forward(twin, noisy, torch.tensor([500.0]), text, {})


@functools.lru_cache(maxsize=32)
def activation_model(arch: PipelineArchitecture, lora_rank: int = 0, lora_targets: tuple[str, ...] = (),
                     half: bool = False) -> ActivationModel:
    """Measure twins of ``arch``'s denoiser one and two width units wide (a LoRA of rank ``lora_rank`` on
    ``lora_targets`` when > 0, the base frozen) at three token counts each, fit each unit's saved bytes, and
    extrapolate linearly in width to the real denoiser (what does not grow with width, such as rotary tables
    and the LoRA's rank-sized products, stays as measured). ``half``: held and run as the trainer does in
    bf16 (a LoRA's base in bf16, trained weights fp32, bf16 autocast; CPU autocast standing in for CUDA's),
    else in fp32."""
    narrow, factor = _measure_twin(arch, 1, lora_rank, lora_targets, half)
    wide, _ = _measure_twin(arch, 2, lora_rank, lora_targets, half)

    def at_real_width(one, two):
        return tuple(a + (factor - 1) * (b - a) for a, b in zip(one, two))

    return ActivationModel(
        units={t: at_real_width(narrow.units[t], wide.units[t]) for t in narrow.units},
        unit_inputs={t: at_real_width(narrow.unit_inputs[t], wide.unit_inputs[t]) for t in narrow.unit_inputs},
        rest=at_real_width(narrow.rest, wide.rest), width_factor=1.0, measured_element_bytes=2 if half else 4)


def _measure_twin(arch: PipelineArchitecture, widths: int, lora_rank: int, lora_targets: tuple[str, ...],
                  half: bool) -> tuple[ActivationModel, float]:
    """The fits of one twin ``widths`` units wide (its own width, width_factor 1), and the width factor."""
    from diffusion_dpo.models import attach_lora, trainable_parameters

    twin, factor = _twin(arch, widths)
    if lora_rank:
        if half:
            twin.to(torch.bfloat16)
        attach_lora(twin, lora_rank, None, list(lora_targets))
        for p in trainable_parameters(twin):
            p.data = p.data.float()
    twin.train()
    unit = 2 ** (len(twin.config.block_out_channels) - 1) if arch.kind == "unet" else arch.patch
    base = 4 if arch.kind != "unet" else 2
    grids = [(base * unit, 8), (2 * base * unit, 8), (base * unit, 24)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
        measured = [saved_bytes(twin, _twin_forward(arch, twin, side, text)) for side, text in grids]
    points = [((side // arch.patch) ** 2, text) for side, text in grids]

    def fit(values):
        return image_tokens_fit(points, [float(v) for v in values])

    fits = ActivationModel(
        units={t: fit([m[0].get(t, 0) for m in measured]) for t in measured[0][0] if t != "rest"},
        unit_inputs={t: fit([m[1].get(t, 0) for m in measured]) for t in measured[0][1]},
        rest=fit([m[0].get("rest", 0) for m in measured]), width_factor=1.0)
    return fits, factor
