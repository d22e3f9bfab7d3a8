"""``diffusion-dpo train`` on tiny SD3, FLUX.1 and Z-Image pipelines (32 px, CPU): the first loss is ln 2 (LoRA and
full), final/ loads into StableDiffusion3Pipeline / FluxPipeline and generates, resume is exact, gradient
accumulation matches a bigger batch, precompute trains like online and frees the text encoders, and two
processes end with identical weights."""

import json
import math
from pathlib import Path

import pytest
import torch
from run_files import metrics, run_on_two_processes, same, weights
from safetensors.torch import load_file

from diffusion_dpo.config import load_config
from diffusion_dpo.families import detect
from diffusion_dpo.recipes import train
from diffusion_dpo.tiny import build_tiny_pipeline, write_tiny_pairs

FAMILIES = ["sd3", "flux", "flux2", "flux2_klein", "z_image", "qwen_image", "wan"]




@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    pairs = str(write_tiny_pairs(root / "pairs", n_pairs=16))
    return {name: {"model": str(build_tiny_pipeline(root / name, family=name)), "pairs": pairs}
            for name in FAMILIES}


def config(world, out, *overrides):
    base = [f"model.pretrained={world['model']}", f"data.source={world['pairs']}", "data.resolution=32",
            f"output_dir={out}", "optim.learning_rate=1e-3", "optim.scale_lr=false", "optim.warmup_steps=0",
            "optim.batch_size=2", "log_every=1", "checkpoint_every=0", "noise.timestep_sampling=logit_normal"]
    return load_config(train.TrainConfig, [], base + list(overrides))



def generate(pipe):
    """The first image, or a video pipeline's (WanPipeline) one-frame video's frame."""
    video = {"num_frames": 1, "output_type": "pil"} if type(pipe).__name__ == "WanPipeline" else {}
    out = pipe(prompt="a red dog", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
               generator=torch.Generator().manual_seed(0), **video)
    return out.frames[0][0] if video else out.images[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_first_loss_is_ln2_and_final_loads(worlds, tmp_path, name):
    """The adapter starts at zero, so step 1 has loss ln 2 and margin 0; final/ is LoRA weights the
    family's pipeline loads, and they change what it generates."""
    world = worlds[name]
    result = train.run(config(world, tmp_path / "run", "model.lora_rank=4", "optim.max_steps=2"))
    assert result.format == "lora"
    first, second = metrics(tmp_path / "run")
    assert abs(first["loss"] - math.log(2)) < 1e-6 and first["reward_margin"] == 0.0
    assert second["model_mse_w"] != second["ref_mse_w"]
    family = detect(world["model"])
    base = generate(family.load_pipeline(world["model"]))
    pipe = family.load_pipeline(world["model"], lora=result.final)
    assert type(pipe).__name__ == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
                                   "flux2": "Flux2Pipeline", "flux2_klein": "Flux2KleinPipeline",
                                   "z_image": "ZImagePipeline", "qwen_image": "QwenImagePipeline", "wan": "WanPipeline"}[name]
    tuned = generate(pipe)
    assert tuned.size == (32, 32) and tuned.tobytes() != base.tobytes()


