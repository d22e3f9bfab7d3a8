"""Every hub id the project names is on the checked list (diffusion_dpo/assets/hub_ids.yaml), and a removed one
appears only where the text says it was removed: a hub id that goes away is one edit to the list, and this test
then points at every place that still names it."""

import re
from pathlib import Path

import yaml

from diffusion_dpo import ASSETS

ROOT = Path(__file__).resolve().parents[1]
LIST = ASSETS / "hub_ids.yaml"

# owner/name with nothing path-like around it: not after / . : @ (URLs, deeper paths), not before / (a folder).
# The name is taken whole (a sentence's full stop is stripped after), never a shorter piece of a longer path.
SHAPE = re.compile(r"(?<![\w./:@-])([A-Za-z0-9][A-Za-z0-9_-]*)/([A-Za-z0-9][A-Za-z0-9._-]*)(?![\w/.-])")
FILE_ENDINGS = re.compile(r"\.(ya?ml|jsonl?|py|md|txt|safetensors|parquet|tsv|png|jpe?g|sh|pt|bin|csv)$")
# First parts that are folders or metric prefixes of this project, never hub owners.
NOT_OWNERS = {"runs", "assets", "docs", "scripts", "tests", "diffusion_dpo", "scorers", "configs", "data", "final",
              "checkpoints", "benchmark", "prompts", "ckpt", "out", "img", "launchers", "config", "output_dir",
              "eval", "rewards", "logps", "image", "reward", "tune", "pairs", "my_pairs", "train", "path",
              "engine", "recipes", "label_0", "score_0", "model_0", "seed_0", "jpg_0", "image_0", "XDG_CACHE_HOME",
              "embed_dim", "dpo-sd15", "HPDv2"}
# owner/name-shaped words of the prose that are not hub ids (model or format pairs written with a slash).
NOT_IDS = {"SD3/SD3.5", "SD3/FLUX", "CLIP-L/CLIP-G", "H100/H200", "HPSv2/v2.1", "bf16/fp16", "SD1.5/SDXL",
           "SD1.5/SD2", "SD3.5/FLUX", "fp16/bf16", "fp32/bf16", "v1/v2"}


def _scanned_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ASSETS / "configs").rglob("*.yaml"))]
    for folder in ("diffusion_dpo", "scorers", "scripts"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def hub_id_mentions(text: str) -> list[tuple[int, str]]:
    """(line number, id) for every hub-id-shaped string of ``text``."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for match in SHAPE.finditer(line):
            owner, name = match.group(1), match.group(2).rstrip("._-")
            word = f"{owner}/{name}"
            if owner in NOT_OWNERS or word in NOT_IDS or FILE_ENDINGS.search(name):
                continue
            if len(name) < 2 or not re.search(r"[A-Za-z]", owner) or not re.search(r"[A-Za-z]", name):
                continue  # ViT-H/14, mse_w/l, 1/T: an id's owner and name hold letters, the name two characters
            if not re.search(r"[-_.0-9]", word):
                continue  # win/loss: prose; the ids named here all hold a - _ . or digit
            found.append((number, word))
    return found


def _says_removed(lines: list[str], number: int) -> bool:
    """Whether the line naming a removed id, or one of the two before it, says so."""
    near = " ".join(lines[max(0, number - 3):number]).lower()
    return any(word in near for word in ("removed", "deleted", "left the hub"))


def test_every_hub_id_named_is_on_the_checked_list():
    entries = yaml.safe_load(LIST.read_text())
    listed = {e["id"]: e for e in entries}
    assert len(listed) == len(entries), "an id is listed twice"
    for e in entries:
        assert e["kind"] in ("model", "dataset") and e["status"] in ("exists", "removed", "unconfirmed"), e
        assert e["as_of"] and e["how"], e
    unlisted, removed_named = [], []
    for path in _scanned_files():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for number, hub_id in hub_id_mentions(text):
            where = f"{path.relative_to(ROOT)}:{number}: {hub_id}"
            if hub_id not in listed:
                unlisted.append(where)
            elif listed[hub_id]["status"] == "removed" and not _says_removed(lines, number):
                removed_named.append(where)
    assert not unlisted, "hub ids not on diffusion_dpo/assets/hub_ids.yaml:\n" + "\n".join(unlisted)
    assert not removed_named, "removed hub ids named as if they existed:\n" + "\n".join(removed_named)


def test_the_scan_finds_ids_and_skips_paths():
    text = ("model.pretrained=stabilityai/stable-diffusion-xl-base-1.0 --config runs/sd15-dpo/final\n"
            "see assets/configs/sd15_train.yaml and github.com/SalesforceAIResearch/DiffusionDPO, ViT-H/14\n"
            "data.source: `trl-lib/Capybara`")
    assert hub_id_mentions(text) == [(1, "stabilityai/stable-diffusion-xl-base-1.0"), (3, "trl-lib/Capybara")]
