"""parallel.strategy=fsdp: torch FSDP2 sharding of the trained model over two CPU processes (gloo, torchrun).

A sharded run must end with the weights of the unsharded one-process run at the same global batch (two
processes of B pairs = one process of 2B: the same pairs, the same noise per pair), each process holding
about half of the trained parameters; its checkpoints must survive a SIGKILL and resume on one process; its
final/ is the family's ordinary folder.

Tolerance: the sharded run sums the two processes' gradients in another order than one process's single
mean, so gradients differ by float32 rounding (~1e-7 relative). AdamW divides each gradient element by its
running RMS, which turns that rounding into update differences up to ~1e-3 of the learning rate for elements
whose gradient is near zero; after two steps at lr 1e-3 the weights agree to TOL = 2e-5, while one step
more or less moves them by ~1e-3 (checked below, so the tolerance would catch a wrong step or batch).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_dpo.config import ConfigError, load_config, validate
from diffusion_dpo.denoising import pair_seeds
from diffusion_dpo.engine import sharding
from diffusion_dpo.errors import InputError
from diffusion_dpo.recipes import train
from diffusion_dpo.run_options import ParallelSection, TrainingRunOptions
from diffusion_dpo.tiny import build_tiny_pipeline, write_tiny_pairs
from tests.run_files import REPO, run_on_two_processes

TOL = 2e-5
TRANSFORMER = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    return {"root": root, "sd3": str(build_tiny_pipeline(root / "sd3", family="sd3")),
            "flux": str(build_tiny_pipeline(root / "flux", family="flux")),
            "pairs": str(write_tiny_pairs(root / "pairs", n_pairs=16))}


def overrides(world, out, pretrained="sd3", batch_size=2, *extra):
    # max_grad_norm small enough that every step clips: the sharded clip is compared with torch's
    return [f"model.pretrained={world[pretrained]}", f"data.source={world['pairs']}", "data.resolution=32",
            "optim.max_steps=2", f"optim.batch_size={batch_size}", "optim.learning_rate=1e-3",
            "optim.scale_lr=false", "optim.warmup_steps=0", "optim.max_grad_norm=0.01", "checkpoint_every=1",
            "log_every=1", "tensorboard=false", f"output_dir={out}", *extra]


def one_process(command_args: list[str]) -> subprocess.CompletedProcess:
    """``diffusion-dpo ARGS`` in a fresh process (a sharded one forms its own process group)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "diffusion_dpo", *command_args], env=env, capture_output=True,
                          text=True, timeout=300)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def parameters(final: Path, pretrained: str) -> dict:
    """The parameters (not the buffers) of a full fine-tune's final/ denoiser, loaded by its family."""
    from diffusion_dpo.families import detect

    return {n: p.detach() for n, p in detect(pretrained).load_denoiser(str(final)).named_parameters()}


def assert_half_held(summary: dict, trained: dict) -> None:
    """Each process held about half the trained bytes (from its DTensor shards), and the whole they report
    is the bytes of the trained parameters (fp32)."""
    whole = sum(t.numel() * 4 for t in trained.values())
    assert summary["trained_bytes"] == whole
    held = summary["trained_bytes_held"]
    assert len(held) == 2 and all(abs(h - whole / 2) <= 0.02 * whole for h in held), (held, whole)


@pytest.fixture(scope="module")
def sharded_sd3(world):
    """The undisturbed two-process sharded run of tiny SD3 (2 steps, a checkpoint after each)."""
    out = world["root"] / "sharded-sd3"
    run_on_two_processes("train", overrides(world, out, "sd3", 2, "parallel.strategy=fsdp"))
    return out


# -------------------------------------------------------------------------------------- the pieces