@pytest.mark.parametrize("name", FAMILIES)
def test_full_finetune_resume_is_exact_and_final_loads(worlds, tmp_path, name):
    """4 steps straight == 2 steps, checkpoint, resume for 2 (bit-identical on CPU), with flips, caption
    dropout and gradient checkpointing; the first loss is ln 2; final/ is a transformer folder."""
    world = worlds[name]
    extra = ["model.lora_rank=0", "optim.max_steps=4", "checkpoint_every=2", "checkpoints_keep=null",
             "data.random_flip=true", "data.caption_dropout=0.5", "model.gradient_checkpointing=true"]
    straight = train.run(config(world, tmp_path / "a", *extra))
    assert straight.format == "transformer"
    assert abs(metrics(tmp_path / "a")[0]["loss"] - math.log(2)) < 1e-6
    ckpt = tmp_path / "a" / "checkpoints" / "step-2"
    resumed = train.run(config(world, tmp_path / "b", *extra, f"resume={ckpt}"))
    assert resumed.resumed_from == str(ckpt) and resumed.steps == 4
    assert same(weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final"))
    assert metrics(tmp_path / "a")[2:] == [dict(r, pairs_per_s=a["pairs_per_s"]) for r, a in
                                          zip(metrics(tmp_path / "b"), metrics(tmp_path / "a")[2:])]

    family = detect(world["model"])
    tuned = family.load_denoiser(straight.final)
    assert type(tuned).__name__ == family.denoiser_class
    base = family.load_denoiser(str(Path(world["model"]) / "transformer"))
    assert not same(tuned.state_dict(), base.state_dict())
    assert generate(family.load_pipeline(world["model"], denoiser=straight.final)).size == (32, 32)


@pytest.mark.parametrize("name", FAMILIES)
def test_gradient_accumulation_matches_a_bigger_batch(worlds, tmp_path, name):
    """2 micro-batches of 1 pair == 1 batch of 2: same rows, sigmas and noise (beta 1 and Adam epsilon 1
    keep the update linear in the gradient, so the weights agree to float rounding)."""
    world = worlds[name]
    linear = ["model.lora_rank=0", "optim.max_steps=1", "loss.beta=1", "optim.eps=1", "optim.max_grad_norm=0"]
    train.run(config(world, tmp_path / "one", *linear))
    train.run(config(world, tmp_path / "two", *linear, "optim.batch_size=1", "optim.gradient_accumulation_steps=2"))
    a, b = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    base = load_file(next((Path(world["model"]) / "transformer").glob("*.safetensors")))
    assert max((a[k] - base[k]).abs().max() for k in a) > 1e-6
    assert same(a, b, atol=5e-8)


@pytest.mark.parametrize("name", FAMILIES)
def test_precompute_trains_like_online_and_frees_the_encoders(worlds, tmp_path, name):
    world = worlds[name]
    # beta 1 and Adam epsilon 1 keep batched-encoding float error from being magnified; lr 0.1 makes the
    # adapter's move (~lr x gradient) well above it
    extra = ["model.lora_rank=4", "optim.max_steps=3", "data.random_flip=true", "data.caption_dropout=0.5",
             "loss.beta=1", "optim.eps=1", "optim.max_grad_norm=0", "optim.learning_rate=0.1"]
    train.run(config(world, tmp_path / "online", *extra))
    cached = train.run(config(world, tmp_path / "cached", *extra, "precompute=true"))
    assert cached.data["cached_pairs"] == 16
    online, from_cache = weights(tmp_path / "online" / "final"), weights(tmp_path / "cached" / "final")
    update = max(online[k].abs().max() for k in online if "lora_B" in k or ".up." in k)
    assert update > 1e-6
    assert same(online, from_cache, atol=1e-3 * float(update))

    from diffusion_dpo import models

    comps = models.load_components(world["model"])
    frozen = sum(p.numel() * 4 for m in [comps.vae, *comps.text_encoders] for p in m.parameters())
    summary = json.loads((tmp_path / "cached" / "summary.json").read_text())
    assert summary["precompute_freed_bytes"] == frozen  # fp32 on CPU: 4 bytes per parameter
    assert json.loads((tmp_path / "online" / "summary.json").read_text())["precompute_freed_bytes"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_two_processes_agree(worlds, tmp_path, name):
    """torchrun starts two CPU processes (gloo); both end with the same weights."""
    world, out = worlds[name], tmp_path / "ddp"
    args = [f"model.pretrained={world['model']}", f"data.source={world['pairs']}", "data.resolution=32",
            "model.lora_rank=4", "optim.max_steps=2", "optim.batch_size=2", "checkpoint_every=0",
            "optim.learning_rate=1e-3", "optim.scale_lr=false", "optim.warmup_steps=0", f"output_dir={out}"]
    run_on_two_processes("train", args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["format"] == "lora"
    digests = summary["weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_flow_example_configs_parse_and_name_their_command():
    from diffusion_dpo import ASSETS
    from diffusion_dpo.config import validate

    for name in ("sd35_medium_lora", "flux_dev_lora"):
        path = ASSETS / "configs" / f"{name}.yaml"
        first = path.read_text().split("\n")[0]
        assert first.startswith("# ") and f"train --config {name}" in first
        cfg = load_config(train.TrainConfig, [str(path)])
        validate(cfg)
        assert cfg.loss.beta == 100 and cfg.noise.timestep_sampling == "logit_normal" and cfg.model.lora_rank > 0


def test_describe_data_adds_up_a_cache_of_several_processes():
    data = {"cached_pairs": 16, "caching_pass": [
        {"pairs_used": 8, "ties_dropped": 1, "bad_rows": {"undecodable image": 1}, "first_bad": "row 3 of x"},
        {"pairs_used": 8, "ties_dropped": 0, "bad_rows": {"undecodable image": 2}, "first_bad": None}]}
    assert train.describe_data(data) == ("data: 16 pairs used, 1 ties dropped, bad rows: 3 undecodable image "
                                         "(first: row 3 of x)")
