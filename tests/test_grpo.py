"""The grpo recipe end to end on tiny pipelines (32 px, a few steps, CPU): the first inner step's ratio is
exactly 1 and its KL exactly 0, every family raises its reward, resume is exact, online DPO starts at ln 2,
two processes agree, and bad configs are clear errors."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from run_files import metrics, run_on_two_processes

from diffusion_dpo import cli
from diffusion_dpo.config import load_config
from diffusion_dpo.errors import InputError
from diffusion_dpo.online import methods
from diffusion_dpo.online.samples import Samples
from diffusion_dpo.recipes import grpo
from diffusion_dpo.recipes.grpo_config import GrpoConfig
from diffusion_dpo.tiny import build_tiny_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow house", "a black cat", "a white dog"]
MONITORS = {"reward_mean", "reward_std", "zero_spread_groups", "kl", "clip_fraction", "approx_kl", "ratio",
            "image/brightness", "image/saturation", "image/jpeg_kb", "image/near_black", "loss", "grad_norm",
            "lr", "images_per_s_sampled", "images_per_s_trained"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The test machine's cores are shared; one thread avoids OpenMP oversubscription.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    (root / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))
    pipes = {f: str(build_tiny_pipeline(root / f, family=f))
             for f in ("sd", "sdxl", "sd3", "flux", "flux2", "flux2_klein", "z_image", "qwen_image", "wan")}
    return {"prompts": str(root / "prompts.txt"), **pipes}


def config(world, out: Path, *overrides: str, family: str = "sd") -> GrpoConfig:
    base = [f"model.pretrained={world[family]}", f"prompts.source={world['prompts']}", "scorer.name=brightness",
            "online.prompts_per_step=2", "online.group_size=4", "sampling.num_inference_steps=4",
            "online.train_steps=2", "optim.batch_size=8", "optim.max_steps=2", "optim.learning_rate=1e-2",
            "online.clip_range=0.2", "checkpoint_every=0", "tensorboard=false", f"output_dir={out}"]
    return load_config(GrpoConfig, [], [*base, *overrides])


def train_rows(out: Path) -> list[dict]:
    return [r for r in metrics(out) if "reward_mean" in r]


@pytest.mark.parametrize("rank", [8, 0])
def test_first_inner_step_has_ratio_one_and_zero_kl(world, tmp_path, rank):
    """Weights unchanged since sampling: every recomputed log-prob equals the recorded one bit for bit (so
    approx_kl is exactly 0 and nothing is clipped), and the policy equals its reference (LoRA's B starts at 0;
    a full fine-tune's frozen copy is the same weights), so the KL is exactly 0. Later steps move."""
    out = tmp_path / "run"
    reference = "online.reference=" + ("adapter" if rank else "copy")
    grpo.run(config(world, out, f"model.lora_rank={rank}", "online.kl_coef=0.04", "optim.max_steps=2",
                    "online.inner_epochs=2", reference))
    rows = train_rows(out)
    assert MONITORS <= set(rows[0])
    # metrics average the two inner epochs: the first has ratio 1 exactly, the second has moved
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 2  # optimizer steps: 2 inner epochs of the first sampling step
    run1 = config(world, tmp_path / "one", f"model.lora_rank={rank}", "online.kl_coef=0.04", "optim.max_steps=1",
                  reference)
    grpo.run(run1)
    one = train_rows(tmp_path / "one")[0]
    assert one["ratio"] == 1.0 and one["approx_kl"] == 0.0 and one["clip_fraction"] == 0.0
    assert one["kl"] == 0.0 and one["kl_k3"] == 0.0
    assert rows[1]["kl"] > 0.0  # the second sampling step's policy has moved away from the reference


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux", "flux2", "flux2_klein", "z_image",
                                    "qwen_image", "wan"])