def test_each_family_names_its_blocks(world):
    from diffusion_dpo import models
    from diffusion_dpo.llm import models as llm_models
    from diffusion_dpo.llm import tiny as llm_tiny

    sd = models.load_components(str(build_tiny_pipeline(world["root"] / "sd")))
    unet = sd.denoiser
    assert sd.family.shard_blocks(unet) == [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    sd3 = models.load_components(world["sd3"])
    blocks = sd3.family.shard_blocks(sd3.denoiser)
    assert blocks == list(sd3.denoiser.transformer_blocks) and len(blocks) == sd3.denoiser.config.num_layers
    flux = models.load_components(world["flux"])
    t = flux.denoiser
    assert flux.family.shard_blocks(t) == [*t.transformer_blocks, *t.single_transformer_blocks]
    assert len(t.single_transformer_blocks) >= 1
    lm = llm_models.load_causal_lm(str(llm_tiny.build_tiny_lm(world["root"] / "lm")))
    layers = sharding.no_split_blocks(lm)
    assert layers == list(lm.model.layers) and len(layers) == lm.config.num_hidden_layers


def test_clip_matches_torch_on_one_process():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    want = torch.nn.utils.clip_grad_norm_(copies, 0.5)
    got = sharding.clip_grad_norm(params, 0.5)
    assert got.item() == pytest.approx(want.item(), rel=1e-6) and want.item() > 0.5  # it did clip
    assert all(torch.allclose(p.grad, c.grad, atol=1e-7) for p, c in zip(params, copies))
    unclipped = sharding.clip_grad_norm(params, float("inf"))
    assert unclipped.item() == pytest.approx(0.5, rel=1e-5)


def test_pair_seeds_follow_the_global_position():
    import numpy as np

    def before(seed, step, rank, n, offset):  # the formula every one-process run used so far
        return [int(np.random.SeedSequence([seed, step, rank, offset + i]).generate_state(2, np.uint64)[0] >> 1)
                for i in range(n)]

    assert pair_seeds(7, 3, 0, 4, 8) == before(7, 3, 0, 4, 8)  # one process: bit-identical
    one = pair_seeds(7, 3, 0, 8, 8)  # micro-batch 1 of a one-process step with 8 pairs per batch
    for rank in (0, 1):  # two processes of 4: PreferencePairs deals pairs out in turn
        assert pair_seeds(7, 3, rank, 4, 4, world=2) == one[rank::2]


def test_parallel_combinations_refused(tmp_path):
    with pytest.raises(ConfigError, match="mixed_precision=bf16"):
        sharding.check_parallel(ParallelSection(strategy="fsdp"), "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="parallel.cpu_offload"):
            sharding.check_parallel(ParallelSection(strategy="fsdp", cpu_offload=True), "no")
    with pytest.raises(ConfigError, match="parallel.cpu_offload"):
        validate(TrainingRunOptions(parallel=ParallelSection(cpu_offload=True)))


# ------------------------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_sharded_sd3_equals_one_process_and_resumes_on_one(world, sharded_sd3, tmp_path):
    single = train.run(load_config(train.TrainConfig, [], overrides(world, tmp_path / "single", "sd3", 4)))
    got = load_file(sharded_sd3 / "final" / TRANSFORMER)
    want = load_file(Path(single.final) / TRANSFORMER)
    assert max_difference(got, want) <= TOL
    one_step = load_file(tmp_path / "single" / "checkpoints" / "step-1" / "trainable.safetensors")
    got_params = parameters(sharded_sd3 / "final", world["sd3"])
    assert max_difference(got_params, one_step) > 50 * TOL  # a step less is far outside the tolerance
    rows = [json.loads(line) for line in (sharded_sd3 / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0.01 for r in rows)  # every step clipped
    summary = json.loads((sharded_sd3 / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["weight_digests"][0] == summary["weight_digests"][1]
    assert_half_held(summary, got_params)
    meta = json.loads((sharded_sd3 / "checkpoints" / "step-2" / "state.json").read_text())
    assert meta["strategy"] == "fsdp" and {"sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= set(meta["sha256"])

    # The two-process checkpoint of step 1, resumed on one process (sharded, then whole) at 2 x 2 pairs.
    for strategy in ("fsdp", "ddp"):
        out = tmp_path / f"resumed-{strategy}"
        shutil.copytree(sharded_sd3, out)
        for name in ("final", "summary.json", "checkpoints/step-2"):
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
        args = overrides(world, out, "sd3", 4, f"parallel.strategy={strategy}", "resume=auto")
        if strategy == "fsdp":
            proc = one_process(["train", *args])
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            train.run(load_config(train.TrainConfig, [], args))
        assert max_difference(load_file(out / "final" / TRANSFORMER), got) <= TOL, strategy
        changed = json.loads((out / "resumes.jsonl").read_text().splitlines()[-1])["changed"]
        assert changed["optim.batch_size"] == {"old": 2, "new": 4}

    # One process at 2 pairs per batch would halve the global batch: refused, naming the key.
    out = tmp_path / "halved"
    shutil.copytree(sharded_sd3, out)
    with pytest.raises(InputError, match="optim.batch_size"):
        train.run(load_config(train.TrainConfig, [], overrides(world, out, "sd3", 2, "resume=auto")))


@pytest.mark.slow
def test_one_process_sharded_checkpoint_resumes_on_two(world, sharded_sd3, tmp_path):
    out = tmp_path / "one"
    proc = one_process(["train", *overrides(world, out, "sd3", 4, "parallel.strategy=fsdp")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "checkpoints" / "step-1" / "state.json").read_text())["world_size"] == 1
    for name in ("final", "summary.json", "checkpoints/step-2"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    run_on_two_processes("train", overrides(world, out, "sd3", 2, "parallel.strategy=fsdp", "resume=auto"))
    summary = json.loads((out / "summary.json").read_text())
    assert Path(summary["resumed_from"]).name == "step-1" and summary["num_processes"] == 2
    assert max_difference(load_file(out / "final" / TRANSFORMER), load_file(sharded_sd3 / "final" / TRANSFORMER)) <= TOL


@pytest.mark.slow
def test_sharded_final_loads_and_generates(world, sharded_sd3):
    from diffusers import SD3Transformer2DModel

    from diffusion_dpo.families import detect

    final = sharded_sd3 / "final"
    loaded = SD3Transformer2DModel.from_pretrained(str(final))
    saved = load_file(final / TRANSFORMER)
    assert all(torch.equal(p.detach(), saved[n]) for n, p in loaded.named_parameters())
    pipe = detect(world["sd3"]).load_pipeline(world["sd3"], denoiser=str(final))
    image = pipe("a red dog", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


@pytest.mark.slow
def test_sharded_flux_with_offloaded_reference_equals_one_process(world, tmp_path):
    run_on_two_processes("train", overrides(world, tmp_path / "sharded", "flux", 2, "parallel.strategy=fsdp",
                                            "parallel.frozen=offload"))
    single = train.run(load_config(train.TrainConfig, [], overrides(world, tmp_path / "single", "flux", 4)))
    got = load_file(tmp_path / "sharded" / "final" / TRANSFORMER)
    assert max_difference(got, load_file(Path(single.final) / TRANSFORMER)) <= TOL
    assert_half_held(json.loads((tmp_path / "sharded" / "summary.json").read_text()),
                     parameters(tmp_path / "sharded" / "final", world["flux"]))


@pytest.mark.slow
def test_sharded_lora_equals_one_process_and_loads(world, tmp_path):
    from diffusion_dpo.families import detect

    lora = ("model.lora_rank=4", "parallel.strategy=fsdp")
    run_on_two_processes("train", overrides(world, tmp_path / "sharded", "sd3", 2, *lora))
    single = train.run(load_config(train.TrainConfig, [], overrides(world, tmp_path / "single", "sd3", 4,
                                                                     "model.lora_rank=4")))
    got = load_file(tmp_path / "sharded" / "final" / "pytorch_lora_weights.safetensors")
    assert max_difference(got, load_file(Path(single.final) / "pytorch_lora_weights.safetensors")) <= TOL
    pipe = detect(world["sd3"]).load_pipeline(world["sd3"], lora=str(tmp_path / "sharded" / "final"))
    image = pipe("a red dog", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


@pytest.mark.slow
def test_sharded_llm_dpo_equals_one_process(tmp_path):
    from diffusion_dpo.llm import models
    from diffusion_dpo.llm import tiny as llm_tiny
    from diffusion_dpo.recipes import llm_dpo

    lm_world = llm_tiny.write_world(tmp_path / "world")

    def args(out, batch_size, *extra):
        return [f"model.name_or_path={lm_world['model']}", f"data.source={lm_world['pairs']}", "data.max_rows=64",
                "data.eval_fraction=0", "reference.kind=copy", "loss.beta=0.5", "optim.learning_rate=0.005",
                f"optim.batch_size={batch_size}", "optim.max_steps=3", "checkpoint_every=2", "tensorboard=false",
                f"output_dir={out}", *extra]

    run_on_two_processes("llm", ["dpo", *args(tmp_path / "sharded", 4, "parallel.strategy=fsdp")])
    single = llm_dpo.run(load_config(llm_dpo.DPOConfig, [], args(tmp_path / "single", 8)))
    got = dict(models.load_causal_lm(str(tmp_path / "sharded" / "final")).named_parameters())
    want = dict(models.load_causal_lm(single["final"]).named_parameters())
    start = dict(models.load_causal_lm(str(lm_world["model"])).named_parameters())
    # as tests/test_llm_ddp.py: Adam magnifies float rounding of tiny gradients (3 steps at lr 5e-3)
    assert max_difference(got, want) <= 1e-4 and max_difference(got, start) > 1e-3
    assert_half_held(json.loads((tmp_path / "sharded" / "summary.json").read_text()),
                     {n: p for n, p in got.items()})


KILLER = '''
import os, pathlib, runpy, signal, sys
point, when = sys.argv[1], sys.argv[2]  # kill process 0 at the write whose path ends with ``point``
if os.environ.get("RANK") == "0":
    for owner, name in ((pathlib.Path, "write_text"), (os, "replace")):
        real = getattr(owner, name)

        def patched(*args, _real=real, **kwargs):
            hit = str(args[0]).endswith(point)
            if hit and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = _real(*args, **kwargs)
            if hit and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(owner, name, patched)
sys.argv = ["diffusion_dpo", *sys.argv[3:]]
runpy.run_module("diffusion_dpo", run_name="__main__")
'''


@pytest.mark.slow
@pytest.mark.parametrize("point, when, resumed_step", [
    ("step-2.tmp/state.json", "before", 1),  # every process wrote its shards, the commit mark is not written
    ("step-2.tmp", "after", 2),  # right after publishing step-2 (os.replace(step-2.tmp, step-2))
])
def test_sharded_run_killed_at_a_checkpoint_write_resumes_exactly(world, sharded_sd3, tmp_path, point, when,
                                                                  resumed_step):
    """Process 0 killed at a write of step-2's save: resume=auto continues from the newest complete
    checkpoint and ends as the undisturbed run."""
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    out = tmp_path / "killed"
    args = overrides(world, out, "sd3", 2, "parallel.strategy=fsdp")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(killer), point, when, "train", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "final").exists()
    run_on_two_processes("train", [*args, "resume=auto"])
    summary = json.loads((out / "summary.json").read_text())
    assert Path(summary["resumed_from"]).name == f"step-{resumed_step}"
    want = load_file(sharded_sd3 / "final" / TRANSFORMER)
    got = load_file(out / "final" / TRANSFORMER)
    assert all(torch.equal(got[k], want[k]) for k in want)  # the same processes, the same order: exact
    want_summary = json.loads((sharded_sd3 / "summary.json").read_text())
    assert summary["weight_digests"] == want_summary["weight_digests"]


def test_a_data_position_regroups_onto_one_process(world):
    """Two processes' positions after one step of 2 pairs each, regrouped onto one process of 4 pairs: its
    next batch holds the pairs of the one-process run's second batch, and the used-pairs counts add up."""
    from diffusion_dpo.data import DataConfig, PreferencePairs

    cfg = DataConfig(source=world["pairs"], resolution=32)
    states = []
    for rank in (0, 1):
        pairs = PreferencePairs(cfg, seed=0, process_index=rank, num_processes=2)
        next(pairs.batches(2))
        states.append(pairs.state_dict())
    regrouped = PreferencePairs(cfg, seed=0)
    regrouped.load_state_dict(regrouped.regroup(states))
    assert regrouped.stats()["pairs_used"] == 4
    single = PreferencePairs(cfg, seed=0).batches(4)
    first, second = next(single), next(single)
    resumed = next(regrouped.batches(4))
    assert resumed["row_indices"].tolist() == second["row_indices"].tolist()
    assert not set(resumed["row_indices"].tolist()) & set(first["row_indices"].tolist())
