"""Wan: detection, UMT5 text against the pipeline's own encode_prompt (cleaning, zero padding, the empty
negative prompt), the frame rule and video latent shapes, the per-channel normalisation on 5-D latents, the
online sampler on 5-frame videos against WanPipeline, the training scheduler of a UniPC checkpoint, Wan
2.2's two experts switched at the boundary as the pipeline switches them, grpo and evaluate on videos."""

import json
from pathlib import Path

import pytest
import torch

from diffusion_dpo import models
from diffusion_dpo.config import ConfigError, load_config
from diffusion_dpo.errors import InputError
from diffusion_dpo.evaluation.video import read_video
from diffusion_dpo.families import by_name, detect, detect_index
from diffusion_dpo.families.wan import NEGATIVE_PROMPT, clean_prompt, latent_frames
from diffusion_dpo.online.rollout import Conditioning, decode, guided_predict, rollout, sampling_schedule
from diffusion_dpo.recipes.grpo import frame_mean, video_frames
from diffusion_dpo.tiny import build_tiny_pipeline

CAPTIONS = ["a red  dog &amp; a cat ", "a green square on a black background"]
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    return {"wan": str(build_tiny_pipeline(root / "wan", family="wan")),
            "experts": str(build_tiny_pipeline(root / "experts", family="wan_experts")), "root": root}


@pytest.fixture(scope="module")
def comps(tiny):
    return models.load_components(tiny["wan"])


def pipeline(path):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(path)


def test_detect(tiny):
    assert detect(tiny["wan"]).name == "wan" and detect(tiny["experts"]).name == "wan"
    assert detect_index({"_class_name": "WanPipeline"}).denoiser_class == "WanTransformer3DModel"
    family = by_name("wan")
    assert family.flow and family.dpo_beta == 100.0 and not family.guidance_embedded
    assert family.unguided_scale == 1.0 and family.online_guidance_scale == 5.0


def test_text_is_the_pipelines(tiny, comps):
    """Cleaned captions (HTML entities, runs of spaces), UMT5's states zero past each caption's tokens, at the
    length training and sampling share; the unconditional side is the pipeline's default negative prompt."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    assert [clean_prompt(c) for c in CAPTIONS] == [prompt_clean(c) for c in CAPTIONS] == [
        "a red dog & a cat", "a green square on a black background"]
    pipe = pipeline(tiny["wan"])
    options = comps.family.call_options(pipe)
    assert options == {"max_sequence_length": 16}  # the tiny T5 tokenizer's model_max_length
    text = comps.family.encode_text(comps, CAPTIONS)
    positive, negative = pipe.encode_prompt(CAPTIONS, device="cpu", **options)
    assert text["hidden"].shape == (2, 16, 32)
    torch.testing.assert_close(text["hidden"], positive.detach())
    lengths = pipe.tokenizer([clean_prompt(c) for c in CAPTIONS]).input_ids
    assert len(lengths[0]) < 16 and not text["hidden"][0, len(lengths[0]):].any()
    assert NEGATIVE_PROMPT == ""
    torch.testing.assert_close(comps.family.encode_empty_prompt(comps)["hidden"], negative[:1].detach())


def test_frames_and_latent_shapes(comps):
    """F = t k + 1 frames (the tiny VAE's t = 4, as Wan's) give (F - 1) / t + 1 latent frames at side / 4;
    an image family takes one frame only."""
    config = comps.vae.config
    assert latent_frames(config, 1) == 1 and latent_frames(config, 5) == 2 and latent_frames(config, 81) == 21
    with pytest.raises(InputError, match="4 k \\+ 1"):
        latent_frames(config, 4)
    assert comps.family.latent_shape(config, 32, 5) == (4, 2, 8, 8)
    assert comps.family.latent_shape(config, 32) == (4, 1, 8, 8)
    assert comps.family.default_resolution(config) == 480
    with pytest.raises(ConfigError, match="num_frames"):
        by_name("sd3").latent_shape({"latent_channels": 4, "block_out_channels": [8, 8]}, 32, 5)


def test_video_latents_normalise_and_decode_as_the_pipeline(tiny, comps):
    """models.sample_latents / unscale_latents on [N, C, F, h, w] use the per-channel statistics on the
    channel axis; decode gives videos [N, 3, F, H, W] as the pipeline's decoder path does."""
    pipe = pipeline(tiny["wan"])
    z = torch.randn(2, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    config = comps.vae.config
    mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(models.unscale_latents(config, z), z * std + mean)
    with torch.no_grad():
        video = decode(comps.vae, z)
        theirs = pipe.vae.decode(z * std + mean).sample
    assert video.shape == (2, 3, 5, 32, 32)
    torch.testing.assert_close(video, (theirs / 2 + 0.5).clamp(0, 1))


def sample_both(path, frames: int, guidance: float = 4.0, expert: str | None = None):
    comps = models.load_components(path, expert=expert)
    shape = comps.family.latent_shape(comps.vae.config, 32, frames)
    schedule = sampling_schedule(comps, num_inference_steps=4, eta=1e-6, noise_level=1e-6, latent_hw=shape[-2:])
    cond = Conditioning.of(comps, PROMPTS, guidance_scale=guidance, size=(32, 32))
    ours = rollout(guided_predict(comps.family, comps.denoiser, schedule, cond), schedule, comps.vae, [7, 8],
                   shape, "cpu").images
    pipe = pipeline(path)
    start = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in (7, 8)])
    out = pipe(prompt=PROMPTS, latents=start, num_inference_steps=4, height=32, width=32, num_frames=frames,
               output_type="pt", **comps.family.guidance_options(guidance, 2), **comps.family.call_options(pipe))
    return comps, ours, out.frames.transpose(1, 2)


