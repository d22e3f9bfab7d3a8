"""A built wheel carries the package's assets, and an installed (non-editable) copy finds and loads them.

Builds the wheel offline from a copy of the sources (no build isolation, no downloads), checks its contents,
installs it with --no-deps into a fresh virtual environment and, from a folder outside the repository with no
PYTHONPATH, checks that ``diffusion_dpo.ASSETS`` points into that environment, the demo base loads there and
``--config NAME`` reads the packaged example config.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = [
    "demo/base/model_index.json",
    "demo/base/unet/config.json",
    "demo/base/unet/diffusion_pytorch_model.safetensors",
    "demo/base/vae/config.json",
    "demo/base/vae/diffusion_pytorch_model.safetensors",
    "demo/base/text_encoder/config.json",
    "demo/base/text_encoder/model.safetensors",
    "demo/base/tokenizer/tokenizer.json",
    "demo/base/tokenizer/tokenizer_config.json",
    "demo/base/scheduler/scheduler_config.json",
    "demo/flow_base/model_index.json",
    "demo/flow_base/transformer/config.json",
    "demo/flow_base/transformer/diffusion_pytorch_model.safetensors",
    "demo/flow_base/text_encoder_3/model.safetensors",
    "demo/flow_base/tokenizer_3/tokenizer.json",
    "demo/flow_base/scheduler/scheduler_config.json",
    "prompts/hpsv2_offline/anime.json",
    "prompts/hpsv2_offline/concept-art.json",
    "prompts/hpsv2_offline/paintings.json",
    "prompts/hpsv2_offline/photo.json",
    "configs/tiny.yaml",
    "configs/evaluate.yaml",
    "configs/llm_dpo.yaml",
]

# Runs in the installed environment: where the package and its assets are, and the demo base loaded from there.
CHILD = r"""
import json, sys
import diffusion_dpo
from diffusion_dpo import ASSETS
from diffusers import StableDiffusionPipeline
from diffusion_dpo.config import load_config
from diffusion_dpo.config_files import resolve_config
from diffusion_dpo.recipes.train import TrainConfig

# A launch line's --config NAME, run from a folder with no assets/ link: the packaged file is read.
by_name = load_config(TrainConfig, ["sd15_train", "data/hpdv2"])
pipe = StableDiffusionPipeline.from_pretrained(ASSETS / "demo" / "base")
print(json.dumps({"package": diffusion_dpo.__file__, "assets": str(ASSETS), "prefix": sys.prefix,
                  "unet_params": sum(p.numel() for p in pipe.unet.parameters()),
                  "sd15_train": str(resolve_config("sd15_train")), "max_steps": by_name.optim.max_steps,
                  "caption_column": by_name.data.columns.caption}))
"""


def _sources(dest: Path) -> Path:
    """What the wheel is built from (tracked layout, no caches, no top-level assets link) copied to ``dest``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("diffusion_dpo", "scorers"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    return dest


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_wheel_carries_the_assets_and_an_install_loads_the_demo_base(tmp_path):
    src = _sources(tmp_path / "src")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(src)], cwd=tmp_path)
    (wheel,) = dist.glob("diffusion_dpo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in EXPECTED if f"diffusion_dpo/assets/{f}" not in names]
    assert not missing, f"{wheel.name} lacks {missing}"
    shipped = {p.relative_to(ROOT / "diffusion_dpo").as_posix()
               for p in (ROOT / "diffusion_dpo" / "assets").rglob("*") if p.is_file()}
    assert {f"diffusion_dpo/{f}" for f in shipped} <= names  # every file under assets/, whatever its type
    templates = {p.relative_to(ROOT).as_posix() for p in (ROOT / "scorers" / "templates").glob("*.txt")}
    assert templates and templates <= names  # the VLM judge's rubric and HPSv3's instruction

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    if sys.prefix != sys.base_prefix:
        # Run from a virtual environment, the new one's "system" packages are the base interpreter's, not the
        # ones torch and diffusers are installed in: add those (as a plain path, so no editable-install hook of
        # this checkout comes along).
        child_site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        parent = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
        Path(child_site.stdout.strip(), "parent-env.pth").write_text("\n".join(parent) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)])

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = _run([str(python), "-c", CHILD], cwd=outside, env=env)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    prefix = Path(found["prefix"]).resolve()
    assert prefix == venv.resolve()
    assert Path(found["package"]).resolve().is_relative_to(prefix), found
    assert Path(found["assets"]).resolve().is_relative_to(prefix), found
    assert Path(found["assets"]).resolve() == Path(found["package"]).resolve().parent / "assets"
    assert found["unet_params"] > 0
    assert Path(found["sd15_train"]).resolve() == Path(found["assets"]).resolve() / "configs" / "sd15_train.yaml"
    assert (found["max_steps"], found["caption_column"]) == (2000, "prompt")
