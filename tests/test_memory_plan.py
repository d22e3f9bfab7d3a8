"""The memory plan against what tiny models really allocate on CPU, its arithmetic by hand, and the counts of the
shipped architectures against the published model sizes."""

import json

import pytest
import torch

from diffusion_dpo import models
from diffusion_dpo.cli import main as cli_main
from diffusion_dpo.config import ConfigError, load_config
from diffusion_dpo.engine import build_optimizer
from diffusion_dpo.errors import InputError
from diffusion_dpo.memory_count import (
    ActivationModel,
    describe_pipeline,
    lora_shapes,
    resolve_source,
    saved_bytes,
)
from diffusion_dpo.memory_plan import PlanConfig, adafactor_elements, memory_plan
from diffusion_dpo.run_options import OptimSection

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def plan_for(*overrides: str):
    return memory_plan(load_config(PlanConfig, overrides=["mixed_precision=no", *overrides]))


def rows(plan) -> dict[str, float]:
    return {r.name: r.device + r.host for r in plan.rows}


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors}
    return sum(nbytes for _, nbytes in seen)


def close(estimate: float, measured: float, tolerance: float = 0.10) -> bool:
    return abs(estimate - measured) <= tolerance * measured


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux", "tiny"])
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_estimate_within_10_percent_of_what_a_real_step_allocates(name, lora_rank):
    comps = models.load_components(resolve_source(name))
    unet = comps.denoiser
    if lora_rank:
        models.attach_lora(unet, lora_rank, None, TARGETS)
    unet.train()
    resolution, pairs = 48, 2
    h = resolution // 2
    images = 2 * pairs
    noisy = torch.randn(images, 4, h, h)
    text = comps.family.encode_text(comps, ["a red dog"] * images)
    timestep = torch.full((images,), 500 if name == "tiny" else 500.0)
    saved, _ = saved_bytes(unet, lambda: comps.family.forward(unet, noisy, timestep, text, {}))

    optimizer, _ = build_optimizer(unet.parameters(), OptimSection(), 10)
    comps.family.forward(unet, noisy, timestep, text, {}).float().pow(2).mean().backward()
    optimizer.step()
    trained = [p for p in unet.parameters() if p.requires_grad]
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    reference = models.frozen_copy(unet, torch.float32)
    frozen = [t for m in [comps.vae, *comps.text_encoders] for t in [*m.parameters(), *m.buffers()]]

    plan = rows(plan_for(f"model.pretrained={name}", f"model.lora_rank={lora_rank}", f"resolution={resolution}",
                         f"batch_size={pairs}", "reference=copy"))
    assert close(plan["weights"] + plan["buffers"], storage_bytes([*unet.parameters(), *unet.buffers()]))
    assert close(plan["gradients"], storage_bytes([p.grad for p in trained]))
    assert close(plan["optimizer state"], storage_bytes(state))
    assert close(plan["activations"], sum(saved.values()))
    assert close(plan["frozen encoders + VAE"], storage_bytes(frozen))
    if not lora_rank:  # a LoRA copy holds its adapter too; the plan's copy is the base
        assert close(plan["reference"], storage_bytes([*reference.parameters(), *reference.buffers()]))


def test_adafactor_state_as_measured():
    comps = models.load_components(resolve_source("tiny-flux"))
    unet = comps.denoiser
    optimizer, _ = build_optimizer(unet.parameters(), OptimSection(optimizer="adafactor"), 10)
    for p in unet.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    plan = rows(plan_for("model.pretrained=tiny-flux", "optimizer=adafactor", "resolution=32"))
    assert close(plan["optimizer state"], storage_bytes(state))


def test_adafactor_elements_by_hand():
    # a 3x4 matrix keeps 3 row and 4 column means; a vector keeps itself; [2, 3, 4]: rows 2*3, columns 2*4
    assert adafactor_elements([(3, 4), (5,)]) == 3 + 4 + 5
    assert adafactor_elements([(2, 3, 4)]) == 6 + 8


def test_lora_count_equals_what_peft_attaches():
    arch = describe_pipeline("tiny-sd3")
    unet = models.load_components(resolve_source("tiny-sd3")).denoiser
    models.attach_lora(unet, 8, None, TARGETS)
    attached = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert sum(a * b for a, b in lora_shapes(arch.denoiser_module, TARGETS, 8)) == attached


