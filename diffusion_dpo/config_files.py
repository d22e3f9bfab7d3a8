"""Where a ``--config`` argument points: a file path, or the name of a config shipped with the package.

``--config sd15_train`` reads ``assets/configs/sd15_train.yaml`` from inside the installed package (and
``--config data/hpdv2`` its ``data/hpdv2.yaml``), so the launch lines of the example configs work from a
wheel install, where the checkout's top-level ``assets/`` folder does not exist. An existing file always wins:
a name is looked up among the packaged configs only when no file of that name exists and the argument is
not a path (no ``.yaml`` ending, no folder other than ``data/``).
"""

from __future__ import annotations

from pathlib import Path

from diffusion_dpo import ASSETS
from diffusion_dpo.errors import InputError

PACKAGED_CONFIGS = ASSETS / "configs"


def packaged_config_names() -> list[str]:
    """The names ``--config`` accepts for the shipped configs (``sd15_train``, ``data/hpdv2``, ...)."""
    return sorted(p.relative_to(PACKAGED_CONFIGS).with_suffix("").as_posix()
                  for p in PACKAGED_CONFIGS.rglob("*.yaml"))


def is_config_name(arg: str) -> bool:
    """Whether ``arg`` is written as a packaged config's name rather than a path."""
    if arg.endswith((".yaml", ".yml")) or not arg:
        return False
    parts = arg.split("/")
    return "\\" not in arg and (len(parts) == 1 or (len(parts) == 2 and parts[0] == "data"))


def resolve_config(arg: str) -> Path:
    """The file ``--config arg`` reads: ``arg`` itself when that file exists, else the packaged config of that
    name. Raises InputError for a missing file, or an unknown name (listing the names there are)."""
    path = Path(arg)
    if path.exists():  # a folder too: reading it then says it is a folder, not that it is missing
        return path
    if is_config_name(arg):
        packaged = PACKAGED_CONFIGS / f"{arg}.yaml"
        if packaged.is_file():
            return packaged
        raise InputError(f"--config {arg}: no such file, and no packaged config of that name; packaged "
                         f"configs: {', '.join(packaged_config_names())}")
    raise InputError(f"config file {arg} does not exist (a packaged config is named without a path or "
                     f".yaml, e.g. --config sd15_train)")