def test_online_sampler_with_vanishing_noise_is_the_pipeline_on_videos(tiny):
    """5-frame videos: our Euler sampler at noise level -> 0 reproduces WanPipeline with its (tiny)
    FlowMatchEulerDiscreteScheduler, guidance included."""
    _, ours, theirs = sample_both(tiny["wan"], 5)
    assert ours.shape == (2, 3, 5, 32, 32)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)


def test_model_expert_is_required_for_two_experts_and_refused_for_one(tiny):
    with pytest.raises(InputError, match="model.expert.*two experts.*transformer or transformer_2"):
        models.load_components(tiny["experts"])
    with pytest.raises(InputError, match="model.expert.*one transformer"):
        models.load_components(tiny["wan"], expert="transformer")
    with pytest.raises(InputError, match="model.expert.*one denoiser"):
        by_name("sd3").choose_expert("transformer", {}, "sd3")


@pytest.mark.parametrize("expert", ["transformer", "transformer_2"])
def test_two_experts_switch_at_the_boundary_as_the_pipeline(tiny, expert):
    """Wan 2.2: transformer for t >= 875, transformer_2 below, in one batch, whichever of them trains (the
    other frozen); the sampler with both matches the pipeline (guidance_scale_2 its default, the same
    scale)."""
    comps, ours, theirs = sample_both(tiny["experts"], 5, expert=expert)
    family = comps.family
    assert family.boundary == 875.0 and family.denoiser_name == expert
    assert not any(p.requires_grad for p in family.frozen_expert.parameters())
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)
    x = torch.randn(2, 4, 2, 8, 8)
    hidden = family.encode_text(comps, PROMPTS)
    t = torch.tensor([900.0, 500.0])
    first, second = ((comps.denoiser, family.frozen_expert) if expert == "transformer"
                     else (family.frozen_expert, comps.denoiser))
    with torch.no_grad():
        both = family.forward(comps.denoiser, x, t, hidden, {})
        high = first(hidden_states=x, timestep=t, encoder_hidden_states=hidden["hidden"], return_dict=False)[0]
        low = second(hidden_states=x, timestep=t, encoder_hidden_states=hidden["hidden"], return_dict=False)[0]
    torch.testing.assert_close(both[0], high[0])
    torch.testing.assert_close(both[1], low[1])
    assert not torch.allclose(high[1], low[1])


