"""The training recipe end to end on tiny pipelines (32 px, a few steps, CPU): the first loss is ln 2, final/
loads into a pipeline, resume is exact, precompute equals online, SDXL / v-prediction / SFT / gradient
accumulation, bad configs, and two processes."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from run_files import metrics, run_on_two_processes, same, weights
from safetensors.torch import load_file

from diffusion_dpo import ASSETS, cli
from diffusion_dpo.config import load_config, validate
from diffusion_dpo.denoising import PairInputs
from diffusion_dpo.objectives import dpo_objective
from diffusion_dpo.recipes import train
from diffusion_dpo.reference import FrozenCopy
from diffusion_dpo.run_options import PreferenceLossSection
from diffusion_dpo.sampling import generate, load_pipeline
from diffusion_dpo.tiny import build_tiny_pipeline, write_tiny_pairs

METRICS = {"step", "loss", "implicit_acc", "reward_margin", "model_mse_w", "model_mse_l", "ref_mse_w",
           "ref_mse_l", "lr", "grad_norm", "pairs_per_s", "nonfinite_steps"}




@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return {"sd": str(build_tiny_pipeline(root / "sd")), "pairs": str(write_tiny_pairs(root / "pairs", n_pairs=16))}


def config(world, out, *overrides):
    base = [f"model.pretrained={world['sd']}", f"data.source={world['pairs']}", "data.resolution=32",
            f"output_dir={out}", "optim.learning_rate=1e-3", "optim.scale_lr=false", "optim.warmup_steps=0",
            "optim.batch_size=2", "log_every=1", "checkpoint_every=0"]
    return load_config(train.TrainConfig, [], base + list(overrides))



def test_lora_dpo_from_the_tiny_config(tmp_path):
    """The README's offline command with model.pretrained=tiny and data.source=tiny; the policy starts equal
    to the reference, so step 1 has loss -log sigmoid(0) = ln 2, accuracy 1/2 (all ties) and margin 0."""
    out = tmp_path / "run"
    rc = cli.main(["train", "--config", str(ASSETS / "configs" / "tiny.yaml"), f"output_dir={out}",
                   "optim.max_steps=2", "optim.batch_size=2", "log_every=1", "checkpoint_every=0",
                   "model.lora_rank=4", "optim.learning_rate=1e-3"])
    assert rc == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and set(rows[0]) == METRICS
    first = rows[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert first["implicit_acc"] == 0.5 and first["reward_margin"] == 0.0
    assert first["model_mse_w"] == first["ref_mse_w"] and first["model_mse_l"] == first["ref_mse_l"]
    assert rows[1]["model_mse_w"] != rows[1]["ref_mse_w"]  # one step later the adapter has moved
    saved = load_config(train.TrainConfig, [str(out / "config.yaml")])
    assert saved.model.pretrained == "tiny" and saved.mixed_precision == "no"  # auto resolved on CPU
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()

    pipe_dir = str(out / "tiny" / "tiny")
    base = generate(load_pipeline(pipe_dir, device="cpu"), ["a red dog"], [0], num_inference_steps=2)[0]
    tuned = generate(load_pipeline(pipe_dir, lora=str(out / "final"), device="cpu"), ["a red dog"], [0],
                     num_inference_steps=2)[0]
    assert tuned.size == (32, 32) and tuned.tobytes() != base.tobytes()


def test_full_finetune_resume_is_exact(world, tmp_path):
    """4 steps straight == 2 steps, checkpoint, then resume for 2 more (bit-identical on CPU), with random
    flips and caption dropout on, so the data position and the noise must both resume exactly."""
    from diffusers import UNet2DConditionModel

    extra = ["model.lora_rank=0", "optim.max_steps=4", "checkpoint_every=2", "checkpoints_keep=null",
             "data.random_flip=true", "data.caption_dropout=0.5"]
    straight = train.run(config(world, tmp_path / "a", *extra))
    ckpt = tmp_path / "a" / "checkpoints" / "step-2"
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step-2", "step-4"]
    unet = UNet2DConditionModel.from_pretrained(world["sd"], subfolder="unet")
    assert load_file(ckpt / "trainable.safetensors").keys() == unet.state_dict().keys()  # the policy only

    resumed = train.run(config(world, tmp_path / "b", *extra, f"resume={ckpt}"))
    assert resumed.resumed_from == str(ckpt) and resumed.steps == straight.steps == 4
    assert same(weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final"))
    assert metrics(tmp_path / "a")[2:] == [dict(r, pairs_per_s=a["pairs_per_s"]) for r, a in
                                          zip(metrics(tmp_path / "b"), metrics(tmp_path / "a")[2:])]

    # resume=auto finds step-4 of a finished run and has nothing left to do
    again = train.run(config(world, tmp_path / "a", *extra, "resume=auto"))
    assert again.resumed_from.endswith("step-4") and again.steps == 4

    tuned = UNet2DConditionModel.from_pretrained(tmp_path / "a" / "final")
    assert not torch.equal(tuned.conv_in.weight, unet.conv_in.weight)
    pipe = load_pipeline(world["sd"], denoiser=str(tmp_path / "a" / "final"), device="cpu")
    assert generate(pipe, ["a red dog"], [0], num_inference_steps=2)[0].size == (32, 32)


def test_sdxl_v_prediction_lora(tmp_path):
    path = str(build_tiny_pipeline(tmp_path / "sdxl", sdxl=True, prediction_type="v_prediction"))
    world = {"sd": path, "pairs": str(write_tiny_pairs(tmp_path / "pairs", n_pairs=8))}
    summary = train.run(config(world, tmp_path / "run", "model.lora_rank=4", "optim.max_steps=1"))
    assert summary.format == "lora"
    assert abs(metrics(tmp_path / "run")[0]["loss"] - math.log(2)) < 1e-6
    pipe = load_pipeline(path, lora=str(tmp_path / "run" / "final"), device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert generate(pipe, ["a red dog"], [0], num_inference_steps=2)[0].size == (32, 32)


def test_gradient_accumulation_matches_a_bigger_batch(world, tmp_path):
    """One step of 2 micro-batches of 1 pair == one step of 1 batch of 2 pairs: same rows, same per-pair
    noise, gradients averaged the same way. beta 1 and Adam epsilon 1 make the update linear in the gradient
    (beta 5000 and Adam's first step g/|g| would magnify float rounding), so the weights agree to rounding."""
    from diffusers import UNet2DConditionModel

    linear = ["model.lora_rank=0", "optim.max_steps=1", "loss.beta=1", "optim.eps=1",
              "optim.max_grad_norm=0"]
    one = train.run(config(world, tmp_path / "one", *linear))
    two = train.run(config(world, tmp_path / "two", *linear, "optim.batch_size=1",
                           "optim.gradient_accumulation_steps=2"))
    assert one.pairs_per_step == two.pairs_per_step == 2
    a, b = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    base = UNet2DConditionModel.from_pretrained(world["sd"], subfolder="unet").state_dict()
    assert max((a[k] - base[k]).abs().max() for k in a) > 1e-6  # the step moved the weights
    assert same(a, b, atol=5e-8)  # and both ways moved them alike, to float32 rounding


def test_precompute_trains_like_online_and_sft(world, tmp_path):
    """The latent cache visits the same rows with the same flips, caption dropout and noise as the online
    encoders, so 3 LoRA steps give the same weights, to the float error of encoding the VAE in batches of
    another size (a wrong flip or caption would move them by as much as an update). beta 1 and Adam epsilon 1
    keep that error from being magnified (see the accumulation test)."""
    extra = ["model.lora_rank=4", "optim.max_steps=3", "data.random_flip=true", "data.caption_dropout=0.5",
             "loss.beta=1", "optim.eps=1", "optim.max_grad_norm=0"]
    train.run(config(world, tmp_path / "online", *extra))
    cached = train.run(config(world, tmp_path / "cached", *extra, "precompute=true"))
    assert cached.data["cached_pairs"] == 16
    assert (tmp_path / "cached" / "latent_cache" / "meta.json").is_file()
    online, from_cache = weights(tmp_path / "online" / "final"), weights(tmp_path / "cached" / "final")
    update = max(online[k].abs().max() for k in online if ".up." in k)  # LoRA B starts at zero
    assert update > 1e-6
    assert same(online, from_cache, atol=1e-3 * float(update))

    train.run(config(world, tmp_path / "sft", "model.lora_rank=4", "optim.max_steps=1", "method=sft"))
    (row,) = metrics(tmp_path / "sft")
    assert set(row) == {"step", "loss", "model_mse_w", "lr", "grad_norm", "pairs_per_s", "nonfinite_steps"}
    assert row["loss"] == row["model_mse_w"]


class _ScaledUNet(torch.nn.Module):
    """A stand-in UNet predicting scale * x_t, so denoising errors are known closed forms."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, noisy, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        return SimpleNamespace(sample=self.scale * noisy)


def test_dpo_objective_counts_ties_as_half():
    """A tie's loss is the mean over both orders: 0.5 (softplus(-z) + softplus(z)); its accuracy is 0.5."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    x = PairInputs(torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g) * 3,
                   torch.randn(2, 4, 2, 2, generator=g), torch.tensor([500, 500]), {"hidden": torch.zeros(2, 1, 1)})
    opts = PreferenceLossSection(beta=1.0)
    out = dpo_objective(_ScaledUNet(0.9), FrozenCopy(_ScaledUNet(1.0)), x, torch.tensor([False, True]),
                              sched, opts)
    losses, m = out.losses, out.metrics
    z = -0.5 * ((m["model_mse_w"] - m["ref_mse_w"]) - (m["model_mse_l"] - m["ref_mse_l"]))
    softplus = torch.nn.functional.softplus
    assert torch.allclose(losses[0], softplus(-z[0]))
    assert torch.allclose(losses[1], 0.5 * (softplus(-z[1]) + softplus(z[1])))
    assert m["implicit_acc"][1] == 0.5 and m["implicit_acc"][0] in (0.0, 1.0)


