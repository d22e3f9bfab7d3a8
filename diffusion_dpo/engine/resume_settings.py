"""What a resume may change: the settings of a continued run are checked against the run's config.yaml.

A resume continues the same training, so a key that changes what the steps already taken meant (the model,
the data, the loss, the method, the LoRA rank, the batch and accumulation, the learning rate and its
schedule, the seed, ...) is refused with the keys named. The keys that do not (logging and checkpoint
cadence, how many checkpoints to keep, the step budget, where the run is, the compute dtype) are declared
once per config section as its ``RESUME_SAFE`` set (run_options.RunOptions, TrainingRunOptions, OptimSection, a
recipe's own section may add its own); such a change goes through, is printed, and is recorded with every
resume in ``resumes.jsonl`` (one JSON row per resume: time, checkpoint, changed keys with their old
and new values), while config.yaml holds the settings now in force.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any

import yaml

from diffusion_dpo.config import to_dict
from diffusion_dpo.errors import InputError

RESUME_LOG = "resumes.jsonl"
# How a launch starts (continue or replace), not what the run does: never compared.
HOW_TO_START = frozenset({"resume", "overwrite"})


def resume_safe_keys(section: Any) -> frozenset[str]:
    """The RESUME_SAFE names declared by ``section``'s class and its bases."""
    return frozenset().union(*(vars(c).get("RESUME_SAFE", ()) for c in type(section).__mro__))


def changed_settings(cfg: Any, old: dict, prefix: str = "") -> tuple[dict, dict]:
    """(refused, allowed): dotted key -> (old value, new value) for every key of the dataclass ``cfg`` whose
    value differs from ``old`` (config.yaml's mapping). A key ``old`` lacks (added to the command since) is
    not compared; one ``cfg`` lacks (another command's config) is refused."""
    refused, allowed = {}, {}
    safe = resume_safe_keys(cfg)
    names = {f.name for f in dataclasses.fields(cfg)} - (HOW_TO_START if not prefix else set())
    for name in sorted(set(old) - names - (HOW_TO_START if not prefix else set())):
        refused[prefix + name] = (old[name], "(not a key of this command)")
    for name in sorted(names & set(old)):
        value, before = getattr(cfg, name), old[name]
        if dataclasses.is_dataclass(value) and isinstance(before, dict):
            inner_refused, inner_allowed = changed_settings(value, before, f"{prefix}{name}.")
            refused |= inner_refused
            allowed |= inner_allowed
            continue
        now = to_dict(value) if dataclasses.is_dataclass(value) else value
        if now != before:
            (allowed if name in safe else refused)[prefix + name] = (before, now)
    return refused, allowed


def _listed(changes: dict) -> str:
    return ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in changes.items())


def regrouped_batch(cfg: Any, checkpoint: Path, world: int, refused: dict, allowed: dict) -> None:
    """A resume on another number of processes than the checkpoint's writer: optim.batch_size may change
    (moved from ``refused`` to ``allowed``) when batch_size x processes, the examples of one micro-batch over
    all processes, stays what it was; otherwise InputError naming the keys to keep equal."""
    try:
        old_world = int(json.loads((checkpoint / "state.json").read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    optim = getattr(cfg, "optim", None)
    if old_world == world or optim is None:
        return
    old_batch = refused.pop("optim.batch_size", (optim.batch_size, optim.batch_size))[0]
    if old_batch * old_world != optim.batch_size * world:
        raise InputError(
            f"resume from {checkpoint} on {world} processes: it was written by {old_world} with optim.batch_size="
            f"{old_batch} ({old_batch * old_world} examples per micro-batch over all processes); keep optim."
            f"batch_size x processes equal (optim.batch_size={old_batch * old_world // world} here, when it "
            "divides), and optim.gradient_accumulation_steps as it was, so the steps keep their meaning")
    if optim.batch_size != old_batch:
        allowed["optim.batch_size"] = (old_batch, optim.batch_size)


def check_resume_settings(cfg: Any, out: Path, checkpoint: Path, world: int | None = None) -> dict:
    """Refuse (InputError) a resume from ``checkpoint`` whose settings change what its run's steps meant;
    otherwise print the allowed changes, append the resume to out/resumes.jsonl, and return them. Main
    process only. A checkpoint whose run left no config.yaml is not compared. ``world``: this run's number of
    processes (see :func:`regrouped_batch`)."""
    config_file = checkpoint.parent.parent / "config.yaml"
    old = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
    refused, allowed = changed_settings(cfg, old) if isinstance(old, dict) else ({}, {})
    if world is not None:
        regrouped_batch(cfg, checkpoint, world, refused, allowed)
    if refused:
        safe = sorted(_all_safe(cfg))
        raise InputError(
            f"resume from {checkpoint}: these settings differ from the run's ({config_file}) and would change "
            f"what its steps meant: {_listed(refused)}. Resume with them as they were, or start a new run "
            f"(another output_dir, or overwrite=true). Keys a resume may change: {', '.join(safe)}")
    if allowed:
        print(f"resume from {checkpoint}: settings changed: {_listed(allowed)} (recorded in {out / RESUME_LOG})")
    row = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "checkpoint": str(checkpoint),
           "changed": {key: {"old": old_value, "new": new} for key, (old_value, new) in allowed.items()}}
    with open(out / RESUME_LOG, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    return allowed


def _all_safe(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of ``cfg`` a resume may change."""
    found = [prefix + name for name in resume_safe_keys(cfg)]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            found += _all_safe(value, f"{prefix}{f.name}.")
    return found
