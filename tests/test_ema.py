"""The EMA of the trained weights (engine.ema): the update against numbers worked by hand, skipped steps
leave it alone, it lives in checkpoints and survives a resume bit for bit, final/ can be written from it (train,
and an LLM command), and a resume from a checkpoint without one starts it from the restored weights."""

import pytest
import torch
import yaml
from run_files import CountingFeed, same, weights
from safetensors.torch import load_file

from diffusion_dpo.config import load_config
from diffusion_dpo.engine import Engine, StepOutput, build_optimizer
from diffusion_dpo.engine.ema import EMA
from diffusion_dpo.errors import InputError
from diffusion_dpo.llm import tiny as llm_tiny
from diffusion_dpo.recipes import llm_sft, train
from diffusion_dpo.run_options import EMASection, OptimSection, TrainingRunOptions
from diffusion_dpo.tiny import build_tiny_pipeline, write_tiny_pairs


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.frozen = torch.nn.Parameter(torch.tensor([5.0]), requires_grad=False)


def test_the_update_matches_numbers_worked_by_hand():
    """decay 0.75, every 2, start_step 3; the weights after step s are s x [4, -8]; the EMA starts at 0:

        step 1 (w = 4):  before start_step: copy                       -> 4
        step 2 (w = 8):  copy                                          -> 8
        step 3 (w = 12): 3 is not a multiple of 2: unchanged           -> 8
        step 4 (w = 16): 0.75 x 8 + 0.25 x 16 = 6 + 4                  -> 10
        step 5 (w = 20): unchanged                                     -> 10
        step 6 (w = 24): 0.75 x 10 + 0.25 x 24 = 7.5 + 6               -> 13.5

    (the second element is -2 x the first). A swapped decay (0.25 x ema + 0.75 x w) would give 14 at step 4."""
    toy = Toy()
    ema = EMA(toy, EMASection(decay=0.75, every=2, start_step=3))
    seen = []
    for step in range(1, 7):
        with torch.no_grad():
            toy.w.copy_(step * torch.tensor([4.0, -8.0]))
        ema.update(step)
        seen.append(ema.state_dict()["w"][0].item())
    assert seen == [4.0, 8.0, 8.0, 10.0, 10.0, 13.5]
    assert set(ema.state_dict()) == {"w"} and ema.state_dict()["w"].dtype == torch.float32
    assert torch.equal(ema.state_dict()["w"], torch.tensor([13.5, -27.0]))

    with ema.swapped_in() as module:  # the EMA stands in the module, then the trained weights come back
        assert module is toy and torch.equal(toy.w, torch.tensor([13.5, -27.0]))
    assert torch.equal(toy.w, torch.tensor([24.0, -48.0])) and toy.w.requires_grad

    with pytest.raises(InputError, match="missing"):
        ema.load_state_dict({"v": torch.zeros(2)}, "ema.safetensors")
    ema.load_state_dict({"w": torch.tensor([1.0, 2.0])}, "ema.safetensors")
    assert torch.equal(ema.state_dict()["w"], torch.tensor([1.0, 2.0]))


def toy_run(out, *, steps=4, poison=(), resume=None, ema=None, record=None):
    """Fit y = 2x with the engine, the model passed through engine.prepare (where the EMA starts); the loss
    of every step in ``poison`` is NaN; ``record`` collects (steps done, weights) before each step."""
    cfg = TrainingRunOptions(output_dir=str(out), resume=resume, tensorboard=False, log_every=1,
                             checkpoint_every=2, checkpoints_keep=None, max_nonfinite_steps=3,
                             ema=ema or EMASection(decay=0.5))
    engine = Engine(cfg, seed=0, unit="examples", name="toy")
    model = torch.nn.Linear(2, 1, bias=False)
    optim = OptimSection(learning_rate=0.1, scheduler="constant", max_steps=steps, batch_size=2)
    optimizer, scheduler = build_optimizer(model.parameters(), optim, steps)
    model, optimizer = engine.prepare(model, optimizer)
    feed = CountingFeed()
    engine.resume(model, optimizer, scheduler, feed)

    def step(x, ctx):
        if record is not None:
            record.append((ctx.step, model.weight.detach().clone()))
        losses = (model(x).squeeze(1) - 2 * x[:, 0]) ** 2
        return StepOutput(losses * float("nan") if ctx.step + 1 in poison else losses, units=len(x))

    engine.fit(model=model, policy=model, optimizer=optimizer, scheduler=scheduler, feed=feed, batch_size=2,
               step_fn=step, max_steps=steps, max_grad_norm=0.0)
    engine.save_final(model, lambda folder: (folder.mkdir(), torch.save(model.state_dict(), folder / "w.pt")))
    ema_state = {k: v.clone() for k, v in engine.ema.state_dict().items()} if engine.ema else None
    engine.finish({})
    return model, ema_state


