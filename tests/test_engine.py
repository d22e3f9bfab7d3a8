"""The training engine on a toy linear model: the non-finite guard, exact resume, the one output-folder rule,
and the train recipe driven to NaN."""

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from run_files import CountingFeed
from safetensors.torch import load_file

from diffusion_dpo import ASSETS, cli
from diffusion_dpo.engine import Engine, NonFiniteError, StepOutput, build_optimizer
from diffusion_dpo.errors import InputError
from diffusion_dpo.run_options import OptimSection, TrainingRunOptions


def toy_run(out, *, steps=4, poison=(), resume=None, overwrite=False, max_nonfinite=3, checkpoint_every=2):
    """Fit y = 2x on the feed with SGD; the loss of every step in ``poison`` is made NaN."""
    cfg = TrainingRunOptions(output_dir=str(out), resume=resume, overwrite=overwrite, tensorboard=False,
                             log_every=1, checkpoint_every=checkpoint_every, checkpoints_keep=None,
                             max_nonfinite_steps=max_nonfinite)
    engine = Engine(cfg, seed=0, unit="examples", name="toy")
    model = torch.nn.Linear(2, 1, bias=False)
    optim = OptimSection(learning_rate=1e-3, scheduler="constant", max_steps=steps, batch_size=2)
    optimizer, scheduler = build_optimizer(model.parameters(), optim, steps)
    feed = CountingFeed()
    engine.resume(model, optimizer, scheduler, feed)

    def step(x, ctx):
        losses = (model(x).squeeze(1) - 2 * x[:, 0]) ** 2
        if ctx.step + 1 in poison:
            losses = losses * float("nan")
        return StepOutput(losses, {"pred_mean": model(x).mean()}, units=len(x))

    last = engine.fit(model=model, policy=model, optimizer=optimizer, scheduler=scheduler, feed=feed,
                      batch_size=2, step_fn=step, max_steps=steps, max_grad_norm=0.0)
    engine.save_final(model, lambda folder: (folder.mkdir(), torch.save(model.state_dict(), folder / "w.pt")))
    summary = engine.finish({"weight": model.weight.detach().clone().tolist()})
    return model, last, summary


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_a_nan_step_is_skipped_and_counted(tmp_path):
    """Step 2's loss is NaN: no update happens at step 2, so the weights after 3 steps equal those of a run
    whose step 2 batch did nothing; later steps train on."""
    model, last, summary = toy_run(tmp_path / "nan", steps=3, poison={2})
    log = rows(tmp_path / "nan")
    assert [r["step"] for r in log] == [1, 3]  # the skipped step has no metrics row
    assert [r["nonfinite_steps"] for r in log] == [0, 1] and summary["nonfinite_steps"] == 1
    assert all(math.isfinite(v) for r in log for v in r.values())
    assert torch.isfinite(model.weight).all()

    # By hand: the same SGD without the poisoned update (positions 0-1, then 4-5; batch 2-3 skipped).
    torch.manual_seed(0)
    w = torch.nn.Linear(2, 1, bias=False)
    opt = torch.optim.AdamW(w.parameters(), lr=1e-3, weight_decay=0.0)
    for start in (0, 4):
        x = torch.tensor([[float(start), 1.0], [float(start + 1), 1.0]])
        ((w(x).squeeze(1) - 2 * x[:, 0]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(w.weight, model.weight)


def test_nonfinite_steps_in_a_row_stop_the_run_with_the_step_named(tmp_path):
    out = tmp_path / "diverge"
    with pytest.raises(NonFiniteError, match=r"step 5: loss is not finite for 3 steps in a row"):
        toy_run(out, steps=8, poison={3, 4, 5}, max_nonfinite=3)
    # The checkpoint at step 2 is good; step 4's is finite too (it holds step 2's weights: nothing updated).
    for ckpt in sorted((out / "checkpoints").iterdir()):
        weights = load_file(ckpt / "trainable.safetensors")
        assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (out / "final").exists()


def test_resume_equals_the_undisturbed_run(tmp_path):
    straight, _, _ = toy_run(tmp_path / "a", steps=4)
    toy_run(tmp_path / "b", steps=2)
    resumed, _, summary = toy_run(tmp_path / "b", steps=4, resume="auto")
    assert summary["resumed_from"].endswith("step-2")
    assert torch.equal(straight.weight, resumed.weight)
    drop = ("examples_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "a")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "b")]


def test_the_output_folder_rule(tmp_path):
    out = tmp_path / "run"
    toy_run(out, steps=2)
    with pytest.raises(InputError, match="already holds a run.*resume=auto.*overwrite=true"):
        toy_run(out, steps=2)
    (out / "notes.txt").write_text("mine")
    toy_run(out, steps=2, overwrite=True)  # replaces the run's own files, not the user's
    assert (out / "notes.txt").read_text() == "mine" and [r["step"] for r in rows(out)] == [1, 2]
    with pytest.raises(InputError, match="give one of them"):
        toy_run(out, steps=2, overwrite=True, resume="auto")
    _, _, summary = toy_run(out, steps=3, resume="auto")  # continues from step-2
    assert summary["resumed_from"].endswith("step-2") and summary["steps"] == 3


@pytest.mark.slow
def test_train_driven_to_nan_writes_no_nan_weights(tmp_path, capsys):
    """The tiny config with lr 1e30 and no clipping diverges: every checkpoint written is finite, the run stops
    after max_nonfinite_steps skipped steps naming the step, and no final/ is written."""
    out = tmp_path / "run"
    args = ["train", "--config", str(ASSETS / "configs" / "tiny.yaml"), f"output_dir={out}", "optim.learning_rate=1e30",
            "optim.max_grad_norm=0", "optim.max_steps=12", "optim.batch_size=2", "checkpoint_every=2",
            "checkpoints_keep=null", "max_nonfinite_steps=3", "log_every=1"]
    assert cli.main(args) == 1
    assert re.search(r"step \d+: \S+ is not finite for 3 steps in a row", capsys.readouterr().err)
    for ckpt in (out / "checkpoints").iterdir():
        assert all(torch.isfinite(v).all() for v in load_file(ckpt / "trainable.safetensors").values())
    assert not (out / "final").exists()
    assert all(math.isfinite(v) for r in rows(out) for v in r.values())


def test_train_checks_inputs_before_writing(tmp_path):
    out = tmp_path / "x"
    assert cli.main(["train", "model.pretrained=tiny", f"data.source={tmp_path / 'missing'}",
                     f"output_dir={out}"]) == 2
    assert not out.exists()


def test_engine_config_is_validated(tmp_path):
    cfg = dataclasses.replace(TrainingRunOptions(output_dir=str(tmp_path / "v")), log_every=0)
    with pytest.raises(InputError, match="'log_every'"):
        Engine(cfg, seed=0)


def test_train_without_data_source_points_at_label_and_the_column_maps(tmp_path, capsys):
    """data.source has no default (Pick-a-Pic left the hub): missing, it is refused before anything is
    written, naming the key, `diffusion-dpo label` and the shipped column maps."""
    for given in ([], ["data.source=null"], ["data.source="]):
        out = tmp_path / "x"
        assert cli.main(["train", "model.pretrained=tiny", f"output_dir={out}", *given]) == 2
        assert not out.exists()
        err = capsys.readouterr().err
        assert "'data.source'" in err and "diffusion-dpo label" in err and "assets/configs/data/" in err
