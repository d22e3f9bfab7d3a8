"""The one rule every command applies to its ``output_dir`` (train, label, evaluate, demo, the llm recipes).

A folder *holds a run* when it has a ``config.yaml`` written by a command. Then:

    resume=null (fresh)   refused, unless overwrite=true, which first removes that run's files
    resume=auto           continue from the run's last complete state (train: its newest checkpoint; label and
                          evaluate: their finished shards and images); nothing to continue from -> as fresh
    resume=<checkpoint>   continue from that checkpoint folder (training commands)

A folder that holds no run is simply used. Nothing a previous run wrote is silently emptied or mixed into a
new one: a fresh run into a used folder is an error that says how to continue or replace it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from diffusion_dpo.errors import InputError
from diffusion_dpo.fileio import check_folder

RUN_MARKER = "config.yaml"


def holds_run(out: Path) -> bool:
    return (out / RUN_MARKER).is_file()


def parse_resume(resume: str | None) -> str | None:
    """None for a fresh start, 'auto', or a checkpoint path (as given)."""
    if resume is None or resume.strip().lower() in ("", "none", "null"):
        return None
    return resume


def claim_output_dir(out: Path, *, resume: str | None, overwrite: bool, run_files: tuple[str, ...]) -> bool:
    """Apply the folder rule before anything is written; return True when the run continues a previous one.

    ``run_files``: the names a run of this command writes in ``out`` (removed by overwrite=true). Only the
    main process calls this.
    """
    check_folder(out)  # a file in the way, no permission or a name too long: said here, naming out
    mode = parse_resume(resume)
    if overwrite and mode is not None:
        raise InputError(f"output_dir {out}: overwrite=true starts afresh and resume={resume!r} continues; "
                         "give one of them")
    if not holds_run(out):
        if mode not in (None, "auto") and not Path(mode).is_dir():
            raise InputError(f"config key 'resume': checkpoint folder {mode} does not exist (give 'auto', "
                             f"'null' or a folder such as {out / 'checkpoints' / 'step-500'})")
        return mode is not None and mode != "auto"
    if mode is not None:
        return True
    if not overwrite:
        raise InputError(f"output_dir {out} already holds a run ({out / RUN_MARKER}); continue it with "
                         "resume=auto, replace it with overwrite=true, or choose another output_dir")
    for name in (RUN_MARKER, *run_files):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return False
