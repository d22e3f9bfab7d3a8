"""Checkpoints: atomic writes, pruning, latest for resume=auto, exact round trips of weights, optimizer and RNG."""

import json
import random

import numpy as np
import pytest
import torch

from diffusion_dpo import checkpointing as ck
from diffusion_dpo.errors import InputError


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # a frozen part, as the base UNet under LoRA: never saved
    return model


def _save(out, step, model, opt, keep=None):
    return ck.save_checkpoint(out, step, trainable=ck.trainable_state_dict(model),
                              training_state={"optimizer": opt.state_dict()},
                              rank_state={"rng": ck.capture_rng_state(), "data": {"epoch": 1, "position": step}},
                              keep=keep)


def test_round_trip_of_weights_optimizer_rng_and_data(tmp_path):
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    path = _save(tmp_path, 5, model, opt)
    assert path == tmp_path / "checkpoints" / "step-5"
    expected = (random.random(), np.random.rand(), torch.rand(3))

    state = ck.load_checkpoint(path)
    assert state["step"] == 5 and state["rank_state"]["data"] == {"epoch": 1, "position": 5}
    assert set(state["trainable"]) == {"1.weight", "1.bias"}  # the frozen layer is not in the checkpoint
    fresh = _model()
    with torch.no_grad():
        fresh[1].weight.zero_()
    ck.load_trainable_state_dict(fresh, state["trainable"], str(path))
    assert torch.equal(fresh[1].weight, model[1].weight)
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=0.1)
    opt2.load_state_dict(state["training_state"]["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    ck.restore_rng_state(state["rank_state"]["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])


def test_keep_prunes_oldest_and_latest_is_newest(tmp_path):
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    assert ck.latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30):
        _save(tmp_path, step, model, opt, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-20", "step-30"]
    assert ck.latest_checkpoint(tmp_path).name == "step-30"


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path):
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _save(tmp_path, 100, model, opt)
    # a crash while writing step 200: its folder is still step-200.tmp, without state.json
    crashed = tmp_path / "checkpoints" / "step-200.tmp"
    crashed.mkdir()
    (crashed / "trainable.safetensors").write_bytes(b"half")
    assert ck.latest_checkpoint(tmp_path).name == "step-100"
    with pytest.raises(InputError, match="interrupted save"):
        ck.load_checkpoint(crashed)
    # the next save removes the leftover; saving an existing step again replaces it whole
    _save(tmp_path, 300, model, opt)
    _save(tmp_path, 300, model, opt)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-100", "step-300"]
    assert json.loads((tmp_path / "checkpoints" / "step-300" / "state.json").read_text())["step"] == 300


def test_mismatches_are_clear_errors(tmp_path):
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    path = _save(tmp_path, 1, model, opt)
    # Another number of processes reads every writer's state (the engine maps the data position from them);
    # process 1 of 2 takes the RNG of old process 1 mod 1 = 0.
    regrouped = ck.load_checkpoint(path, rank=1, world_size=2)
    assert regrouped["world_size"] == 1 and regrouped["strategy"] == "ddp" and len(regrouped["rank_states"]) == 1
    assert torch.equal(regrouped["rank_state"]["rng"]["torch"], ck.load_checkpoint(path)["rank_state"]["rng"]["torch"])
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))  # all trainable
    with pytest.raises(InputError, match="missing.*0.weight"):
        ck.load_trainable_state_dict(other, ck.load_checkpoint(path)["trainable"], str(path))
    with pytest.raises(InputError, match="not a complete checkpoint"):
        ck.load_checkpoint(tmp_path / "nowhere")
