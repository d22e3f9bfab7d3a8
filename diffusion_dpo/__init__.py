"""Preference tuning for text-to-image diffusion models (Diffusion-DPO) and language models."""

from importlib.resources import files
from pathlib import Path

__version__ = "0.1.0"

# Prompt sets, example configs and demo weights ship inside the package (diffusion_dpo/assets/), so an installed
# wheel has them too; a checkout also reaches them through the top-level assets -> diffusion_dpo/assets link.
ASSETS = Path(str(files("diffusion_dpo") / "assets"))
