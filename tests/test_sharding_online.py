"""parallel.strategy=fsdp for the online commands: ``grpo`` (tiny SD3) and ``llm ppo`` (the tiny LM), two
CPU processes under gloo.

Which comparison is meaningful: grpo draws its sampler noise, step choice and pair noise from (seed, step,
rank), so one process of 2 prompts does not sample what two processes of 1 prompt each do. The sharded
two-process run is compared with the unsharded (ddp) two-process run: the same prompts, noise and rows on
each process, the same summed gradients. Within TOL (tests/test_sharding.py's reasoning: the sharded
gradient sum and clip round differently from the all-reduce; a LoRA run, whose clip and sum happen to add
the same two numbers, is bit-exact), while one step more or less is far outside it.

A sharded run resumed from its own checkpoint on the same two processes must end bit for bit as the
undisturbed one, for each kind of state the methods keep beside the weights: NFT's old policy (DTensor
shadows, saved whole), online DPO's refreshed reference (a second LoRA adapter on the sharded policy, or
a sharded full copy), the KL's frozen copy offloaded to the CPU.

``llm ppo`` samples on each process with its own RNG, so it too is compared with its two-process ddp run:
the sharded policy generates (synced: every process runs as many forwards) the same responses, and after
two iterations the weights agree to float32 rounding. PPO writes no checkpoints, so it has no resume.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_dpo.tiny import build_tiny_pipeline
from tests.run_files import metrics, run_on_two_processes

TOL = 2e-5
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow house"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding-online")
    (root / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))
    return {"root": root, "sd3": str(build_tiny_pipeline(root / "sd3", family="sd3")),
            "prompts": str(root / "prompts.txt")}


def grpo_args(world, out: Path, *extra: str) -> list[str]:
    """1 prompt x 2 images per process and step, 2 sampling steps of which 1 is trained, 1 optimizer step
    per sampling step, a checkpoint after each."""
    return [f"model.pretrained={world['sd3']}", f"prompts.source={world['prompts']}", "scorer.name=brightness",
            "sampling.resolution=32", "online.prompts_per_step=1", "online.group_size=2",
            "sampling.num_inference_steps=2", "online.train_steps=1", "optim.batch_size=2", "optim.max_steps=2",
            "optim.learning_rate=1e-2", "checkpoint_every=1", "checkpoints_keep=null", "tensorboard=false",
            f"output_dir={out}", *extra]


def final_weights(out: Path) -> dict:
    return load_file(next((out / "final").glob("*.safetensors")))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("images_per_s")} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sharded_grpo_equals_two_process_ddp(world, tmp_path, lora):
    """GRPO with kl_coef > 0 (LoRA: the adapter switched off; full: a sharded frozen copy)."""
    kind = ["model.lora_rank=4"] if lora else ["model.lora_rank=0", "online.reference=copy"]
    extra = ["online.kl_coef=0.04", *kind]
    run_on_two_processes("grpo", grpo_args(world, tmp_path / "fsdp", "parallel.strategy=fsdp", *extra))
    run_on_two_processes("grpo", grpo_args(world, tmp_path / "ddp", *extra))
    got, want = final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "ddp")
    assert max_difference(got, want) <= TOL
    one_step = load_file(tmp_path / "ddp" / "checkpoints" / "step-1" / "trainable.safetensors")
    if lora:  # final/ holds the adapter in diffusers' naming; the checkpoint in the module's
        step_one_moved = max(v.abs().max().item() for k, v in one_step.items() if "lora_B" in k)
        assert step_one_moved > 50 * TOL
    else:
        # a step less is far outside the tolerance (final/ holds the buffers too)
        assert max_difference({k: got[k] for k in one_step}, one_step) > 50 * TOL
    rows = [r for r in metrics(tmp_path / "fsdp") if "reward_mean" in r]
    ddp_rows = [r for r in metrics(tmp_path / "ddp") if "reward_mean" in r]
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0  # the reference is the starting policy
    assert rows[1]["kl"] == pytest.approx(ddp_rows[1]["kl"], rel=1e-4)
    assert rows[0]["reward_mean"] == ddp_rows[0]["reward_mean"]  # the first rollout: the same weights
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["weight_digests"][0] == summary["weight_digests"][1]
    held, whole = summary["trained_bytes_held"], summary["trained_bytes"]
    assert len(held) == 2 and all(abs(h - whole / 2) <= 0.05 * whole for h in held), (held, whole)
    meta = json.loads((tmp_path / "fsdp" / "checkpoints" / "step-2" / "state.json").read_text())
    assert meta["strategy"] == "fsdp"


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    # NFT's old policy trails the trained one (decay 0.3 from step 1); the KL's copy offloaded to the CPU
    ("method=nft", "model.lora_rank=0", "online.reference=copy", "online.nft_kl_coef=0.1",
     "online.nft_old_decay_rate=0.3", "online.nft_old_decay_max=0.6", "parallel.frozen=offload", "optim.max_steps=3"),
    # online DPO's reference refreshed at step 2: at the step-3 checkpoint it is step 2's policy
    ("method=online_dpo", "model.lora_rank=4", "online.ref_refresh_every=2", "optim.batch_size=1",
     "optim.max_steps=4"),
    ("method=online_dpo", "model.lora_rank=0", "online.reference=copy", "online.ref_refresh_every=2",
     "optim.batch_size=1", "optim.max_steps=4"),
], ids=["nft-offloaded-copy", "online_dpo-second-adapter", "online_dpo-sharded-copy"])
def test_sharded_grpo_resumes_exactly(world, tmp_path, extra):
    """The undisturbed sharded run, and a copy of its folder cut back to the checkpoint before the last and
    resumed with resume=auto: the same final weights bit for bit, the same metrics after the checkpoint."""
    steps = int(next(e for e in extra if e.startswith("optim.max_steps=")).split("=")[1])
    args = ["parallel.strategy=fsdp", *extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_on_two_processes("grpo", grpo_args(world, straight, *args))
    shutil.copytree(straight, resumed)
    for name in ("final", "summary.json", f"checkpoints/step-{steps}", "eval"):
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    state = torch.load(resumed / "checkpoints" / f"step-{steps - 1}" / "rank-0.pt", weights_only=True)
    kept = state["recipe"]
    assert kept and all(not hasattr(t, "device_mesh") for d in kept.values() for t in d.values())  # whole
    run_on_two_processes("grpo", grpo_args(world, resumed, *args, "resume=auto"))
    summary = json.loads((resumed / "summary.json").read_text())
    assert Path(summary["resumed_from"]).name == f"step-{steps - 1}"
    want, got = final_weights(straight), final_weights(resumed)
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert comparable(metrics(resumed)) == comparable(metrics(straight))


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full-copy-head", "lora-adapter-value_model-ptx"])
def test_sharded_llm_ppo_equals_two_process_ddp(tmp_path, lora):
    """A full fine-tune with a value head and a (sharded) reference copy; LoRA with the adapter switched off
    as the reference, a value model and PPO-ptx. The final policy and critic of the sharded run are the ddp
    run's; the first iteration's gradient norm (over every shard, root included) is the ddp one's."""
    from diffusion_dpo.llm import models
    from diffusion_dpo.llm import tiny as llm_tiny

    lm_world = llm_tiny.write_world(tmp_path / "world")
    rule = tmp_path / "rule.py"
    rule.write_text("def length(prompts, responses):\n    return [len(r) / 10 for r in responses]\n")
    kind = (["model.lora.enabled=true", "reference.kind=adapter", "value.kind=model", "ptx.coef=0.5",
             f"ptx.source={lm_world['text']}"] if lora else ["reference.kind=copy", "value.kind=head"])

    def args(out, *extra):
        return ["ppo", f"model.name_or_path={lm_world['model']}", f"data.source={lm_world['prompts']}",
                "rollout.batch_size=4", "rollout.max_new_tokens=4", "optim.batch_size=2", "ppo.epochs=2",
                "optim.learning_rate=0.001", "ppo.iterations=2", f"reward.function={rule}:length",
                "tensorboard=false", f"output_dir={out}", *kind, *extra]

    run_on_two_processes("llm", args(tmp_path / "fsdp", "parallel.strategy=fsdp"))
    run_on_two_processes("llm", args(tmp_path / "ddp"))
    if lora:
        files = ("final/adapter_model.safetensors", "value/model.safetensors")
        got, want = ({f: load_file(out / f) for f in files} for out in (tmp_path / "fsdp", tmp_path / "ddp"))
        moved = max(v.abs().max().item() for k, v in got[files[0]].items() if "lora_B" in k)
    else:
        got, want = ({"policy": dict(models.load_causal_lm(str(out / "final")).named_parameters()),
                      "head": load_file(out / "value" / models.VALUE_HEAD_FILE)}
                     for out in (tmp_path / "fsdp", tmp_path / "ddp"))
        start = dict(models.load_causal_lm(str(lm_world["model"])).named_parameters())
        moved = max_difference(got["policy"], start)
    for name in got:
        assert max_difference(got[name], want[name]) <= 1e-6, name
    assert moved > 1e-3  # two iterations of 4 steps at lr 1e-3 moved the policy
    rows, ddp_rows = metrics(tmp_path / "fsdp"), metrics(tmp_path / "ddp")
    assert [r["reward"] for r in rows] == [r["reward"] for r in ddp_rows]  # the same responses
    assert rows[0]["grad_norm"] == pytest.approx(ddp_rows[0]["grad_norm"], rel=1e-5)
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    held, whole = summary["trained_bytes_held"], summary["trained_bytes"]
    assert len(held) == 2 and all(abs(h - whole / 2) <= 0.05 * whole for h in held), (held, whole)
