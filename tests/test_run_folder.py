"""Run folders: one owner (the command that made it), one writer (the lock), and a resume from the last intact
checkpoint with the settings its steps were taken with."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from run_files import REPO, CountingFeed, metrics

from diffusion_dpo import cli
from diffusion_dpo.config import option
from diffusion_dpo.engine import Engine, StepOutput, build_optimizer
from diffusion_dpo.errors import InputError
from diffusion_dpo.run_options import OptimSection, PreferenceLossSection, TrainingRunOptions
from diffusion_dpo.tiny import build_tiny_pipeline, write_tiny_pairs

# ------------------------------------------------------------------------------------------ a toy run


@dataclass
class ToyConfig(TrainingRunOptions):
    optim: OptimSection = option(OptimSection(learning_rate=1e-3, scheduler="constant", max_steps=4,
                                              batch_size=2), "optimizer")
    loss: PreferenceLossSection = option(PreferenceLossSection, "a loss section (its beta is not used)")



def toy_cfg(out, **keys) -> ToyConfig:
    optim = {k: keys.pop(k) for k in ("max_steps", "learning_rate") if k in keys}
    run = {"tensorboard": False, "log_every": 1, "checkpoint_every": 2, "checkpoints_keep": None}
    cfg = ToyConfig(output_dir=str(out), **run | {k: v for k, v in keys.items() if k != "beta"})
    cfg.optim = OptimSection(**{**vars(cfg.optim), **optim})
    cfg.loss = PreferenceLossSection(beta=keys.get("beta", 0.1))
    return cfg


def toy_run(cfg: ToyConfig) -> dict:
    """Fit y = 2x with AdamW; return the summary (with the final weight)."""
    engine = Engine(cfg, seed=0, unit="examples", name="toy")
    model = torch.nn.Linear(2, 1, bias=False)
    optimizer, scheduler = build_optimizer(model.parameters(), cfg.optim, cfg.optim.max_steps)
    feed = CountingFeed()
    engine.resume(model, optimizer, scheduler, feed)

    def step(x, ctx):
        return StepOutput((model(x).squeeze(1) - 2 * x[:, 0]) ** 2, units=len(x))

    engine.fit(model=model, policy=model, optimizer=optimizer, scheduler=scheduler, feed=feed, batch_size=2,
               step_fn=step, max_steps=cfg.optim.max_steps, max_grad_norm=0.0)
    return engine.finish({"weight": model.weight.detach().clone()})


# ------------------------------------------------------------------------- 3. resume from intact state

def test_a_damaged_newest_checkpoint_is_set_aside_and_the_older_one_used(tmp_path, capsys):
    straight = toy_run(toy_cfg(tmp_path / "a", max_steps=6))
    out = tmp_path / "b"
    toy_run(toy_cfg(out, max_steps=4))
    victim = out / "checkpoints" / "step-4" / "trainable.safetensors"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a copy cut short
    cut = victim.stat().st_size

    resumed = toy_run(toy_cfg(out, max_steps=6, resume="auto"))
    said = capsys.readouterr().out
    assert f"checkpoint {out / 'checkpoints' / 'step-4'} is damaged: trainable.safetensors" in said
    assert (out / "checkpoints" / "step-4.damaged" / "trainable.safetensors").stat().st_size == cut
    assert resumed["resumed_from"].endswith("step-2")
    assert torch.equal(resumed["weight"], straight["weight"])
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    # The set-aside copy is kept (never pruned, never resumed from): the run re-saved a good step-4.
    assert (out / "checkpoints" / "step-4.damaged").is_dir() and (out / "checkpoints" / "step-4" / "state.json").is_file()


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    toy_run(toy_cfg(out, max_steps=4))
    for step in (2, 4):
        (out / "checkpoints" / f"step-{step}" / "training_state.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"no intact checkpoint in .*step-4 \(training_state.pt is not the file"):
        toy_run(toy_cfg(out, max_steps=6, resume="auto"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2.damaged", "step-4.damaged"]


def test_a_checkpoint_without_digests_still_resumes(tmp_path):
    """Checkpoints written before digests existed are trusted as before."""
    straight = toy_run(toy_cfg(tmp_path / "a", max_steps=6))
    out = tmp_path / "b"
    toy_run(toy_cfg(out, max_steps=4))
    for step in (2, 4):
        state = out / "checkpoints" / f"step-{step}" / "state.json"
        meta = json.loads(state.read_text())
        state.write_text(json.dumps({"step": meta["step"], "world_size": meta["world_size"]}))
    (out / "run.json").unlink(missing_ok=True)  # and a folder from before owners were recorded
    resumed = toy_run(toy_cfg(out, max_steps=6, resume="auto"))
    assert resumed["resumed_from"].endswith("step-4") and torch.equal(resumed["weight"], straight["weight"])


@pytest.mark.parametrize("key, value", [("beta", 0.5), ("learning_rate", 1e-2)])
def test_a_resume_that_changes_what_the_steps_meant_is_refused(tmp_path, key, value):
    out = tmp_path / "run"
    toy_run(toy_cfg(out, max_steps=4))
    before = (out / "config.yaml").read_text()
    dotted = {"beta": "loss.beta", "learning_rate": "optim.learning_rate"}[key]
    with pytest.raises(InputError, match=rf"would change what its steps meant: {dotted} "):
        toy_run(toy_cfg(out, max_steps=6, resume="auto", **{key: value}))
    assert (out / "config.yaml").read_text() == before and [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


def test_a_resume_may_change_the_step_budget_and_cadence(tmp_path, capsys):
    straight = toy_run(toy_cfg(tmp_path / "a", max_steps=6))
    out = tmp_path / "b"
    toy_run(toy_cfg(out, max_steps=4))
    resumed = toy_run(toy_cfg(out, max_steps=6, resume="auto", checkpoints_keep=2))
    assert "settings changed: checkpoints_keep (None -> 2), optim.max_steps (4 -> 6)" in capsys.readouterr().out
    assert torch.equal(resumed["weight"], straight["weight"])
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["max_steps"] == 6
    (row,) = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert row["checkpoint"].endswith("step-4")
    assert row["changed"] == {"checkpoints_keep": {"old": None, "new": 2}, "optim.max_steps": {"old": 4, "new": 6}}


# ------------------------------------------------------------------------------------------- 2. one writer

def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                              "command": "train", "started": "2026-01-01T00:00:00+00:00"}))
    toy_run(toy_cfg(out, max_steps=2))
    said = capsys.readouterr().out
    assert f"taking over the stale lock of process {dead.pid} on host {socket.gethostname()}" in said
    assert "no longer running" in said
    assert not (out / "run.lock").exists()  # released at the end


HOLDER = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from test_run_folder import toy_cfg, toy_run
    import diffusion_dpo.engine.trainer as trainer

    out, ready, go = map(Path, sys.argv[1:4])
    real_resume = trainer.Engine.resume

    def resume_when_told(self, *args, **kwargs):  # the lock is held from here until the run ends
        ready.write_text("locked")
        while not go.exists():
            time.sleep(0.05)
        return real_resume(self, *args, **kwargs)

    trainer.Engine.resume = resume_when_told
    toy_run(toy_cfg(out, max_steps=5, resume="auto"))
''')


@pytest.mark.slow
def test_a_second_launch_into_a_folder_in_use_is_refused(tmp_path):
    """Two launches into one folder: the second, started while the first holds the folder, exits 2 naming the
    holder; the first ends normally, each step logged once."""
    root = tmp_path / "world"
    sd, pairs = build_tiny_pipeline(root / "sd"), write_tiny_pairs(root / "pairs", n_pairs=8)
    out, ready, go = tmp_path / "run", tmp_path / "ready", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1"}
    (tmp_path / "holder.py").write_text(HOLDER)
    first = subprocess.Popen([sys.executable, str(tmp_path / "holder.py"), str(out), str(ready), str(go)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not ready.exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "diffusion_dpo", "train", f"model.pretrained={sd}", f"data.source={pairs}",
             "data.resolution=32", "optim.batch_size=2", "optim.max_steps=2", f"output_dir={out}", "resume=auto"],
            env=env, capture_output=True, text=True, timeout=300)
    finally:
        go.write_text("go")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by process {first.pid} on host {socket.gethostname()}" in second.stderr
    assert "Traceback" not in second.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]


# ---------------------------------------------------------------------------------------------- 1. one owner

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished tiny train run and a finished tiny label run, each in its own folder."""
    root = tmp_path_factory.mktemp("owners")
    sd, pairs = build_tiny_pipeline(root / "sd"), write_tiny_pairs(root / "pairs", n_pairs=4)
    prompts = root / "prompts.txt"
    prompts.write_text("a red dog\na blue cat\n")
    train = root / "train"
    assert cli.main(["train", f"model.pretrained={sd}", f"data.source={pairs}", "data.resolution=32",
                     "optim.batch_size=2", "optim.max_steps=1", f"output_dir={train}", "tensorboard=false"]) == 0
    label = root / "label"
    assert cli.main(["label", *label_args(sd, prompts, label)]) == 0
    return {"sd": sd, "pairs": pairs, "prompts": prompts, "train": train, "label": label}


