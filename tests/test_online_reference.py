"""grpo's reference without a second denoiser (online.reference=adapter): online DPO's reference is the LoRA
adapter switched off, or with refreshes a second frozen adapter on the same base. Measured: no second copy of
the denoiser's parameters; the same losses and final weights as the frozen full copy (online.reference=copy)
bit for bit on CPU; the second adapter holds the policy adapter's values after a refresh, gets no gradient,
and comes back from a checkpoint; a full fine-tune with adapter is a ConfigError."""

from types import SimpleNamespace

import pytest
import torch
from run_files import metrics, same, weights
from safetensors.torch import load_file

from diffusion_dpo.checkpointing import trainable_state_dict
from diffusion_dpo.config import ConfigError, load_config
from diffusion_dpo.recipes import grpo
from diffusion_dpo.recipes.grpo_config import GrpoConfig
from diffusion_dpo.reference import AdapterOff, FrozenCopy, SecondAdapter
from diffusion_dpo.tiny import build_tiny_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow house"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_reference")
    (root / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))
    return {"prompts": str(root / "prompts.txt"), "sd": str(build_tiny_pipeline(root / "sd", family="sd"))}


def config(world, out, *overrides: str) -> GrpoConfig:
    base = [f"model.pretrained={world['sd']}", f"prompts.source={world['prompts']}", "scorer.name=brightness",
            "method=online_dpo", "online.prompts_per_step=2", "online.group_size=4",
            "sampling.num_inference_steps=2", "optim.batch_size=2", "optim.max_steps=4",
            "optim.learning_rate=1e-2", "checkpoint_every=0", "tensorboard=false", f"output_dir={out}"]
    return load_config(GrpoConfig, [], [*base, *overrides])


def parameter_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the distinct parameter and buffer tensors the modules hold (a tensor shared counts once)."""
    seen = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def built_models(world, tmp_path, *overrides: str) -> grpo.Built:
    cfg = config(world, tmp_path, *overrides)
    torch.manual_seed(0)
    # a one-process unsharded engine: what setup_models asks of it
    engine = SimpleNamespace(device=torch.device("cpu"), compute_dtype=torch.float32, sharded=False,
                             shard=lambda module, blocks: module, keep_frozen=lambda module, blocks: FrozenCopy(module))
    return grpo.setup_models(cfg, world["sd"], engine)


def reference_module(built: grpo.Built) -> torch.nn.Module:
    with built.reference.model() as module:
        return module


def adapter_bytes(built: grpo.Built) -> int:
    return sum(p.numel() * p.element_size() for p in trainable_state_dict(built.policy).values())


def test_the_default_reference_holds_no_second_denoiser(world, tmp_path):
    """Policy + reference parameter bytes: adapter without refreshes = the policy alone; with refreshes = the
    policy + one adapter's size; copy = at least twice the denoiser."""
    off = built_models(world, tmp_path)
    assert isinstance(off.reference, AdapterOff)
    policy_only = parameter_bytes(off.policy)
    assert parameter_bytes(off.policy, reference_module(off)) == policy_only

    second = built_models(world, tmp_path, "online.ref_refresh_every=2")
    assert isinstance(second.reference, SecondAdapter)
    assert parameter_bytes(second.policy, reference_module(second)) == policy_only + adapter_bytes(second)

    full = built_models(world, tmp_path, "online.reference=copy")
    assert isinstance(full.reference, FrozenCopy)
    assert parameter_bytes(full.policy, reference_module(full)) >= 2 * (policy_only - adapter_bytes(full))


def test_the_second_adapter_copies_the_policy_and_is_never_trained(world, tmp_path):
    built = built_models(world, tmp_path, "online.ref_refresh_every=2")
    ref = built.reference
    trained = {name: p for name, p in built.policy.named_parameters() if p.requires_grad}
    assert trained and not any(".reference." in name for name in trained)  # not saved, not optimized
    with torch.no_grad():
        for p in trained.values():
            p.add_(torch.randn_like(p))
    assert not all(torch.equal(policy, copy) for policy, copy in ref.pairs.values())
    ref.refresh()
    assert all(torch.equal(policy, copy) and copy.dtype == torch.float32 for policy, copy in ref.pairs.values())

    # the reference forward uses the reference adapter; then the policy's trains and gets every gradient
    x = torch.randn(1, 4, 4, 4)
    text = torch.randn(1, 77, built.policy.config.cross_attention_dim)
    with torch.no_grad():
        base_out = built.policy(x, 10, encoder_hidden_states=text).sample
        ref.refresh()  # equal to the policy adapter: the same prediction
        with ref.model() as module:
            assert torch.equal(module(x, 10, encoder_hidden_states=text).sample, base_out)
        for _, copy in ref.pairs.values():  # now the reference differs from the policy
            copy.add_(torch.randn_like(copy))
        with ref.model() as module:
            assert not torch.equal(module(x, 10, encoder_hidden_states=text).sample, base_out)
    assert trainable_state_dict(built.policy).keys() == trained.keys()
    built.policy(x, 10, encoder_hidden_states=text).sample.square().mean().backward()
    assert all(p.grad is not None for p in trained.values())
    assert all(copy.grad is None and not copy.requires_grad for _, copy in ref.pairs.values())


