"""The example configs a user launches: every launch line parses from a wheel install (configs by name), each
real run states pairs, epochs and GPU-hours that this test recomputes from the config's own keys (so a number
changed in one place and not the other fails), and evaluate.yaml reads what the train config it names writes."""

import re
import shlex
from pathlib import Path

import pytest

from diffusion_dpo import ASSETS
from diffusion_dpo.config import load_config, parse_args
from diffusion_dpo.recipes.evaluate import EvaluateConfig
from diffusion_dpo.recipes.grpo_config import GrpoConfig
from diffusion_dpo.recipes.label import LabelConfig
from diffusion_dpo.recipes.llm_dpo import DPOConfig
from diffusion_dpo.recipes.llm_ppo_config import PPOConfig
from diffusion_dpo.recipes.llm_reward import RewardConfig
from diffusion_dpo.recipes.llm_sft import SFTConfig
from diffusion_dpo.recipes.train import TrainConfig

CONFIGS = ASSETS / "configs"
ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"train": TrainConfig, "label": LabelConfig, "evaluate": EvaluateConfig, "grpo": GrpoConfig,
           "llm dpo": DPOConfig, "llm ppo": PPOConfig, "llm reward": RewardConfig, "llm sft": SFTConfig}
REAL_TRAIN = ("sd15_train", "sdxl_train", "sd35_medium_lora", "flux_dev_lora", "qwen_image_lora", "flux2_klein_lora",
              "z_image_lora")
NUMBER = r"(\d[\d,]*)"


def launch_line(name: str) -> tuple[int, str, list[str]]:
    """(processes, command, arguments) of the command on a config's first line (before any '   (...)')."""
    first = (CONFIGS / f"{name}.yaml").read_text().split("\n")[0]
    assert first.startswith("# "), f"{name}.yaml does not start with the command that runs it"
    words = shlex.split(first[2:].split("   (")[0])
    start = words.index("diffusion_dpo") + 1 if "-m" in words else words.index("diffusion-dpo") + 1
    processes = int(words[words.index("--num_processes") + 1]) if "--num_processes" in words else 1
    command = " ".join(words[start:start + 2]) if words[start] == "llm" else words[start]
    return processes, command, words[start + len(command.split()):]


def comment(name: str) -> str:
    """The config's comment header as one line of text."""
    lines = (CONFIGS / f"{name}.yaml").read_text().split("\n")
    return " ".join(line[1:].strip() for line in lines if line.startswith("#"))


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def pairs_per_prompt(cfg: LabelConfig) -> int:
    k = cfg.candidates_per_prompt
    return k * (k - 1) // 2 if cfg.pairing == "all" else 1


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_launch_line_parses_with_configs_named_not_pathed(name, tmp_path, monkeypatch):
    _, command, args = launch_line(name)
    if name == "tiny":  # tiny.yaml's line is the README's example, run from a checkout
        monkeypatch.chdir(ROOT)
    else:
        monkeypatch.chdir(tmp_path)  # as from a wheel install: no assets/ folder here
        assert f"--config {name}" in " ".join(args), f"{name}.yaml's launch line should name it: --config {name}"
    parse_args(CLASSES[command], args, prog=f"diffusion-dpo {command}")


@pytest.mark.parametrize("name", REAL_TRAIN)
def test_a_real_run_states_the_pairs_epochs_and_gpu_hours_its_keys_give(name):
    processes, command, args = launch_line(name)
    train = parse_args(TrainConfig, args, prog="t")
    text = comment(name)
    stated = re.search(rf"{NUMBER} steps x {NUMBER} pairs per step \({NUMBER} processes x {NUMBER} pairs? x "
                       rf"{NUMBER} accumulation\) = {NUMBER} pairs drawn from {NUMBER} labelled pairs \({NUMBER} "
                       rf"prompts x {NUMBER} pairs per prompt, (\w+)\): ([\d.]+) epochs", text)
    assert stated, f"{name}.yaml states no schedule line"
    steps, per_step, procs, batch, accumulation, drawn, labelled, prompts, per_prompt = map(_int, stated.groups()[:9])
    label_name, epochs = stated.group(10), float(stated.group(11))
    label = load_config(LabelConfig, [str(CONFIGS / f"{label_name}.yaml")])
    o = train.optim
    assert (steps, procs, batch, accumulation) == (o.max_steps, processes, o.batch_size,
                                                   o.gradient_accumulation_steps)
    assert per_step == processes * o.batch_size * o.gradient_accumulation_steps
    assert drawn == o.max_steps * per_step
    assert (prompts, per_prompt) == (label.max_prompts, pairs_per_prompt(label))
    assert labelled == prompts * per_prompt
    assert epochs == round(drawn / labelled, 1)
    assert label.output_dir == train.data.source and label.model.pretrained == train.model.pretrained
    assert re.search(r"GPU-hours: (about [\d,]+ \(.*\d+ GPUs|not known \()", text), name
    assert "Anchor:" in text
    if train.optim.scale_lr:  # the paper's lr: 1e-8 per pair of a step of 2,048 pairs
        assert per_step == 2048
    label_text = comment(label_name)
    assert f"Labels: {prompts:,} prompts x {per_prompt} pairs per prompt" in label_text
    assert f"= {labelled:,} pairs, for {name}" in label_text


def test_flux_pairs_are_sampled_with_the_guidance_flux_trains_with():
    label = load_config(LabelConfig, [str(CONFIGS / "flux_label.yaml")])
    assert label.model.pretrained == "black-forest-labs/FLUX.1-dev" and label.sampling.guidance_scale == 3.5


def test_evaluate_reads_what_the_train_config_it_names_writes():
    evaluation = load_config(EvaluateConfig, [str(CONFIGS / "evaluate.yaml")])
    train = load_config(TrainConfig, [str(CONFIGS / "sd15_train.yaml")])
    assert "sd15_train.yaml" in comment("evaluate")
    assert evaluation.model.pretrained == train.model.pretrained
    # A full fine-tune writes a UNet folder to final/ (model.denoiser); a LoRA run, LoRA weights (model.lora).
    assert train.model.lora_rank == 0 and evaluation.model.lora is None
    assert evaluation.model.denoiser == f"{train.output_dir}/final"
    assert evaluation.training_pairs == train.data.source


@pytest.mark.parametrize("name", REAL_TRAIN)
def test_docs_table_of_each_real_config_gives_the_numbers_the_config_does(name):
    text = comment(name)
    drawn, labelled, epochs = re.search(rf"= {NUMBER} pairs drawn from {NUMBER} labelled pairs .*?: ([\d.]+) epochs",
                                        text).groups()
    docs = (ROOT / "docs" / "train.md").read_text()
    table = docs.split(f"**{name}** (")[1].split("\n\n")[1]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()[2:]}
    assert {"anchor", "pairs", "epochs", "GPU-hours"} <= set(rows), name
    assert f"= {labelled} labelled" in rows["pairs"] and f"= {drawn} drawn" in rows["pairs"]
    assert rows["epochs"].split()[0] == epochs
    assert any(key.startswith("deviation") for key in rows), f"{name}: no deviation row"
