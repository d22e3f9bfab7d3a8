"""``--config NAME`` reads the packaged example config of that name; paths keep working; unknown names list
the packaged ones."""

import pytest

from diffusion_dpo import ASSETS
from diffusion_dpo.config import ConfigError, load_config, parse_args
from diffusion_dpo.config_files import packaged_config_names, resolve_config
from diffusion_dpo.recipes import train


def test_a_name_resolves_to_the_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no assets/ link here: only the package's copy can be found
    assert resolve_config("sd15_train") == ASSETS / "configs" / "sd15_train.yaml"
    assert resolve_config("data/hpdv2") == ASSETS / "configs" / "data" / "hpdv2.yaml"
    cfg = parse_args(train.TrainConfig, ["--config", "sd15_train", "--config=data/hpdv2"], prog="t")
    assert cfg.optim.max_steps == 2000 and cfg.data.columns.caption == "prompt"


def test_an_existing_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sd15_train").write_text("output_dir: mine\n")
    assert load_config(train.TrainConfig, ["sd15_train"]).output_dir == "mine"


def test_an_unknown_name_lists_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"sd15_train", "tiny", "evaluate", "data/hpdv2"} <= set(packaged_config_names())
    with pytest.raises(ConfigError, match="sd15_trian.*packaged configs: .*sd15_train"):
        load_config(train.TrainConfig, ["sd15_trian"])
    with pytest.raises(ConfigError, match="config file nowhere/sd15_train.yaml does not exist"):
        load_config(train.TrainConfig, ["nowhere/sd15_train.yaml"])