def test_fsdp_divides_the_trained_state_and_offload_moves_it_to_host():
    arch = describe_pipeline("tiny-sd3")
    params, tensors = arch.denoiser.params, len(arch.denoiser.shapes)
    base = ["model.pretrained=tiny-sd3", "resolution=32", "ema=true"]
    one = rows(plan_for(*base))
    assert one["weights"] == 4 * params and one["gradients"] == 4 * params and one["EMA"] == 4 * params
    assert one["optimizer state"] == 8 * params + 4 * tensors  # two moments and a step per tensor
    ddp = rows(plan_for(*base, "processes=2"))
    assert ddp["ddp buckets"] == 4 * params and ddp["weights"] == 4 * params
    fsdp = rows(plan_for(*base, "processes=4", "parallel.strategy=fsdp"))
    assert fsdp["weights"] == params and fsdp["gradients"] == params and fsdp["EMA"] == params
    assert fsdp["optimizer state"] == 2 * params + 4 * tensors
    # the full-copy reference and the frozen encoders are split too under parallel.frozen=shard
    assert fsdp["reference"] == one["reference"] / 4
    assert fsdp["frozen encoders + VAE"] == pytest.approx(one["frozen encoders + VAE"] / 4)
    offload = plan_for(*base, "processes=4", "parallel.strategy=fsdp", "parallel.cpu_offload=true")
    by_name = {r.name: r for r in offload.rows}
    for name in ("weights", "gradients", "optimizer state", "EMA"):
        assert by_name[name].device == 0 and by_name[name].host == fsdp[name]
    assert offload.host_total == sum(fsdp[n] for n in ("weights", "gradients", "optimizer state", "EMA"))
    assert offload.device_total == pytest.approx(sum(fsdp.values()) - offload.host_total)


def test_compute_dtype_halves_frozen_and_activations_and_precompute_frees_encoders():
    base = ["model.pretrained=tiny-flux", "resolution=32"]
    fp32 = rows(plan_for(*base))
    bf16 = rows(memory_plan(load_config(PlanConfig, overrides=[*base, "mixed_precision=bf16"])))
    assert bf16["weights"] == fp32["weights"]  # trained weights stay fp32
    assert bf16["reference"] == fp32["reference"] / 2
    # activations are measured in bf16: most saved tensors halve, a few stay fp32 (norm statistics, rotary tables)
    assert 0.4 * fp32["activations"] < bf16["activations"] < 0.75 * fp32["activations"]
    assert bf16["compute copy"] == fp32["weights"] / 2  # autocast's bf16 casts of the fp32 weights
    assert rows(plan_for(*base, "precompute=true"))["frozen encoders + VAE"] == 0


def test_checkpointing_keeps_unit_inputs_and_one_unit():
    acts = ActivationModel(units={"0": (1.0, 0.0, 0.0), "1": (2.0, 0.0, 0.0)},
                           unit_inputs={"0": (0.5, 0.0, 0.0), "1": (0.5, 0.0, 0.0)}, rest=(0.0, 1.0, 10.0),
                           width_factor=3.0)
    # per image, T_img 100, T_txt 4: units 100 + 200, rest 4 + 10; x3 width, x2/4 bf16, x2 images
    assert acts.bytes(100, 4, 2, 2, checkpointing=False) == (300 + 14) * 3 * 0.5 * 2
    # checkpointed: inputs 50 + 50, the largest unit 200 recomputed
    assert acts.bytes(100, 4, 2, 2, checkpointing=True) == (100 + 200 + 14) * 3 * 0.5 * 2
    plan = {c: rows(plan_for("model.pretrained=tiny-flux", "resolution=64",
                             f"model.gradient_checkpointing={c}"))["activations"] for c in ("false", "true")}
    assert plan["true"] < plan["false"]


@pytest.mark.parametrize("name, denoiser, published", [
    ("sd35-medium", 2.5e9, {"text_encoder_3": 4.7e9}),
    ("flux1-dev", 11.9e9, {"text_encoder_2": 4.7e9}),
    ("qwen-image", 20.4e9, {"text_encoder": 8.3e9}),
])
def test_shipped_architectures_have_their_published_sizes(name, denoiser, published):
    arch = describe_pipeline(name)
    assert arch.denoiser.params + arch.denoiser.buffers == pytest.approx(denoiser, rel=0.03)
    for component, size in published.items():
        assert arch.frozen[component] == pytest.approx(size, rel=0.03)
    assert arch.tokens(1024) == 4096