def test_a_unipc_checkpoint_trains_and_samples_on_its_flow_sigmas(tiny, tmp_path):
    """The Wan checkpoints ship UniPC over flow sigmas: training gets a flow Euler scheduler with its
    flow_shift, and the online sampler visits UniPC's sigmas (its integrator is Euler, not UniPC's)."""
    from diffusers import UniPCMultistepScheduler

    pipe = pipeline(tiny["wan"])
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                             flow_shift=5.0)
    pipe.save_pretrained(tmp_path / "unipc")
    comps = models.load_components(str(tmp_path / "unipc"))
    assert type(comps.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert comps.family.noise_process(comps.noise_scheduler, models_noise_config()).shift == 5.0
    schedule = sampling_schedule(comps, num_inference_steps=6, eta=1.0, noise_level=0.7, latent_hw=(8, 8))
    pipe.scheduler.set_timesteps(6)
    torch.testing.assert_close(schedule.sigmas, pipe.scheduler.sigmas.float())
    # UniPC hands the transformer its timesteps 1000 sigma rounded down to integers (and its first sigma
    # 1 - 1e-6); ours are 1000 sigma unrounded, the flow Euler scheduler's
    assert (schedule.timesteps - pipe.scheduler.timesteps.float()).abs().max() <= 1


def models_noise_config():
    from diffusion_dpo.noise import NoiseConfig

    return NoiseConfig()


def test_video_frames_are_scored_and_averaged():
    videos = torch.rand(2, 3, 5, 4, 4)
    frames, prompts = video_frames(videos, ["a", "b"])
    assert frames.shape == (10, 3, 4, 4) and prompts == ["a"] * 5 + ["b"] * 5
    assert torch.equal(frames[6], videos[1, :, 1])
    scores = frames.mean(dim=(1, 2, 3))
    torch.testing.assert_close(frame_mean(scores, 2), videos.mean(dim=(1, 2, 3, 4)))
    images = torch.rand(3, 3, 4, 4)
    assert video_frames(images, ["a"] * 3)[0] is images and frame_mean(torch.ones(3), 3).shape == (3,)


def test_grpo_on_videos(tiny, tmp_path):
    """Two grpo steps on 5-frame videos (each video's reward its frames' mean brightness)."""
    from diffusion_dpo.recipes import grpo
    from diffusion_dpo.recipes.grpo_config import GrpoConfig

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "run"
    grpo.run(load_config(GrpoConfig, [], [
        f"model.pretrained={tiny['wan']}", f"prompts.source={prompts}", "scorer.name=brightness",
        "online.prompts_per_step=2", "online.group_size=2", "sampling.num_inference_steps=3",
        "sampling.resolution=32", "sampling.num_frames=5", "optim.batch_size=4", "optim.max_steps=2",
        "model.lora_rank=4", "checkpoint_every=0", "tensorboard=false", f"output_dir={out}"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward_mean" in r]
    assert len(rows) == 2 and all(0 < r["reward_mean"] < 1 and 0 < r["frame_consistency"] <= 1 for r in rows)
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def train_config(path, pairs, out, *overrides):
    from diffusion_dpo.recipes import train

    return load_config(train.TrainConfig, [], [
        f"model.pretrained={path}", f"data.source={pairs}", "data.resolution=32", f"output_dir={out}",
        "optim.learning_rate=1e-2", "optim.scale_lr=false", "optim.warmup_steps=0", "optim.batch_size=2",
        "log_every=1", "checkpoint_every=0", "optim.max_steps=2", *overrides])


@pytest.mark.parametrize("rank", [4, 0])
def test_training_the_low_noise_expert_loads_back_into_transformer_2(tiny, rank):
    """model.expert=transformer_2 trains the low-noise expert (timesteps below 875, uniform in sigma after
    the shift: most of them); final/ is marked, and the family's and evaluate's loaders put it (LoRA or
    weights) into transformer_2, leaving transformer the base's."""
    from diffusion_dpo.recipes import train
    from diffusion_dpo.sampling import load_pipeline
    from diffusion_dpo.tiny import write_tiny_pairs

    root = tiny["root"] / f"expert{rank}"
    pairs = write_tiny_pairs(root / "pairs", n_pairs=4)
    result = train.run(train_config(tiny["experts"], pairs, root / "run", f"model.lora_rank={rank}",
                                    "model.expert=transformer_2"))
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["loss"] - 0.6931471805599453) < 1e-6
    assert json.loads((Path(result.final) / "wan_expert.json").read_text()) == {"expert": "transformer_2"}
    family = by_name("wan")
    assert family.tuned_component(str(result.final)) == "transformer_2"
    tuned = {"lora": str(result.final)} if rank else {"denoiser": str(result.final)}
    base, pipe = pipeline(tiny["experts"]), load_pipeline(tiny["experts"], device="cpu", **tuned)
    same = [torch.equal(a, b) for a, b in zip(base.transformer.state_dict().values(),
                                              pipe.transformer.state_dict().values())]
    moved = [torch.equal(a, b) for a, b in zip(base.transformer_2.state_dict().values(),
                                               pipe.transformer_2.state_dict().values())]
    assert all(same) and not all(moved)


def test_evaluate_scores_videos_by_their_frames_and_saves_them(tiny, tmp_path):
    """evaluate at sampling.num_frames=5: each video saved as a lossless 5-frame WebP beside a PNG strip of
    its first, middle and last frames; its score is the mean of its frames' scores; a rerun reads the videos
    back and reports the same; each video's frame consistency is reported beside its score. label's relabel
    mode refuses num_frames (it generates nothing)."""
    from PIL import Image

    from diffusion_dpo.recipes import evaluate, label
    from scorers import load_scorer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    transformer = by_name("wan").load_denoiser(str(Path(tiny["wan"]) / "transformer"))
    with torch.no_grad():
        transformer.proj_out.weight.add_(0.5)
    transformer.save_pretrained(tmp_path / "tuned")
    args = [f"model.pretrained={tiny['wan']}", f"model.denoiser={tmp_path / 'tuned'}", f"prompts={prompts}",
            "seeds=2", "scorers=brightness", "sampling.num_inference_steps=2", "sampling.height=32",
            "sampling.width=32", "sampling.num_frames=5", "n_boot=100", "grid_cell=32"]
    first = evaluate.run(load_config(evaluate.EvaluateConfig, [], [*args, f"output_dir={tmp_path / 'eval'}"]))
    rows = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["scorer"] == "brightness"]
    assert len(rows) == 4
    row = rows[0]
    png = tmp_path / "eval" / row["image"]
    with Image.open(png.with_suffix(".webp")) as video:
        assert video.n_frames == 5 and video.size == (32, 32)
    frames = read_video(png)
    scorer = load_scorer("brightness")
    assert row["score"] == pytest.approx(float(scorer.score(frames, ["a red circle"] * 5).mean()), abs=1e-6)
    with Image.open(png) as sheet:
        assert sheet.size == (96, 32)
    again = evaluate.run(load_config(evaluate.EvaluateConfig, [], [*args, f"output_dir={tmp_path / 'eval'}"]))
    assert again.rows == first.rows and first.scorers["brightness"].win_rate != 0.5
    assert [r for r in map(json.loads, (tmp_path / "eval" / "scores.jsonl").read_text().splitlines())
            if r["scorer"] == "brightness"] == rows
    rows = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    with pytest.raises(ConfigError, match="relabel mode"):
        label.run(load_config(label.LabelConfig, [], [
            f"relabel.source={tmp_path / 'eval'}", "scorer.name=brightness",
            "sampling.num_frames=5", f"output_dir={tmp_path / 'pairs'}"]))
    consistency = [r for r in rows if r["scorer"] == "frame_consistency"]
    assert len(consistency) == 4 and all(0 < r["score"] <= 1 for r in consistency)
    assert "frame_consistency" in first.scorers


def test_ti2v_layout_per_token_timesteps_sample_the_same(tiny, tmp_path):
    """Wan 2.2 TI2V-5B's WanPipeline (expand_timesteps) gives the transformer one timestep per token, all
    equal in text-to-video; the family's one timestep per video reproduces it."""
    pipe = pipeline(tiny["wan"])
    pipe.register_to_config(expand_timesteps=True)
    pipe.save_pretrained(tmp_path / "ti2v")
    assert pipeline(str(tmp_path / "ti2v")).config.expand_timesteps
    _, ours, theirs = sample_both(str(tmp_path / "ti2v"), 5)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)