def test_rollout_with_vanishing_noise_is_the_pipelines_own_sampler(world, family):
    """With eta / noise_level -> 0 the online sampler is the deterministic sampler evaluate and label use
    (DDIM for DDPM families, the flow Euler ODE for SD3/FLUX): the same conditioning, timesteps, guidance,
    shift and decoding, so what GRPO tunes is what the diffusers pipeline generates. FLUX.1-dev's and
    FLUX.2-dev's guidance is embedded rather than classifier-free: the same value on both sides, here 2.0
    (not the defaults 3.5 and 4.0); FLUX.2-klein guides classifier-free. FLUX.2's pipelines take their
    latents patchified [4C, h/2, w/2] (what our sampler draws) and shift by their empirical mu.
    Z-Image's guidance is c + w (c - u) on unpadded captions, the pipeline's own. Qwen-Image's is true CFG
    (true_cfg_scale against its negative prompt, ``Family.guidance_options``) with the pipeline's norm
    rescaling, on packed latents like FLUX.1's, decoded by its video VAE. Wan's is u + w (c - u) against the
    empty prompt, here on one-frame videos [C, 1, h, w] (test_wan samples 5 frames), with the tiny pipeline's
    FlowMatchEulerDiscreteScheduler (the checkpoints' UniPC is another integrator, ``families.wan``)."""
    from diffusers import DDIMScheduler

    from diffusion_dpo import models
    from diffusion_dpo.online.rollout import Conditioning, guided_predict, rollout, sampling_schedule
    from diffusion_dpo.sampling import load_pipeline

    comps = models.load_components(world[family])
    models.freeze_to(comps, torch.device("cpu"), torch.float32)
    side = comps.vae.config.get("sample_size", 32)  # Qwen-Image's video VAE names none: the tiny 32 px
    shape = comps.family.latent_shape(comps.vae.config, side)
    schedule = sampling_schedule(comps, num_inference_steps=4, eta=1e-6, noise_level=1e-6, latent_hw=shape[1:])
    cfg_scale = 2.0 if family in ("flux", "flux2") else 4.0
    cond = Conditioning.of(comps, PROMPTS[:2], guidance_scale=cfg_scale, size=(side, side))
    ours = rollout(guided_predict(comps.family, comps.denoiser, schedule, cond), schedule, comps.vae, [7, 8],
                   shape, "cpu").images

    pipe = load_pipeline(world[family], device="cpu", dtype=torch.float32)
    if not comps.family.flow:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    start = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in (7, 8)])
    if family in ("flux", "qwen_image"):  # FluxPipeline and QwenImagePipeline take their latents packed 2x2
        from diffusion_dpo.families.flux import pack_latents

        start = pack_latents(start)
    video = {"num_frames": 1} if family == "wan" else {}
    out = pipe(prompt=PROMPTS[:2], latents=start, num_inference_steps=4, height=side, width=side, output_type="pt",
               **comps.family.guidance_options(cfg_scale, 2), **comps.family.call_options(pipe), **video)
    theirs = out.frames.transpose(1, 2) if video else out.images  # WanPipeline's [N, F, 3, H, W]
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,lr", [("sd", 3e-4), ("sdxl", 1e-3), ("sd3", 3e-3), ("flux", 3e-3),
                                       ("z_image", 3e-3), ("qwen_image", 3e-3), ("wan", 3e-2)])
def test_a_short_run_raises_the_reward_of_every_family(world, tmp_path, family, lr):
    """GRPO on brightness (a full fine-tune: a random tiny UNet's attention has too little leverage on the
    decoded pixels for LoRA to show within a few steps; the SD UNet takes a smaller step than the transformers,
    which a first Adam step of 3e-3 knocks off course, and SDXL's tiny UNet needs 1e-3 to move within 10 steps):
    the mean reward of the last 3 of 10 steps exceeds the first 2 steps' by a margin (4 prompts x 8 images a
    step; the per-image spread is about 0.003). The tiny Wan transformer's (two narrow blocks, 8 x 8 latents) move
    on the decoded pixels is small: it takes 3e-2 to clear the margin within 10 steps."""
    out = tmp_path / family
    grpo.run(config(world, out, "model.lora_rank=0", f"optim.learning_rate={lr}", "optim.max_steps=10",
                    "online.prompts_per_step=4", "online.group_size=8", "online.train_steps=4",
                    "online.updates_per_epoch=4", "optim.batch_size=32", "online.kl_coef=0",
                    *(["sampling.resolution=32"] if family in ("qwen_image", "wan") else []), family=family))
    rewards = [r["reward_mean"] for r in train_rows(out)]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    print(family, [round(r, 4) for r in rewards])
    assert last > first + 0.002, rewards