@pytest.mark.parametrize("method, refresh", [("online_dpo", 0), ("online_dpo", 2), ("grpo", 0)])
def test_adapter_reference_trains_exactly_like_the_full_copy(world, tmp_path, method, refresh):
    """4 steps (online DPO refreshed at step 2 when refresh=2; GRPO with its KL term): the same metrics and
    final LoRA weights bit for bit whether the reference is the adapter (off, or a second one) or a frozen full
    copy, as online DPO made it before online.reference existed; the checkpoint keeps the second adapter's
    weights under their names."""
    extra = [f"method={method}", f"online.ref_refresh_every={refresh}", "checkpoint_every=3",
             "checkpoints_keep=null", "online.kl_coef=0.04"]
    grpo.run(config(world, tmp_path / "adapter", *extra))
    grpo.run(config(world, tmp_path / "copy", *extra, "online.reference=copy"))
    assert same(weights(tmp_path / "adapter" / "final"), weights(tmp_path / "copy" / "final"))
    drop = ("images_per_s_sampled", "images_per_s_trained")
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / run)]
            for run in ("adapter", "copy")]
    assert rows[0] == rows[1] and rows[0][-1]["loss"] != rows[0][0]["loss"]
    if method == "grpo":
        assert rows[0][-1]["kl"] > 0  # the reference's term was in play
    if refresh:
        saved = torch.load(tmp_path / "adapter" / "checkpoints" / "step-3" / "rank-0.pt", weights_only=True)
        names = saved["recipe"]["reference"]
        assert names and all(".reference." in name for name in names)


def test_a_full_finetune_needs_the_copy(world, tmp_path):
    """online.reference null picks the copy for a full fine-tune (and the adapter for LoRA); asking for the
    adapter on a full fine-tune is refused, naming the keys."""
    with pytest.raises(ConfigError, match=r"online\.reference.*model\.lora_rank.*online\.reference=copy"):
        grpo.run(config(world, tmp_path / "full", "model.lora_rank=0", "online.reference=adapter"))
    with pytest.raises(ConfigError, match="online.reference=copy"):
        grpo.run(config(world, tmp_path / "full", "model.lora_rank=0", "method=grpo", "online.kl_coef=0.04",
                        "online.group_size=2", "optim.batch_size=8", "online.reference=adapter"))
    assert config(world, tmp_path / "y", "model.lora_rank=0").reference_kind() == "copy"
    assert config(world, tmp_path / "z", "model.lora_rank=4").reference_kind() == "adapter"
    # grpo without a KL term needs no reference at all: nothing to refuse, nothing built
    cfg = config(world, tmp_path / "x", "model.lora_rank=0", "method=grpo", "online.kl_coef=0")
    assert not cfg.needs_reference()


def test_grpo_evaluates_the_ema_weights(world, tmp_path):
    """With an EMA (ema.final false) the final held-out evaluation samples the EMA weights, written to
    eval/final/weights (final/ holds the trained ones), and the metrics row says so."""
    out = tmp_path / "ema"
    grpo.run(config(world, out, "method=grpo", "optim.batch_size=8", "optim.max_steps=2", "checkpoint_every=2",
                    "ema.decay=0.5", f"eval.prompts={world['prompts']}", "eval.seeds=1", "eval.n_boot=10",
                    "eval.grid_prompts=0"))
    row = [r for r in metrics(out) if "eval/win_rate" in r][-1]
    assert row["eval/ema_weights"] == 1.0
    evaluated, final = weights(out / "eval" / "final" / "weights"), weights(out / "final")
    ema = load_file(out / "checkpoints" / "step-2" / "ema.safetensors")
    trained = load_file(out / "checkpoints" / "step-2" / "trainable.safetensors")

    def sums(tensors):  # the files name the adapter's weights differently; their values must match
        return sorted(float(t.double().sum()) for t in tensors.values())

    assert sums(evaluated) == pytest.approx(sums(ema), abs=1e-6) and sums(final) == pytest.approx(sums(trained))
    assert sums(evaluated) != pytest.approx(sums(final), abs=1e-6)
