"""The one rule every command applies to its ``output_dir`` (train, label, evaluate, demo, grpo, the llm recipes).

A folder *holds a run* when it has a ``config.yaml`` written by a command. Its ``run.json`` names the
command that made it (its *owner*: ``train``, ``label``, ``evaluate``, ``grpo``, ``demo``, ``llm dpo``, ...)
and the files that run writes. Then:

    another owner         refused whatever ``resume`` says, naming the owner; overwrite=true replaces it
    resume=null (fresh)   refused, unless overwrite=true, which first removes that run's files
    resume=auto           continue from the run's last complete state (train: its newest intact checkpoint;
                          label and evaluate: their finished shards and images); nothing to continue from ->
                          as fresh
    resume=<checkpoint>   continue from that checkpoint folder (training commands)

A folder written before owners were recorded (``config.yaml`` but no ``run.json``) is judged by what it
holds: it is this command's when it holds one of the command's ``marks`` (files only its kind of run
writes: a training run's checkpoints/ or metrics.jsonl, label's manifest.json, evaluate's generation.json,
the demo's prompts/ or round-*/), or nothing but config.yaml; otherwise it is another command's and refused.

A folder that holds no run is simply used. Before any of this, the folder's lock is taken (engine.run_lock):
one launch writes a folder at a time. Nothing a previous run wrote is silently emptied or mixed into a new
one: a fresh run into a used folder is an error that says how to continue or replace it.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Callable, TypeVar

from diffusion_dpo.engine.run_lock import LOCK_FILE, acquire_lock, release_lock
from diffusion_dpo.errors import InputError
from diffusion_dpo.fileio import atomic_write_text, check_folder

RUN_MARKER = "config.yaml"
R = TypeVar("R")
OWNER_FILE = "run.json"
_CREATED: set[Path] = set()  # folders this process's claims created (removed again if left empty)


def holds_run(out: Path) -> bool:
    return (out / RUN_MARKER).is_file()


def parse_resume(resume: str | None) -> str | None:
    """None for a fresh start, 'auto', or a checkpoint path (as given)."""
    if resume is None or resume.strip().lower() in ("", "none", "null"):
        return None
    return resume


def read_owner(out: Path) -> dict | None:
    """The run.json of ``out`` ({"owner", "files"}), or None for a folder without one."""
    path = out / OWNER_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"output_dir {out}: {path} is not the JSON record a run writes (edited by hand?); "
                         "restore it, or replace the run with overwrite=true") from None
    if not isinstance(record, dict) or not isinstance(record.get("owner"), str):
        raise InputError(f"output_dir {out}: {path} does not name the run's owner (expected a key 'owner')")
    return record


def _legacy_foreigner(out: Path, marks: tuple[str, ...]) -> list[str]:
    """For a run folder without run.json: [] when it may be this command's (it holds one of ``marks``, or
    nothing but config.yaml), else what it holds instead."""
    held = sorted(p.name for p in out.iterdir() if p.name not in (RUN_MARKER, LOCK_FILE))
    if not held or any(any(out.glob(m)) for m in marks):
        return []
    return held


def _check_owner(out: Path, owner: str, marks: tuple[str, ...], overwrite: bool) -> dict | None:
    """Refuse a run of another owner unless overwrite=true; return its record (None for a legacy folder)."""
    record = read_owner(out)
    if record is not None and record["owner"] != owner:
        if overwrite:
            return record
        raise InputError(f"output_dir {out} holds a `{record['owner']}` run; {owner} refuses it (a folder belongs "
                         "to the command that made it): choose another output_dir, or replace that run with "
                         "overwrite=true")
    if record is None and not overwrite:
        foreign = _legacy_foreigner(out, marks)
        if foreign:
            raise InputError(
                f"output_dir {out} holds a run of another command (it has {', '.join(foreign[:5])}, none of "
                f"{', '.join(marks)} that a {owner} run writes); {owner} refuses it: choose another "
                "output_dir, or replace that run with overwrite=true")
    return record


def _remove_run(out: Path, names: list[str]) -> None:
    """Remove config.yaml, run.json and every file or folder matching ``names`` (names or glob patterns)."""
    for pattern in (RUN_MARKER, OWNER_FILE, *names):
        for path in out.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def claim_output_dir(out: Path, *, owner: str, resume: str | None, overwrite: bool, run_files: tuple[str, ...],
                     marks: tuple[str, ...]) -> bool:
    """Take the folder's lock, apply the folder rule, record the owner; return True when the run continues a
    previous one. Only the main process calls this (the others write under its lock).

    ``owner``: the command (and kind of run) claiming the folder. ``run_files``: the names (or glob patterns)
    a run of this command writes in ``out`` (removed by overwrite=true, and recorded in run.json so that any
    command's overwrite removes them). ``marks``: the files (names or glob patterns) by which a folder written
    before run.json existed is recognised as this command's. The lock stays held until :func:`release_output_dir` or the process ends.
    """
    check_folder(out)  # a file in the way, no permission or a name too long: said here, naming out
    mode = parse_resume(resume)
    if overwrite and mode is not None:
        raise InputError(f"output_dir {out}: overwrite=true starts afresh and resume={resume!r} continues; "
                         "give one of them")
    if mode not in (None, "auto") and not holds_run(out) and not Path(mode).is_dir():
        raise InputError(f"config key 'resume': checkpoint folder {mode} does not exist (give 'auto', "
                         f"'null' or a folder such as {out / 'checkpoints' / 'step-500'})")
    if not out.exists():
        _CREATED.add(out.resolve())
    acquire_lock(out, owner)
    try:
        continues = _apply_rule(out, owner, mode, overwrite, run_files, marks)
    except BaseException:
        release_output_dir(out)
        raise
    record = json.dumps({"owner": owner, "files": list(run_files)}, indent=1)
    if not (out / OWNER_FILE).is_file() or (out / OWNER_FILE).read_text() != record:
        atomic_write_text(out / OWNER_FILE, record)
    return continues


def _apply_rule(out: Path, owner: str, mode: str | None, overwrite: bool, run_files: tuple[str, ...],
                marks: tuple[str, ...]) -> bool:
    if not holds_run(out):
        return mode is not None and mode != "auto"
    record = _check_owner(out, owner, marks, overwrite)
    if mode is not None:
        return True
    if not overwrite:
        raise InputError(f"output_dir {out} already holds a run ({out / RUN_MARKER}); continue it with "
                         "resume=auto, replace it with overwrite=true, or choose another output_dir")
    _remove_run(out, [*run_files, *(record or {}).get("files", [])])
    return False


def release_output_dir(out: Path) -> None:
    """Release the folder's lock (the end of a run, or its failure). A run that failed before it wrote its
    config.yaml leaves nothing behind: its run.json goes, and so does the folder if the claim made it and it
    stayed empty (bad input found after the claim writes nothing). A process that claimed nothing (another
    rank, or a run refused before its claim, e.g. for a path that cannot exist) leaves the folder alone."""
    if not release_lock(out):
        return
    if (out / OWNER_FILE).is_file() and not holds_run(out):
        (out / OWNER_FILE).unlink()
    resolved = out.resolve()
    if resolved in _CREATED:
        _CREATED.discard(resolved)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def releases_output_dir(run: Callable[..., R]) -> Callable[..., R]:
    """Decorate a recipe's ``run(cfg, ...)``: the lock of ``cfg.output_dir`` this process took is released when
    it returns or raises (a failed run in a notebook must not hold the folder until the kernel ends)."""
    @functools.wraps(run)
    def wrapper(cfg, *args, **kwargs) -> R:
        try:
            return run(cfg, *args, **kwargs)
        finally:
            release_output_dir(Path(cfg.output_dir))
    return wrapper