def test_a_skipped_step_leaves_the_ema_and_final_can_hold_it(tmp_path):
    """decay 0.5 every step; step 2 is NaN (no update): the EMA averages the weights after steps 1, 3, 4 into
    the starting weights; step-4's ema.safetensors holds it, and with ema.final final/ holds it too."""
    record = []
    model, ema = toy_run(tmp_path / "run", poison={2}, record=record,
                         ema=EMASection(decay=0.5, final=True))
    after = dict(record)  # steps done -> the weights then (step 2's record is the weights after step 1)
    expected = after[0]
    for done in (1, 3):  # the weights after steps 1 and 3, then the final ones (after step 4)
        expected = 0.5 * expected + 0.5 * after[done]
    expected = 0.5 * expected + 0.5 * model.weight.detach()
    assert torch.equal(after[1], after[2])  # step 2 changed nothing
    torch.testing.assert_close(ema["weight"], expected, rtol=0, atol=1e-7)
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-4" / "ema.safetensors")
    assert torch.equal(saved["weight"], ema["weight"])
    final = torch.load(tmp_path / "run" / "final" / "w.pt", weights_only=True)
    assert torch.equal(final["weight"], ema["weight"]) and not torch.equal(final["weight"], model.weight)


def test_the_ema_resumes_bit_for_bit(tmp_path, capsys):
    straight, ema_a = toy_run(tmp_path / "a", steps=4)
    toy_run(tmp_path / "b", steps=2)
    resumed, ema_b = toy_run(tmp_path / "b", steps=4, resume="auto")
    assert torch.equal(straight.weight, resumed.weight) and torch.equal(ema_a["weight"], ema_b["weight"])
    a, b = (load_file(tmp_path / r / "checkpoints" / "step-4" / "ema.safetensors") for r in "ab")
    assert same(a, b)

    # A resume may not change the EMA's meaning (decay), but may change which weights final/ holds.
    with pytest.raises(InputError, match=r"ema\.decay"):
        toy_run(tmp_path / "b", steps=6, resume="auto", ema=EMASection(decay=0.9))
    toy_run(tmp_path / "b", steps=6, resume="auto", ema=EMASection(decay=0.5, final=True))
    assert "ema.final (False -> True)" in capsys.readouterr().out


def test_a_checkpoint_without_ema_starts_it_from_its_weights(tmp_path, capsys):
    """A run from before the EMA (its config.yaml has no ema section) resumed with one: printed note; the EMA
    starts from the step-2 weights (checked: at step 2 with nothing left to do, it equals them)."""
    out = tmp_path / "old"
    toy_run(out, steps=2, ema=EMASection(decay=0.0))
    assert not (out / "checkpoints" / "step-2" / "ema.safetensors").exists()
    config = yaml.safe_load((out / "config.yaml").read_text())
    del config["ema"]
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    model, ema = toy_run(out, steps=2, resume="auto")
    assert "holds no EMA" in capsys.readouterr().out
    assert torch.equal(ema["weight"], model.weight.detach())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    return {"sd": str(build_tiny_pipeline(root / "sd")), "pairs": str(write_tiny_pairs(root / "pairs", n_pairs=8)),
            "llm": llm_tiny.write_world(root / "llm")}


def test_train_resumes_its_ema_and_writes_final_from_it(world, tmp_path):
    """A full fine-tune for 4 steps straight == 2 steps, checkpoint, resume for 2: the same ema.safetensors at
    step 4 and the same final/, which holds the EMA (not the trained weights of step 4)."""
    def config(out, *overrides):
        base = [f"model.pretrained={world['sd']}", f"data.source={world['pairs']}", "data.resolution=32",
                f"output_dir={out}", "optim.learning_rate=1e-3", "optim.warmup_steps=0", "optim.batch_size=2",
                "log_every=1", "model.lora_rank=0", "optim.max_steps=4", "checkpoint_every=2",
                "checkpoints_keep=null", "ema.decay=0.5", "ema.final=true", "tensorboard=false"]
        return load_config(train.TrainConfig, [], base + list(overrides))

    train.run(config(tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "step-2"
    train.run(config(tmp_path / "b", f"resume={ckpt}"))
    emas = [load_file(tmp_path / r / "checkpoints" / "step-4" / "ema.safetensors") for r in "ab"]
    assert same(*emas)
    final = weights(tmp_path / "a" / "final")
    assert same(final, weights(tmp_path / "b" / "final"))
    assert same(final, emas[0])
    assert not same(final, load_file(tmp_path / "a" / "checkpoints" / "step-4" / "trainable.safetensors"))


def test_an_llm_command_keeps_an_ema(world, tmp_path):
    from diffusion_dpo.llm import models

    out = tmp_path / "sft"
    summary = llm_sft.run(load_config(llm_sft.SFTConfig, [], [
        f"model.name_or_path={world['llm']['model']}", f"data.source={world['llm']['demos']}", f"output_dir={out}",
        "tensorboard=false", "optim.learning_rate=0.01", "optim.max_steps=3", "optim.batch_size=8",
        "checkpoint_every=3", "ema.decay=0.5", "ema.final=true"]))
    ema = load_file(out / "checkpoints" / "step-3" / "ema.safetensors")
    trained = load_file(out / "checkpoints" / "step-3" / "trainable.safetensors")
    reloaded = dict(models.load_causal_lm(summary["final"]).named_parameters())
    assert ema.keys() == trained.keys() and ema.keys() <= reloaded.keys()
    assert all(torch.equal(reloaded[k].float(), ema[k]) for k in ema)
    assert not all(torch.equal(ema[k], trained[k]) for k in ema)
