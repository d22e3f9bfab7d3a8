"""Training checkpoints that resume exactly and survive a crash while saving.

A checkpoint is a folder ``<output_dir>/checkpoints/step-N/`` holding

    trainable.safetensors   the trained parameters only (the LoRA adapter, or the whole UNet), fp32
    ema.safetensors         (with ema.decay > 0) the EMA of those parameters, fp32, the same names
    training_state.pt       optimizer, LR scheduler and (fp16) gradient-scaler state
    rank-R.pt               per process: RNG states (python, numpy, torch CPU, CUDA) and the data position
    state.json              step, world size, strategy, and the SHA-256 of every other file; written last

Under ``parallel.strategy=fsdp`` the trained parameters and the optimizer state (and an EMA, if the engine
has one) are not gathered: every process writes its own shards with torch.distributed.checkpoint into
``sharded/`` (``__R_0.distcp`` per process, ``.metadata`` from process 0), in place of trainable.safetensors
and training_state.pt's optimizer. torch.distributed.checkpoint reshards on load, so such a checkpoint
resumes on another number of processes, sharded or not.

never the reference model (it is the starting checkpoint, rebuilt at start). It is written into
``step-N.tmp/``, every file flushed to disk (fsync), and renamed to ``step-N/`` only when complete, so a
process killed mid-save (SIGKILL, power loss) leaves the previous checkpoint usable and the half-written one
is ignored (and removed by the next save). Saving a step that already exists (a run resumed from an earlier
step) moves the old copy to ``step-N.old/`` for the instant between the two renames; a ``.old`` folder with no
``step-N`` beside it is that step's only copy and counts as complete. A write that fails (disk full,
permissions) removes the ``.tmp`` folder and raises InputError naming the file. ``keep`` bounds how many
complete checkpoints stay.

A complete checkpoint can still be damaged later (a disk error, a copy cut short, a file edited by hand): at
resume its files are checked against the digests in state.json, and a damaged one is renamed
``step-N.damaged`` (set aside, never deleted, never counted as complete) so the previous intact one is used.
Checkpoints written before digests existed have none and are trusted as they are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from diffusion_dpo.errors import InputError
from diffusion_dpo.fileio import fsync_path

_STEP_DIR = re.compile(r"^step-(\d+)(\.old)?$")
STATE_FILE = "state.json"
EMA_FILE = "ema.safetensors"
SHARDED = "sharded"  # the folder of torch.distributed.checkpoint's files under fsdp
SHARDED_METADATA = f"{SHARDED}/.metadata"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest step first: ``step-N`` folders holding
    state.json, and a ``step-N.old`` one where a re-save of step N was interrupted before ``step-N`` existed."""
    root = checkpoints_dir(output_dir)
    by_step: dict[int, Path] = {}
    for p in sorted(root.iterdir()) if root.is_dir() else []:  # step-N sorts before step-N.old
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            by_step.setdefault(int(m.group(1)), p)
    return [by_step[step] for step in sorted(by_step)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None (what ``resume=auto`` resumes from)."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


# ------------------------------------------------------------------------------------- integrity

def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_problem(path: Path) -> str | None:
    """Why the complete checkpoint ``path`` cannot be trusted (a file missing, or not the bytes its digest in
    state.json records), or None. One without digests (written before they existed) is trusted."""
    try:
        meta = json.loads((path / STATE_FILE).read_text())
        world = int(meta["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path / STATE_FILE} is not readable JSON with a world_size"
    weights = SHARDED_METADATA if meta.get("strategy") == "fsdp" else "trainable.safetensors"
    needed = [weights, "training_state.pt", *(f"rank-{r}.pt" for r in range(world))]
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    for name, digest in (meta.get("sha256") or {}).items():
        if not (path / name).is_file():
            return f"{name} missing"
        if file_digest(path / name) != digest:
            return f"{name} is not the file that was saved (its SHA-256 differs from state.json's)"
    return None


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint ``step-N`` to ``step-N.damaged`` (``.damaged-2``... if taken): kept for a
    look, never deleted, never counted as complete, never pruned."""
    target, n = path.with_name(f"{path.name}.damaged"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    os.replace(path, target)
    return target


def latest_intact_checkpoint(output_dir: str | Path, say: Callable[[str], None] = print) -> Path | None:
    """The newest complete checkpoint whose files match their digests (what ``resume=auto`` resumes from);
    each damaged one newer than it is named through ``say`` and set aside. None when there is no checkpoint;
    InputError when there are some and none is intact. Main process only (it renames)."""
    found = complete_checkpoints(output_dir)
    damaged = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        aside = set_aside(path)
        damaged.append(f"{path.name} ({problem})")
        say(f"resume: checkpoint {path} is damaged: {problem}; set aside as {aside.name}, trying the one before")
    if damaged:
        raise InputError(f"resume: no intact checkpoint in {checkpoints_dir(output_dir)}: {'; '.join(damaged)} "
                         "(set aside as step-N.damaged); start afresh with overwrite=true")
    return None


# -------------------------------------------------------------------------------------------- RNG state

def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (if present) CUDA generator states, in a form torch.load reads with
    weights_only=True."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, inner, gauss_state = state["python"]
    random.setstate((version, tuple(inner), gauss_state))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ trainable weights

def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by name (the LoRA adapter, or every UNet weight)."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` into the module's trainable parameters; the names must match exactly."""
    params = dict(module.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise InputError(
            f"checkpoint {where} does not fit this run's trainable parameters (was it written with another "
            f"model or model.lora_rank?): missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    for name, value in state.items():
        if params[name].shape != value.shape:
            raise InputError(f"checkpoint {where}: parameter {name} has shape {tuple(value.shape)}, "
                             f"this run's has {tuple(params[name].shape)}")
        params[name].copy_(value)


# ---------------------------------------------------------------------------------------- save / load

def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor] | None,
    training_state: dict[str, Any] | None,
    rank_state: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    keep: int | None = None,
    ema: dict[str, torch.Tensor] | None = None,
    sharded: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically; every process calls it (collectively, like a barrier).

    trainable, training_state: from the main process (rank 0; the others pass None: with data parallelism
    their weights and optimizer states are identical). rank_state: this process's RNG states and data
    position. ``barrier`` synchronises the processes (``accelerator.wait_for_everyone``); ``keep`` (None:
    all) is how many complete checkpoints to leave, the newest. ``ema`` (main process, optional, data
    parallel only): the EMA weights, written as ema.safetensors (under fsdp they travel in the shards).
    ``sharded``: under fsdp, every process's writer of its shards into a folder (:func:`save_sharded`); then
    ``trainable`` is None. Returns the checkpoint folder.
    """
    root = checkpoints_dir(output_dir)
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    write = functools.partial(_write, step=step, output_dir=output_dir)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp, lambda p: p.mkdir(parents=True))
    barrier()
    write(tmp / f"rank-{rank}.pt", functools.partial(_torch_save, rank_state))
    if sharded is not None:
        write(tmp / SHARDED, sharded)
    if rank == 0 and sharded is None:
        weights = {k: v.contiguous().float() for k, v in (trainable or {}).items()}
        write(tmp / "trainable.safetensors", functools.partial(_safetensors_save, weights))
    if rank == 0:
        write(tmp / "training_state.pt", functools.partial(_torch_save, training_state or {}))
        if ema is not None:
            averaged = {k: v.contiguous().float() for k, v in ema.items()}
            write(tmp / EMA_FILE, functools.partial(_safetensors_save, averaged))
    barrier()
    if rank == 0:
        # state.json is the commit mark: written last, after everything else is on disk, with the digests
        # a resume checks the files against.
        digests = {p.relative_to(tmp).as_posix(): file_digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta = {"step": step, "world_size": world_size, "strategy": "ddp" if sharded is None else "fsdp",
                "sha256": digests}
        write(tmp / STATE_FILE, lambda p: p.write_text(json.dumps(meta, indent=1)))
        if sharded is not None:
            write(tmp / SHARDED, fsync_path)
        write(tmp, fsync_path)
        write(final, functools.partial(_publish, tmp))  # a rename can fail too (a full directory block)
        write(root, fsync_path)  # the rename itself reaches the disk
        prune_checkpoints(output_dir, keep)
    barrier()
    return final


def _sharded_state(policy: torch.nn.Module, optimizer, ema) -> dict[str, Any]:
    """What torch.distributed.checkpoint saves and loads in place: the trained parameters (frozen ones are
    rebuilt at start), the optimizer state keyed by parameter name, and the EMA's, as DTensors under fsdp."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optim = get_state_dict(policy, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": model, "optimizer": optim}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def save_sharded(folder: Path, *, policy: torch.nn.Module, optimizer, ema=None) -> None:
    """Every process writes its shards of the trained parameters, the optimizer state (and the EMA) into
    ``folder`` (collective; the files are fsynced)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(policy, optimizer, ema), checkpoint_id=str(folder))


def load_sharded(path: Path, policy: torch.nn.Module, optimizer, ema=None) -> bool:
    """Restore what :func:`save_sharded` wrote in ``path/sharded`` into ``policy``, ``optimizer`` (and the
    EMA, in place), resharded onto this run's processes (collective). ``policy`` may be sharded or whole.
    Returns whether an EMA was restored (False when the checkpoint holds none, or the run keeps none)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    saved_keys = dcp.FileSystemReader(str(path / SHARDED)).read_metadata().state_dict_metadata
    with_ema = ema is not None and any(key.startswith("ema.") for key in saved_keys)
    state = _sharded_state(policy, optimizer, ema if with_ema else None)
    try:
        # A one-process run without a process group (ddp) reads every shard itself.
        dcp.load(state, checkpoint_id=str(path / SHARDED), no_dist=not torch.distributed.is_initialized())
    except Exception as e:  # another model, another LoRA rank, or damaged files
        raise InputError(f"resume: checkpoint {path} does not fit this run's trained parameters or cannot be "
                         f"read ({type(e).__name__}: {str(e)[:300]}); was it written with another model or "
                         "model.lora_rank?") from e
    # not strict: the frozen parameters (a LoRA run's base) are not in the state, and dcp.load above has
    # already refused a checkpoint that lacks any trained one
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    return with_ema  # the EMA's shadow tensors were loaded in place


def _torch_save(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def _safetensors_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path)


def _write(path: Path, writer: Callable[[Path], None], *, step: int, output_dir: str | Path) -> None:
    """``writer(path)``, then fsync; a failure (disk full, read-only folder; torch and safetensors report
    those as RuntimeError / SafetensorError with a bare message) removes this save's ``.tmp`` folder and
    becomes an InputError that names the file."""
    from safetensors import SafetensorError

    try:
        writer(path)
        if path.is_file():
            fsync_path(path)
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(checkpoints_dir(output_dir) / f"step-{step}.tmp", ignore_errors=True)
        previous = latest_checkpoint(output_dir)
        reason = f"{e.strerror} (errno {e.errno})" if isinstance(e, OSError) and e.strerror else str(e)
        raise InputError(
            f"checkpoint step {step}: cannot write {path}: {reason}. The previous checkpoint "
            f"({previous or 'none'}) is intact; free disk space or make {checkpoints_dir(output_dir)} "
            "writable, then rerun with resume=auto") from e


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``. An existing ``final`` (the same step saved again) goes to
    ``step-N.old`` first: between the two renames that is the step's only copy, and complete_checkpoints
    counts it; the leftover is removed once ``final`` exists."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(final.name + ".old")
    _remove(old)  # a leftover of an earlier interrupted re-save; final is complete
    os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder, its commit mark first, so a kill halfway never leaves a folder that
    looks complete but lacks files."""
    (folder / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Remove all but the newest ``keep`` complete checkpoints, and leftovers of interrupted saves (``.tmp``
    folders, and ``.old`` ones whose step has its ``step-N``)."""
    root = checkpoints_dir(output_dir)
    complete = complete_checkpoints(output_dir)
    removed = [p for p in root.glob("step-*") if p.is_dir() and p.suffix in (".tmp", ".old") and p not in complete]
    if keep is not None:
        removed += complete[:-keep] if keep > 0 else complete
    for p in removed:
        _remove(p)
    return removed


def load_checkpoint(path: str | Path, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Read a checkpoint folder for process ``rank`` of ``world_size``.

    Returns {"step", "strategy", "world_size" (the writer's), "trainable" (state dict; None under fsdp,
    whose weights :func:`load_sharded` reads), "training_state", "rank_state", "rank_states", "ema" (the EMA
    weights of a data-parallel checkpoint, or None)}. ``rank_state`` is this process's (RNG, data position);
    written by another number of processes, it is the state of process ``rank`` modulo theirs, and
    ``rank_states`` holds every writer's, for the data feed to map its position (engine). Raises InputError
    when the folder is missing or incomplete.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / STATE_FILE).is_file():
        hint = " (an interrupted save; use the previous step)" if path.name.endswith(".tmp") else ""
        raise InputError(f"resume: {path} is not a complete checkpoint folder{hint}; "
                         f"expected {path / STATE_FILE}")
    meta = json.loads((path / STATE_FILE).read_text())
    strategy, old_world = meta.get("strategy", "ddp"), int(meta["world_size"])
    weights = SHARDED_METADATA if strategy == "fsdp" else "trainable.safetensors"
    ranks = [rank] if old_world == world_size else list(range(old_world))
    for name in (weights, "training_state.pt", *(f"rank-{r}.pt" for r in ranks)):
        if not (path / name).is_file():
            raise InputError(f"resume: checkpoint {path} lacks {name} (removed by hand?); resume from another "
                             f"step in {path.parent}")
    try:
        rank_states = [torch.load(path / f"rank-{r}.pt", weights_only=True) for r in ranks]
        return {
            "step": int(meta["step"]), "strategy": strategy, "world_size": old_world,
            "trainable": load_file(path / "trainable.safetensors") if strategy == "ddp" else None,
            "training_state": torch.load(path / "training_state.pt", weights_only=True),
            "rank_state": rank_states[0] if len(ranks) == 1 else rank_states[rank % old_world],
            "rank_states": rank_states,
            "ema": load_file(path / EMA_FILE) if (path / EMA_FILE).is_file() else None,
        }
    except Exception as e:  # a damaged file of a checkpoint without digests: safetensors', pickle's errors
        raise InputError(f"resume: checkpoint {path} cannot be read ({type(e).__name__}: {e}); resume from "
                         f"another step in {path.parent}") from e