def same_final(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa, wb = (load_file(next(p.glob("*.safetensors"))) for p in (a / "final", b / "final"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics rows without the wall-clock throughput figures."""
    return [{k: v for k, v in r.items() if not k.startswith("images_per_s")} for r in rows]


@pytest.mark.parametrize("method", ["grpo", "online_dpo", "nft"])
def test_resume_equals_the_uninterrupted_run(world, tmp_path, method):
    """4 steps straight == 3 steps, checkpoint, resume for 1 more: the same prompts, sampler noise, step choice
    and weights, bit for bit on CPU. online_dpo refreshes its reference every 2 steps, so at the checkpoint
    (step 3) the reference is step 2's policy and must come back from the checkpoint; nft's old policy trails
    the trained one (decay 0.3 from step 1) and must come back too."""
    extra = [f"method={method}", "optim.max_steps=4", "checkpoint_every=3", "checkpoints_keep=null",
             "online.kl_coef=0.04", "online.ref_refresh_every=2", "online.advantage_scope=batch",
             "online.nft_old_decay_rate=0.3", "online.nft_old_decay_max=0.6"]
    if method == "online_dpo":
        extra.append("optim.batch_size=2")
    grpo.run(config(world, tmp_path / "a", *extra))
    ckpt = tmp_path / "a" / "checkpoints" / "step-3"
    assert ckpt.is_dir()
    resumed = grpo.run(config(world, tmp_path / "b", *extra, f"resume={ckpt}"))
    assert resumed.resumed_from == str(ckpt) and resumed.steps == 4
    assert same_final(tmp_path / "a", tmp_path / "b")
    assert comparable(metrics(tmp_path / "a"))[3:] == comparable(metrics(tmp_path / "b"))


def test_online_dpo_starts_at_ln2_and_learns_from_best_vs_worst(world, tmp_path):
    out = tmp_path / "odpo"
    result = grpo.run(config(world, out, "method=online_dpo", "optim.batch_size=2", "optim.max_steps=2"))
    first = train_rows(out)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["implicit_acc"] == 0.5
    assert first["model_mse_w"] == first["ref_mse_w"]  # the reference is the starting policy
    assert train_rows(out)[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    assert result.images_generated == 2 * 2 * 4 and (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_bad_configs_are_clear_errors(world, tmp_path, capsys):
    cases = [(["optim.batch_size=3"], "optim.batch_size"),
             (["online.train_steps=5"], "online.train_steps"),
             (["online.first_steps=3"], "online.first_steps"),
             (["optim.gradient_accumulation_steps=2"], "optim.gradient_accumulation_steps"),
             (["scorer.name=nope"], "unknown scorer 'nope'")]
    for overrides, message in cases:
        with pytest.raises(InputError, match=message):
            grpo.run(config(world, tmp_path / "x", *overrides))
    assert cli.main(["grpo", f"model.pretrained={tmp_path / 'missing'}", f"output_dir={tmp_path / 'y'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["grpo", "--help"])
    assert "online.ref_refresh_every" in capsys.readouterr().out


@pytest.mark.parametrize("family,rank", [("sd", 8), ("sd3", 0)])
def test_held_out_evaluation_is_logged_with_its_interval(world, tmp_path, family, rank):
    """A LoRA policy (fused into the pipeline) and a fully fine-tuned SD3 transformer (replacing the
    pipeline's) are both evaluated against the base."""
    out = tmp_path / "ev"
    result = grpo.run(config(world, out, f"eval.prompts={world['prompts']}", "eval.every=1", "eval.seeds=1",
                             "eval.n_boot=50", "eval.grid_prompts=2", f"model.lora_rank={rank}",
                             "online.reference=" + ("adapter" if rank else "copy"), family=family))
    rows = [r for r in metrics(out) if "eval/win_rate" in r]
    assert [r["step"] for r in rows] == [1, 2]  # after step 1, and final
    lo, hi = rows[-1]["eval/win_rate_lo"], rows[-1]["eval/win_rate_hi"]
    assert 0 <= lo <= rows[-1]["eval/win_rate"] <= hi <= 1
    assert rows[-1]["eval/tuned_mean"] != rows[-1]["eval/base_mean"]  # the tuned weights were the ones sampled
    assert result.evaluation == {k: v for k, v in rows[-1].items() if k != "step"}
    assert (out / "eval" / "final" / "report.json").is_file() and any((out / "eval" / "final" / "grids").iterdir())


@pytest.mark.slow
def test_two_processes_keep_groups_whole_and_agree(world, tmp_path):
    """torchrun starts two CPU processes (gloo): each samples whole groups for its own prompts; both end with
    the same weights."""
    out = tmp_path / "ddp"
    args = [f"model.pretrained={world['sd']}", f"prompts.source={world['prompts']}", "scorer.name=brightness",
            "online.prompts_per_step=1", "online.group_size=4", "sampling.num_inference_steps=2",
            "online.train_steps=2", "optim.batch_size=4", "optim.max_steps=2", "checkpoint_every=2",
            "tensorboard=false", f"output_dir={out}"]
    run_on_two_processes("grpo", args, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["images_generated"] == 2 * 1 * 4 * 2
    digests = summary["weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert {p.name for p in (out / "checkpoints" / "step-2").iterdir()} >= {"rank-0.pt", "rank-1.pt"}


@pytest.mark.parametrize("method, family, extra", [("grpo", "sd", []), ("online_dpo", "sd", []), ("grpo", "flow", []),
                                                  ("grpo", "sd", ["online.sde_window_size=1"])])
def test_demo_online_methods_write_their_report(tmp_path, capsys, method, family, extra):
    """``diffusion-dpo demo method=... family=...`` on a slice of the shapes world: report.json's top-level
    keys, the grid, and the sentences on stdout; family=flow tunes the shipped flow base with the SDE;
    online.sde_window_size reaches the grpo run (given, or the method's and family's default)."""
    from diffusion_dpo.recipes.demo_online import FAMILY_ONLINE_DEFAULTS

    out = tmp_path / method
    args = ["demo", f"method={method}", f"family={family}", "world.train_prompts=4", "world.held_out_prompts=2", "eval_seeds=1",
            "sampling.num_inference_steps=2", "online.optim.max_steps=2", "online.prompts_per_step=2", "online.group_size=2",
            f"online.sampling.num_inference_steps={4 if family == 'flow' else 2}",  # the flow default's window: 4
            "online.train_steps=1", "online.updates_per_epoch=1",
            "online.optim.batch_size=4", "online.clip_range=0.001", "n_boot=50", "grid_prompts=2", f"output_dir={out}",
            *extra]
    assert cli.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["images_generated"] == 2 * 2 * 2
    assert report["family"] == family and report["base"].endswith("base" if family == "sd" else "flow_base")
    tune = json.loads((out / "tune" / "summary.json").read_text())
    assert tune["format"] == "lora" and tune["pretrained"] == report["base"]
    tuned = yaml.safe_load((out / "tune" / "config.yaml").read_text())
    window = 1 if extra else FAMILY_ONLINE_DEFAULTS[method, family]["sde_window_size"]  # the given key, or the default
    assert tuned["online"]["clip_range"] == 0.001 and tuned["online"]["sde_window_size"] == window
    assert tuned["online"]["shared_start_noise"] == FAMILY_ONLINE_DEFAULTS[method, family]["shared_start_noise"]
    assert 0 < report["cpu_seconds"] and report["seconds"]["total"] > 0
    assert tuned["model"]["lora_rank"] == (32 if (method, family) == ("grpo", "flow") else 8)  # the family's
    assert yaml.safe_load((out / "config.yaml").read_text())["online"]["model"]["lora_rank"] is not None  # resolved
    assert 0 <= report["win_rate_ci"][0] <= report["win_rate"] <= report["win_rate_ci"][1] <= 1
    assert {"base_mean", "tuned_mean"} <= set(report) and (out / "grid.png").is_file()
    assert (out / "report.md").read_text().count("held-out") >= 1
    assert "beats the base on" in capsys.readouterr().out
    assert set(report["geneval"]["tasks"]) == {"counting", "colors", "shape", "size", "position", "background"}


def test_flow_grpo_code_kl_and_batch_std_advantages_run(world, tmp_path):
    """flow_grpo's conventions end to end on the SD3 layout: its KL is |dt| times the exact one, so with
    the same weights moved the logged KL is smaller than under the paper convention; advantages from the
    group mean over the batch std are finite and the run trains."""
    kls = {}
    for convention in ("paper", "flow_grpo_code"):
        out = tmp_path / convention
        grpo.run(config(world, out, "model.lora_rank=8", "online.kl_coef=0.04", "optim.max_steps=2",
                        f"online.kl_convention={convention}", "online.advantage_scope=group_batch_std",
                        family="sd3"))
        rows = train_rows(out)
        kls[convention] = rows[1]["kl"]
        assert all(math.isfinite(r["loss"]) for r in rows)
    assert 0.0 < kls["flow_grpo_code"] < kls["paper"]


def test_trained_fraction_draws_only_from_the_first_steps(world, tmp_path):
    """trained_fraction 0.5 of T = 4: every image trains on steps 0 and 1 only (K defaults to the eligible 2);
    zero-advantage images get weight 0 with drop_zero_advantage, the others 4 / 2."""
    from diffusion_dpo.online.trajectory import Trajectory
    from diffusion_dpo.online.transitions import FlowSDESchedule

    cfg = config(world, tmp_path / "unused", "online.trained_fraction=0.5", "online.drop_zero_advantage=true",
                 "optim.batch_size=4")
    n, t = 4, cfg.sampling.num_inference_steps
    trajectory = Trajectory(torch.randn(n, t + 1, 1, 2, 2), torch.randn(n, t))
    schedule = FlowSDESchedule(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), torch.tensor([1e3, 750.0, 500.0, 250.0]))
    samples = Samples(["p"], None, trajectory, schedule, torch.zeros(n), torch.tensor([0.0, 1.0, -1.0, 0.0]),
                           0, None)
    rows = methods.grpo_rows(cfg, samples, step=0, rank=0)
    assert sorted(set(rows["step_index"].tolist())) == [0, 1] and len(rows["step_index"]) == n * 2
    assert rows["weights"].tolist() == [0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0]


def test_online_dpo_beta_defaults_to_the_familys(world, tmp_path):
    """online.beta_dpo null: 100 on a flow family (flow_grpo's DPO), so the run equals one given 100
    explicitly and differs from one given the DDPM families' 5000."""
    def margins(out, *extra):
        grpo.run(config(world, out, "method=online_dpo", "optim.batch_size=2", *extra, family="sd3"))
        return [r["reward_margin"] for r in train_rows(out)]

    default = margins(tmp_path / "default")
    assert default == margins(tmp_path / "explicit", "online.beta_dpo=100")
    assert default != margins(tmp_path / "paper", "online.beta_dpo=5000")


@pytest.mark.parametrize("sde", ["flow_grpo", "cps"])
def test_a_window_of_one_step_trains_only_that_step(world, tmp_path, sde):
    """Flow-GRPO-Fast on the SD3 layout: noise on one random step of 4 per sampling step, the rest ODE;
    every trained row is that step, the first inner pass has ratio exactly 1, and the run trains."""
    seen = []
    original = methods.grpo_rows

    def spy(cfg, samples, step, rank):
        rows = original(cfg, samples, step, rank)
        stochastic = torch.nonzero(samples.schedule.step_stds() > 0).flatten().tolist()
        seen.append((stochastic, sorted(set(rows["step_index"].tolist()))))
        return rows

    methods.grpo_rows = spy
    try:
        out = tmp_path / sde
        grpo.run(config(world, out, "model.lora_rank=8", "online.sde_window_size=1", "online.train_steps=1",
                        f"sampling.sde={sde}",
                        "optim.max_steps=3", "optim.batch_size=8", family="sd3"))
    finally:
        methods.grpo_rows = original
    assert len(seen) == 3
    for stochastic, trained in seen:
        assert len(stochastic) == 1 and trained == stochastic
    assert train_rows(out)[0]["ratio"] == 1.0


def test_window_and_sde_keys_are_checked(world, tmp_path):
    with pytest.raises(Exception, match="sde_window"):
        config(world, tmp_path / "a", "online.sde_window=fixed", "online.sde_window_start=3",
               "online.sde_window_size=2")
    with pytest.raises(Exception, match="train_steps"):
        config(world, tmp_path / "b", "online.sde_window_size=1", "online.train_steps=2")
    with pytest.raises(InputError, match="sampling.sde"):
        grpo.run(config(world, tmp_path / "c", "sampling.sde=cps"))  # SD1.x samples with DDIM


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_nft_samples_deterministically_and_trains_on_the_forward_process(world, tmp_path, family):
    """DiffusionNFT on a DDPM and a flow family: no log-probs are recorded (the sampler is the ODE / DDIM with
    eta 0), the first step's old policy is the trained one (old_deviation exactly 0), later ones trail it, the
    optimality averages 1/2 (advantages are centred per group), and final/ is written."""
    out = tmp_path / family
    result = grpo.run(config(world, out, "method=nft", "optim.max_steps=3", "online.train_steps=2",
                             "online.nft_old_decay_rate=0.5", "online.nft_old_decay_max=0.5", family=family))
    rows = train_rows(out)
    assert rows[0]["old_deviation"] == 0.0 and rows[2]["old_deviation"] > 0.0
    assert all(abs(r["optimality"] - 0.5) < 1e-6 for r in rows)
    assert all(math.isfinite(r["loss"]) and "kl" in r for r in rows)
    assert (out / "final").is_dir() and result.steps == 3


def test_nft_rollout_has_no_noise(world):
    """The schedule nft samples with injects no noise: every step's std is 0, so two different noise
    levels give the same images from the same seeds."""
    cfg = config(world, Path("unused"), "method=nft", family="sd3")
    from diffusion_dpo.online.transitions import FlowSDESchedule

    schedule = FlowSDESchedule(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), torch.tensor([1e3, 750.0, 500.0, 250.0]))
    deterministic = grpo.step_schedule(cfg, schedule, 0, stochastic=False)
    assert float(deterministic.step_stds().abs().max()) == 0.0
    assert float(grpo.step_schedule(cfg, schedule, 0).step_stds().min()) > 0.0


def test_nft_raises_the_reward(world, tmp_path):
    """DiffusionNFT (full fine-tune of the tiny SD3, no KL) on a darkness reward (brightness weighted -1):
    the mean reward of the last 3 of 12 steps exceeds the first 2 steps' by a margin (the per-image spread is
    about 0.003; the shift measured here was 0.0017, and its sign follows the reward's)."""
    out = tmp_path / "nft"
    grpo.run(config(world, out, "method=nft", "model.lora_rank=0", "optim.learning_rate=1e-2", "optim.max_steps=12",
                    "online.prompts_per_step=4", "online.group_size=8", "online.train_steps=4",
                    "online.updates_per_epoch=4", "optim.batch_size=32", "online.nft_kl_coef=0", "scorer.name=combo",
                    "scorer.options.parts={brightness: -1.0}", family="sd3"))
    rewards = [r["reward_mean"] for r in train_rows(out)]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:2]) / 2 + 0.001, rewards


def test_per_reward_normalisation_trains_on_a_combo_and_needs_one(world, tmp_path):
    """online.reward_normalization=per_reward on brightness (~0.5) + JPEG size (~kB): the run trains, its
    logged reward is the weighted sum; one reward alone is refused naming the key."""
    out = tmp_path / "parts"
    grpo.run(config(world, out, "scorer.name=combo",
                    "scorer.options.parts={brightness: 1.0, jpeg_incompressibility: 0.01}",
                    "online.reward_normalization=per_reward", "optim.max_steps=2"))
    rows = train_rows(out)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    with pytest.raises(InputError, match="reward_normalization"):
        grpo.run(config(world, tmp_path / "one", "online.reward_normalization=per_reward"))


@pytest.mark.parametrize("shared", [True, False])
def test_shared_start_noise_gives_a_group_one_start(world, tmp_path, shared):
    """online.shared_start_noise: the G images of a prompt start from the same latents and still differ at
    the end (the sampler's noise is each image's own); groups differ from each other. Without it every image
    starts from its own noise. With nft (deterministic sampler) the key is refused."""
    seen = []
    original = methods.grpo_rows

    def spy(cfg, samples, step, rank):
        seen.append(samples.trajectory.latents)
        return original(cfg, samples, step, rank)

    methods.grpo_rows = spy
    try:
        grpo.run(config(world, tmp_path / "run", f"online.shared_start_noise={str(shared).lower()}",
                        "optim.max_steps=1", family="sd3"))
    finally:
        methods.grpo_rows = original
    latents = seen[0]  # [P * G, T + 1, ...], prompt p's images at rows p*G .. p*G + G - 1
    start, final = latents[:, 0], latents[:, -1]
    assert torch.equal(start[0], start[1]) == shared and torch.equal(start[4], start[7]) == shared
    assert not torch.equal(start[0], start[4])
    assert not torch.equal(final[0], final[1])
    with pytest.raises(Exception, match="shared_start_noise"):
        config(world, tmp_path / "nft", "method=nft", "online.shared_start_noise=true")


def test_nft_group_noise_noises_a_group_alike(world, tmp_path):
    """online.nft_group_noise: every image of a group is noised at the same steps with the same forward
    noise (image-major rows, K per image); without it the images of a group get their own."""
    from diffusion_dpo.online.samples import Samples

    def rows_of(*overrides):
        cfg = config(world, tmp_path / "unused", "method=nft", "online.train_steps=2", *overrides)
        captured = {}
        nft = methods.NFT.__new__(methods.NFT)
        nft.cfg = cfg
        nft.loss = lambda model, samples, rows, index: captured.update(rows)
        samples = Samples.__new__(Samples)
        samples.rewards = torch.zeros(8)  # 2 prompts x G = 4
        n, step_fn = nft.update(None, samples, step=0, rank=0)
        step_fn(torch.arange(n))
        return {k: v.view(8, 2) for k, v in captured.items()}

    shared, own = rows_of("online.nft_group_noise=true"), rows_of()
    for key in ("step_index", "noise_seed"):
        assert all(torch.equal(shared[key][i], shared[key][0]) for i in range(4))
        assert all(torch.equal(shared[key][i], shared[key][4]) for i in range(4, 8))
    assert not torch.equal(shared["noise_seed"][0], shared["noise_seed"][4])
    assert len(set(own["noise_seed"].flatten().tolist())) == 16
