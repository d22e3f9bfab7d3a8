"""``diffusion-dpo plan``: the expected per-process memory of a training run, before it runs.

    diffusion-dpo plan model.pretrained=flux1-dev model.lora_rank=64 processes=8 card_gib=80
    diffusion-dpo plan --config flux_dev_lora processes=8 card_gib=80     # the run a training config launches
    diffusion-dpo plan model.pretrained=sd35-medium parallel.strategy=fsdp processes=8 --json

Prints a table (weights, compute copy, gradients, optimizer state, EMA, reference, frozen encoders + VAE,
activations; device and host GiB per process) and whether it fits a card of ``card_gib`` GiB with a headroom
allowance. Only config files are read (a hub id's model_index.json and component config.json): no weights.

``--config`` takes a train or grpo config (a file or a packaged config's name) and reads the keys that
decide memory: model.pretrained / revision / lora_rank / lora_targets / gradient_checkpointing,
data.resolution (grpo: sampling.resolution; when null, the plan's resolution), optim.batch_size and optim.optimizer, method (dpo: 2 images
per example), precompute, mixed_precision, parallel.strategy / cpu_offload / frozen, ema.decay (> 0: on) and
grpo's online.reference; key=value overrides of the plan's own keys (--help) come after it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusion_dpo.config import ConfigError, parse_args
from diffusion_dpo.config_files import resolve_config
from diffusion_dpo.config_yaml import load_yaml, resolved
from diffusion_dpo.errors import InputError
from diffusion_dpo.fileio import atomic_write_text, read_text
from diffusion_dpo.memory_plan import PlanConfig, format_plan, memory_plan

# plan key <- the training config's key (first one present wins)
TRAINING_KEYS = {
    "model.pretrained": ["model.pretrained"],
    "model.revision": ["model.revision"],
    "model.lora_rank": ["model.lora_rank"],
    "model.lora_targets": ["model.lora_targets"],
    "model.gradient_checkpointing": ["model.gradient_checkpointing"],
    "resolution": ["data.resolution", "sampling.resolution"],
    "batch_size": ["optim.batch_size"],
    "optimizer": ["optim.optimizer"],
    "precompute": ["precompute"],
    "mixed_precision": ["mixed_precision"],
    "parallel.strategy": ["parallel.strategy"],
    "parallel.cpu_offload": ["parallel.cpu_offload"],
    "parallel.frozen": ["parallel.frozen"],
}


def _lookup(values: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(values, dict) or part not in values:
            return None
        values = values[part]
    return values


def training_overrides(path: str) -> list[str]:
    """``key=value`` overrides of the plan's keys from a train or grpo config file (or packaged name)."""
    file = resolve_config(path)
    values = resolved(load_yaml(read_text(file, "config file", ConfigError)) or {})
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    found: dict[str, Any] = {}
    for key, sources in TRAINING_KEYS.items():
        value = next((v for v in (_lookup(values, s) for s in sources) if v is not None), None)
        if value is not None:
            found[key] = value
    is_grpo = "online" in values or "prompts" in values
    if not is_grpo and "resolution" not in found:  # a train config without data.resolution trains at its default
        from diffusion_dpo.data.rows import DataConfig

        found["resolution"] = DataConfig().resolution
    found["images_per_example"] = 1 if is_grpo or values.get("method") == "sft" else 2
    decay = _lookup(values, "ema.decay")
    if decay:
        found["ema"] = True
    reference = _lookup(values, "online.reference")
    if reference is not None:
        found["reference"] = reference
    elif values.get("method") == "sft" or (is_grpo and _lookup(values, "online.kl_coef") == 0):
        found["reference"] = "none"
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in found.items()]


def main(argv: list[str]) -> int:
    as_json = "--json" in argv
    args, overrides = [a for a in argv if a != "--json"], []
    files = []
    it = iter(args)
    for arg in it:  # --config names a training config, read for its keys, not a plan config
        if arg == "--config" or arg.startswith("--config="):
            name = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if not name:
                raise ConfigError("--config needs a train or grpo config file or a packaged config name")
            files.append(name)
        else:
            overrides.append(arg)
    from_files = [o for f in files for o in training_overrides(f)]
    cfg = parse_args(PlanConfig, from_files + overrides, prog="diffusion-dpo plan", description=__doc__)
    plan = memory_plan(cfg)
    if cfg.output:
        try:
            atomic_write_text(Path(cfg.output), json.dumps(plan.to_json(), indent=2) + "\n")
        except OSError as e:
            raise InputError(f"config key 'output': cannot write {cfg.output}: {e}") from None
    print(json.dumps(plan.to_json(), indent=2) if as_json else format_plan(plan))
    return 0
