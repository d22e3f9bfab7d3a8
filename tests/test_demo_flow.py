"""``diffusion-dpo demo family=flow``: the demo on the shipped SD3-layout flow-matching base, at reduced sizes."""

import json

import pytest

from diffusion_dpo.config import ConfigError, load_config
from diffusion_dpo.errors import InputError
from diffusion_dpo.families import detect
from diffusion_dpo.recipes import demo, demo_common

FLOW_BASE = demo_common.BASES["flow"]
TINY = [
    "world.train_prompts=4", "world.held_out_prompts=3", "candidates_per_prompt=2", "eval_seeds=1",
    "sampling.num_inference_steps=2", "train.optim.max_steps=2", "train.sft_optim.max_steps=2", "train.optim.batch_size=2",
    "train.optim.warmup_steps=0", "n_boot=20", "grid_prompts=2",
]


def test_shipped_flow_base_is_a_small_sd3_pipeline():
    files = [p for p in FLOW_BASE.rglob("*") if p.is_file()]
    assert detect(str(FLOW_BASE)).name == "sd3"
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    assert demo._resolution(str(FLOW_BASE)) == 32
    summary = json.loads((FLOW_BASE / "train_summary.json").read_text())
    assert summary["family"] == "flow"
    # Room to improve, as the SD-layout base: good on average but far from perfect (a rendering ~0.96).
    assert 0.6 < summary["eval"]["shapes_mean"] < 0.93


def test_family_picks_the_base_and_its_tuning_defaults():
    flow = demo.resolve_defaults(load_config(demo.DemoConfig, [], ["family=flow", "train.optim.max_steps=7"]))
    assert flow.train.loss.beta == demo.FAMILY_TRAIN_DEFAULTS["flow"]["loss"]["beta"] != 5000.0
    assert flow.train.optim.max_steps == 7  # given keys win over the family's defaults
    sd = demo.resolve_defaults(load_config(demo.DemoConfig, [], []))
    assert (sd.family, sd.train.loss.beta, sd.train.optim.learning_rate) == ("sd", 5000.0, 3e-4)
    assert demo_common.check_base(flow) == str(FLOW_BASE) and demo_common.check_base(sd) == str(demo_common.DEFAULT_BASE)


def test_family_config_checks(tmp_path):
    with pytest.raises(ConfigError, match="family"):
        load_config(demo.DemoConfig, [], ["family=sd3"])
    with pytest.raises(InputError, match="family=flow but .* is a sd pipeline"):
        demo.run(load_config(demo.DemoConfig, [], ["family=flow", f"base={demo_common.DEFAULT_BASE}",
                                                   f"output_dir={tmp_path / 'a'}"]))
    with pytest.raises(InputError, match="family=sd but .* is a sd3 pipeline"):
        demo.run(load_config(demo.DemoConfig, [], [f"base={FLOW_BASE}", f"output_dir={tmp_path / 'b'}"]))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_flow_demo_runs_label_dpo_sft_evaluate(tmp_path):
    out = tmp_path / "demo"
    report = demo.run(load_config(demo.DemoConfig, [], ["family=flow", *TINY, f"output_dir={out}"]))
    saved = json.loads((out / "report.json").read_text())
    assert saved["win_rate"] == saved["dpo_win_rate"] == report.rounds[0].dpo.win_rate
    assert 0 <= saved["win_rate_ci"][0] <= saved["win_rate"] <= saved["win_rate_ci"][1] <= 1
    assert saved["config"]["family"] == "flow" and saved["config"]["train"]["loss"]["beta"] == 500.0
    policy = out / "round-1" / "policy"
    assert detect(str(policy)).name == "sd3" and (policy / "transformer" / "config.json").is_file()
    assert not (policy / "samples.png").exists()
    assert report.sft is not None and (out / "grid.png").is_file()