def label_args(sd, prompts, out):
    return [f"model.pretrained={sd}", f"prompts={prompts}", "scorer.name=jpeg_compressibility",
            "candidates_per_prompt=2", "sampling.num_inference_steps=1", f"output_dir={out}"]


def contents(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("legacy", [False, True], ids=["owner recorded", "written before owners"])
def test_another_command_is_refused_whatever_resume_says(world, tmp_path, capsys, legacy):
    train, label = shutil.copytree(world["train"], tmp_path / "train"), shutil.copytree(world["label"], tmp_path / "label")
    if legacy:
        (train / "run.json").unlink()
        (label / "run.json").unlink()
    owner = "a run of another command" if legacy else "a `{}` run"
    train_before, label_before = contents(train), contents(label)

    assert cli.main(["label", *label_args(world["sd"], world["prompts"], train)]) == 2  # its default resume=auto
    assert owner.format("train") in capsys.readouterr().err
    assert cli.main(["evaluate", f"model.pretrained={world['sd']}", f"tuned.pretrained={world['sd']}",
                     f"prompts={world['prompts']}",
                     "sampling.num_inference_steps=1", f"output_dir={train}"]) == 2
    assert owner.format("train") in capsys.readouterr().err
    assert cli.main(["train", f"model.pretrained={world['sd']}", f"data.source={world['pairs']}",
                     "data.resolution=32", "optim.max_steps=1", f"output_dir={label}", "resume=auto"]) == 2
    err = capsys.readouterr().err
    assert owner.format("label") in err and "train refuses it" in err and "overwrite=true" in err
    assert contents(train) == train_before and contents(label) == label_before


def test_overwrite_replaces_another_commands_run(world, tmp_path):
    label = shutil.copytree(world["label"], tmp_path / "label")
    (label / "notes.txt").write_text("mine")
    assert cli.main(["train", f"model.pretrained={world['sd']}", f"data.source={world['pairs']}",
                     "data.resolution=32", "optim.batch_size=2", "optim.max_steps=1", f"output_dir={label}",
                     "tensorboard=false", "overwrite=true"]) == 0
    assert json.loads((label / "run.json").read_text())["owner"] == "train"
    assert not list(label.glob("*.parquet")) and not (label / "manifest.json").exists()
    assert (label / "notes.txt").read_text() == "mine"