def test_bad_keys_are_config_errors_naming_them():
    with pytest.raises(ConfigError, match="'bogus'"):
        load_config(PlanConfig, overrides=["bogus=1"])
    with pytest.raises(ConfigError, match="parallel.cpu_offload"):
        load_config(PlanConfig, overrides=["parallel.cpu_offload=true"])
    with pytest.raises(ConfigError, match="'reference'"):
        load_config(PlanConfig, overrides=["reference=adapter"])
    with pytest.raises(ConfigError, match="processes"):
        load_config(PlanConfig, overrides=["processes=0"])
    with pytest.raises(ConfigError, match="model.lora_targets"):
        plan_for("model.pretrained=tiny-sd3", "model.lora_rank=4", "model.lora_targets=[nothing_here]")
    with pytest.raises(InputError, match="'resolution'"):
        plan_for("model.pretrained=tiny-sd3", "resolution=30")


def test_command_reads_a_training_config_and_writes_json(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("model:\n  pretrained: tiny-flux\n  lora_rank: 4\n  lora_alpha: 8\n  gradient_checkpointing: "
                      "true\ndata:\n  source: tiny\n  resolution: 32\noptim:\n  batch_size: 3\nmethod: sft\n"
                      "ema:\n  decay: 0.99\nparallel:\n  strategy: fsdp\n")
    out = tmp_path / "plan.json"
    assert cli_main(["plan", "--config", str(config), "processes=2", f"output={out}", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    cfg = printed["config"]
    assert (cfg["model"]["lora_rank"], cfg["resolution"], cfg["batch_size"], cfg["images_per_example"]) == (4, 32, 3, 1)
    assert cfg["ema"] and cfg["reference"] == "none" and cfg["parallel"]["strategy"] == "fsdp"
    assert cfg["model"]["gradient_checkpointing"] and cfg["processes"] == 2


def test_packaged_training_config_plans_offline(capsys):
    assert cli_main(["plan", "--config", "flux_dev_lora", "processes=8", "card_gib=80"]) == 0
    text = capsys.readouterr().out
    assert "LoRA r=16" in text and "8 x ddp" in text and "fits a 80 GiB card" in text
    assert "freed: precomputed latents and text" in text


def test_a_grpo_config_plans_one_image_per_example_and_its_reference(tmp_path, capsys):
    config = tmp_path / "grpo.yaml"
    config.write_text("model:\n  pretrained: tiny-sd3\n  lora_rank: 8\nsampling:\n  resolution: 32\n"
                      "online:\n  reference: copy\n  kl_coef: 0.04\noptim:\n  batch_size: 4\n")
    assert cli_main(["plan", "--config", str(config), "--json"]) == 0
    cfg = json.loads(capsys.readouterr().out)["config"]
    assert (cfg["images_per_example"], cfg["reference"], cfg["resolution"], cfg["batch_size"]) == (1, "copy", 32, 4)
    train = tmp_path / "train.yaml"
    train.write_text("model:\n  pretrained: tiny-sd3\n")  # no data.resolution: the trainer's default, 512
    assert cli_main(["plan", "--config", str(train), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["resolution"] == 512


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux", "tiny"])
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_bf16_activations_within_10_percent_of_what_autocast_saves(name, lora_rank):
    """Held as the trainer holds it in bf16 (a LoRA's base in bf16, trained weights fp32) under autocast;
    autocast's casts of the weights are the plan's compute copy, not activations (saved_bytes leaves them)."""
    unet = models.load_components(resolve_source(name)).denoiser
    comps = models.load_components(resolve_source(name))
    if lora_rank:
        unet.to(torch.bfloat16)
        models.attach_lora(unet, lora_rank, None, TARGETS)
        for p in models.trainable_parameters(unet):
            p.data = p.data.float()
    unet.train()
    images, h = 6, 20
    noisy = torch.randn(images, 4, h, h)
    text = comps.family.encode_text(comps, ["a red dog"] * images)
    timestep = torch.full((images,), 500 if name == "tiny" else 500.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved, _ = saved_bytes(unet, lambda: comps.family.forward(unet, noisy, timestep, text, {}))
    plan = rows(memory_plan(load_config(PlanConfig, overrides=[
        f"model.pretrained={name}", f"model.lora_rank={lora_rank}", "resolution=40", "batch_size=3",
        "mixed_precision=bf16"])))
    assert close(plan["activations"], sum(saved.values()))
