"""The LLM recipes on the training engine: exact resume of SFT, reward and DPO (a run interrupted after a
checkpoint and continued with resume=auto ends with the same weights and the same metrics as one run
straight through), the non-finite guard, and the output-folder rule of every llm command."""

import json
import math
import shutil

import pytest

from diffusion_dpo import cli
from diffusion_dpo.config import load_config
from diffusion_dpo.engine import NonFiniteError
from diffusion_dpo.llm import common, tiny
from diffusion_dpo.recipes import llm_dpo, llm_reward, llm_sft


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny.write_world(tmp_path_factory.mktemp("world"))


# Small training sets so that 6 steps cross an epoch boundary: the feed's epoch and position must resume too.
RECIPES = {
    "sft": (llm_sft, llm_sft.SFTConfig, "demos", ["data.max_rows=40", "optim.batch_size=8"]),
    "reward": (llm_reward, llm_reward.RewardConfig, "rankings",
               ["data.format=rankings", "data.max_rows=40", "optim.batch_size=8"]),
    "dpo": (llm_dpo, llm_dpo.DPOConfig, "pairs", ["data.max_rows=40", "optim.batch_size=8", "loss.beta=0.5"]),
}


def config(world, name, out, *overrides):
    _, cls, data, extra = RECIPES[name]
    base = [f"model.name_or_path={world['model']}", f"data.source={world[data]}", f"output_dir={out}",
            "tensorboard=false", "data.eval_fraction=0.2", "optim.learning_rate=0.01", "log_every=1"]
    return load_config(cls, [], base + extra + list(overrides))


def without_throughput(rows):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_resume_is_exact(world, tmp_path, name):
    recipe = RECIPES[name][0]
    args = ["optim.max_steps=6", "checkpoint_every=3", "checkpoints_keep=null", "eval_every=3"]
    straight = recipe.run(config(world, name, tmp_path / "a", *args))
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step-3", "step-6"]
    # A crash after step 5: step-3 is the last checkpoint, metrics.jsonl already holds rows past it.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for leftover in ("checkpoints/step-6", "final", "summary.json"):
        shutil.rmtree(tmp_path / "b" / leftover, ignore_errors=True)
        (tmp_path / "b" / leftover).unlink(missing_ok=True)
    metrics = tmp_path / "b" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line)["step"] <= 5))
    resumed = recipe.run(config(world, name, tmp_path / "b", *args, "resume=auto"))
    assert resumed["resumed_from"] == str(tmp_path / "b" / "checkpoints" / "step-3")
    assert resumed["steps"] == straight["steps"] == 6
    assert resumed["weight_digests"] == straight["weight_digests"]
    a, b = common.read_metrics(tmp_path / "a"), common.read_metrics(tmp_path / "b")
    assert [r["step"] for r in a] == [1, 2, 3, 3, 4, 5, 6, 6]  # training rows, held-out rows at 3 and 6
    assert without_throughput(b) == without_throughput(a)
    assert resumed["eval"] == straight["eval"] and resumed["eval"]
    # a finished run continued again has nothing left to do
    again = recipe.run(config(world, name, tmp_path / "a", *args, "resume=auto"))
    assert again["resumed_from"].endswith("step-6") and again["weight_digests"] == straight["weight_digests"]


def test_skipped_nonfinite_steps_are_counted(world, tmp_path, monkeypatch):
    real, calls = llm_sft.completion_nll, []

    def nan_on_second_step(model, batch):
        nll, n = real(model, batch)
        calls.append(1)
        return (nll * math.nan if len(calls) == 2 else nll), n

    monkeypatch.setattr(llm_sft, "completion_nll", nan_on_second_step)
    summary = llm_sft.run(config(world, "sft", tmp_path / "nan", "optim.max_steps=4", "data.eval_fraction=0"))
    rows = common.read_metrics(tmp_path / "nan")
    assert [r["step"] for r in rows] == [1, 3, 4]  # step 2 was skipped: no update, no row
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 1]
    assert summary["steps"] == 4 and summary["nonfinite_steps"] == 1
    assert json.loads((tmp_path / "nan" / "summary.json").read_text())["nonfinite_steps"] == 1


def test_diverging_run_stops_and_writes_no_final(world, tmp_path):
    # lr 1e30 moves every weight by ~1e30 in the first step; from then on the loss is not finite.
    cfg = config(world, "sft", tmp_path / "inf", "optim.max_steps=10", "optim.learning_rate=1e30",
                 "optim.warmup_ratio=0", "max_nonfinite_steps=3")
    with pytest.raises(NonFiniteError, match=r"step 4: loss is not finite for 3 steps in a row"):
        llm_sft.run(cfg)
    assert not (tmp_path / "inf" / "final").exists()
    assert [r["nonfinite_steps"] for r in common.read_metrics(tmp_path / "inf")] == [0]


def llm_command(world, name, out, *extra):
    data = {"sft": "demos", "reward": "pairs", "dpo": "pairs", "ppo": "prompts"}[name]
    steps = ["ppo.iterations=1", "rollout.batch_size=8", "rollout.max_new_tokens=2",
             "reward.function=diffusion_dpo.llm.tiny:count_good", "value.kind=head"] if name == "ppo" else [
        "optim.max_steps=1", "data.max_rows=16"]
    return ["llm", name, f"model.name_or_path={world['model']}", f"data.source={world[data]}",
            f"output_dir={out}", "tensorboard=false", *steps, *extra]


@pytest.mark.parametrize("name", ["sft", "reward", "dpo", "ppo"])
def test_output_folder_rule(world, tmp_path, capsys, name):
    out = tmp_path / name
    assert cli.main(llm_command(world, name, out)) == 0
    rows = common.read_metrics(out)
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + '{"step": 99}\n')
    capsys.readouterr()
    assert cli.main(llm_command(world, name, out)) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "resume=auto" in err and "overwrite=true" in err
    assert common.read_metrics(out)[-1] == {"step": 99}  # nothing was touched
    assert cli.main(llm_command(world, name, out, "overwrite=true")) == 0
    # replaced, not appended
    assert [r["step"] for r in common.read_metrics(out)] == [r["step"] for r in rows]
    assert (out / "final").is_dir() and (out / "summary.json").is_file()