def test_bad_configs_are_clear_errors(world, tmp_path, capsys):
    cases = [
        (["model.lora_rank=-1"], "model.lora_rank"),
        (["train.lr=1"], "unknown config key 'train.lr'"),
        ([f"resume={tmp_path / 'nope'}"], "does not exist"),
        (["loss.loss_type=hinge", "loss.label_smoothing=0.1"], "loss.label_smoothing"),
        (["method=ppo"], "method"),
    ]
    for overrides, message in cases:
        assert cli.main(["train", f"output_dir={tmp_path / 'x'}", f"data.source={world['pairs']}", *overrides]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing was started


@pytest.mark.slow
def test_two_processes_split_the_data_and_agree(world, tmp_path):
    """torchrun starts two CPU processes (gloo): each trains on its own rows, both end with the same weights."""
    out = tmp_path / "ddp"
    args = [f"model.pretrained={world['sd']}", f"data.source={world['pairs']}", "data.resolution=32",
            "model.lora_rank=4", "optim.max_steps=2", "optim.batch_size=2", "checkpoint_every=2", "log_rows=true",
            "optim.learning_rate=1e-3", "optim.scale_lr=false", "optim.warmup_steps=0", f"output_dir={out}"]
    run_on_two_processes("train", args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["pairs_per_step"] == 4
    digests = summary["weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    rows = {}
    for rank in (0, 1):
        lines = (out / "rows" / f"rank-{rank}.txt").read_text().split("\n")
        rows[rank] = [int(r) for line in lines if line for r in line.split()[2:]]
    assert len(rows[0]) == len(rows[1]) == 4 and not set(rows[0]) & set(rows[1])
    assert {p.name for p in (out / "checkpoints" / "step-2").iterdir()} >= {"rank-0.pt", "rank-1.pt"}


def test_example_configs_parse_and_name_their_command():
    for name in ("tiny", "sd15_train", "sdxl_train"):
        path = ASSETS / "configs" / f"{name}.yaml"
        first = path.read_text().split("\n")[0]
        named = f"assets/configs/{name}.yaml" if name == "tiny" else name  # real configs: by name (a wheel has no assets/)
        assert first.startswith("# ") and f"train --config {named}" in first
        validate(load_config(train.TrainConfig, [str(path)], ["mixed_precision=bf16"]))
    paper = load_config(train.TrainConfig, [str(ASSETS / "configs" / "sd15_train.yaml")])
    t = paper.optim
    assert (paper.loss.beta, t.learning_rate, t.scale_lr, t.batch_size * t.gradient_accumulation_steps * 16) == \
        (5000, 1e-8, True, 2048)


def test_train_says_what_the_data_did(tmp_path, capsys):
    pairs = write_tiny_pairs(tmp_path / "pairs", n_pairs=8, n_ties=2)
    sd = build_tiny_pipeline(tmp_path / "sd")
    assert cli.main(["train", f"model.pretrained={sd}", f"data.source={pairs}", "data.resolution=32",
                     "optim.max_steps=1", "optim.batch_size=2", f"output_dir={tmp_path / 'run'}"]) == 0
    assert "data: 2 pairs used, 2 ties dropped" in capsys.readouterr().out


@pytest.mark.slow
def test_the_tiny_example_trains_healthily(tmp_path):
    """The README's first train command: the loss falls below ln 2 while implicit accuracy climbs."""
    assert cli.main(["train", "--config", str(ASSETS / "configs" / "tiny.yaml"), f"output_dir={tmp_path}/run",
                     "checkpoint_every=0", "tensorboard=false"]) == 0
    rows = metrics(tmp_path / "run")
    assert rows[-1]["loss"] < math.log(2) and rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["implicit_acc"] > 0.6 and rows[-1]["reward_margin"] > rows[0]["reward_margin"]
