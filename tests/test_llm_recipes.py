"""The four recipes end to end on a tiny model, quickly: outputs, completion-only SFT loss, DPO reference
modes, reward losses in the recipe, PPO options (reward model, value model, k3, adaptive KL, PPO-ptx, LoRA
reference), the CLI and its errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from diffusion_dpo import cli
from diffusion_dpo.config import load_config
from diffusion_dpo.errors import InputError
from diffusion_dpo.llm import common, data, models, rl, tiny
from diffusion_dpo.recipes import llm_dpo as dpo
from diffusion_dpo.recipes import llm_ppo as ppo
from diffusion_dpo.recipes import llm_reward as reward
from diffusion_dpo.recipes import llm_sft as sft


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny.write_world(tmp_path_factory.mktemp("world"))


def cfg_of(cls, world, out, *overrides):
    base = [f"model.name_or_path={world['model']}", f"output_dir={out}", "tensorboard=false"]
    return load_config(cls, [], base + list(overrides))


def test_sft_loss_is_completion_only_and_run_writes_outputs(world, tmp_path):
    tok = models.load_tokenizer(str(world["model"]))
    model = models.load_causal_lm(str(world["model"]))
    examples, _ = data.tokenize_demos(tiny.demo_rows(4), tok, max_length=32)
    batch = data.DemoCollator(tok.pad_token_id)(examples)
    nll, n = sft.completion_nll(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["input_ids"][:, 1:].clone()
    targets[batch["completion_mask"][:, 1:] == 0] = -100  # prompt and padding ignored
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    assert nll.item() == pytest.approx(expected.item(), rel=1e-5)
    assert n.item() == sum(len(e["completion"]) for e in examples)

    summary = sft.run(
        cfg_of(
            sft.SFTConfig,
            world,
            tmp_path / "sft",
            f"data.source={world['demos']}",
            "optim.learning_rate=0.01",
            "optim.max_steps=12",
            "optim.batch_size=16",
            "data.eval_fraction=0.1",
            "log_every=4",
        )
    )
    rows = common.read_metrics(tmp_path / "sft")
    assert [r["step"] for r in rows] == [4, 8, 12, 12]
    assert rows[2]["loss"] < rows[0]["loss"]
    assert summary["eval"]["eval/loss"] < rows[0]["loss"]
    assert yaml.safe_load((tmp_path / "sft" / "config.yaml").read_text())["optim"]["max_steps"] == 12
    assert json.loads((tmp_path / "sft" / "data_stats.json").read_text())["train"]["rows"] == 256
    reloaded = models.load_causal_lm(summary["final"])
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    with pytest.raises(InputError, match="already holds a run"):
        sft.run(cfg_of(sft.SFTConfig, world, tmp_path / "sft", f"data.source={world['demos']}"))


def dpo_run(world, out, *overrides):
    return dpo.run(
        cfg_of(
            dpo.DPOConfig,
            world,
            out,
            f"data.source={world['pairs']}",
            "data.max_rows=64",
            "data.eval_fraction=0.25",
            "optim.batch_size=8",
            "optim.max_steps=4",
            "optim.learning_rate=0.01",
            "log_every=1",
            *overrides,
        )
    )


def test_dpo_reference_modes(world, tmp_path, monkeypatch):
    loads = []
    real = models.load_causal_lm
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    copy = dpo_run(world, tmp_path / "copy", "reference.kind=copy")
    assert len(loads) == 2  # policy and its frozen copy
    loads.clear()
    pre = dpo_run(world, tmp_path / "pre", "reference.kind=precomputed")
    assert len(loads) == 1  # only the policy: no reference model exists during training
    # Before the first update the policy is the reference: the first step's loss is ln 2 in every mode.
    for run_dir in ("copy", "pre"):
        assert common.read_metrics(tmp_path / run_dir)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # Cached reference log-probs give the same training as the frozen copy.
    assert pre["eval"]["eval/loss"] == pytest.approx(copy["eval"]["eval/loss"], abs=1e-5)
    assert pre["weight_digests"] == copy["weight_digests"]
    cache = tmp_path / "pre" / "reference_logps.pt"
    assert cache.is_file()
    again = dpo_run(world, tmp_path / "again", "reference.kind=precomputed", f"reference.cache={cache}")
    assert again["weight_digests"] == pre["weight_digests"]
    lora = dpo_run(
        world, tmp_path / "lora", "reference.kind=adapter", "model.lora.enabled=true", "model.lora.r=4"
    )
    assert common.read_metrics(tmp_path / "lora")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (tmp_path / "lora" / "final" / "adapter_config.json").is_file()
    assert lora["eval"]["eval/rewards/margins"] > 0
    free = dpo_run(world, tmp_path / "free", "reference.kind=none", "loss.loss_type=ipo")
    first = common.read_metrics(tmp_path / "free")[0]
    # reference-free IPO: loss = (h - 1/(2 beta))^2 with h the difference of length-averaged policy log-probs
    assert set(first) >= {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
    }
    assert free["steps"] == 4
    with pytest.raises(InputError, match="lora"):
        dpo_run(world, tmp_path / "bad", "reference.kind=adapter")


def test_reward_batch_pairs_with_margin_and_rankings(world):
    tok = models.load_tokenizer(str(world["model"]))
    model, _ = models.load_score_model(str(world["model"]), tok.pad_token_id)
    scorer = models.TokenScorer(model.eval())
    rows = [{**r, "margin": 0.5} for r in tiny.preference_rows(3)]
    examples, _ = data.tokenize_pairs(rows, tok, max_length=32, margin_column="margin")
    batch = data.PairCollator(tok.pad_token_id)(examples)
    cfg = load_config(reward.RewardConfig, [], ["center_coef=0.1"])
    with torch.no_grad():
        losses, out = reward.reward_batch(scorer, batch, cfg)
        r = reward.sequence_rewards(scorer, batch)
    rc, rr = r[:3], r[3:]
    expected = -F.logsigmoid(rc - rr - 0.5) + 0.1 * (rc + rr) ** 2
    assert torch.allclose(losses, expected, atol=1e-6)
    ranked, _ = data.tokenize_rankings(tiny.ranking_rows(2, k=3), tok, max_length=32)
    rbatch = data.RankingCollator(tok.pad_token_id)(ranked)
    with torch.no_grad():
        losses, out = reward.reward_batch(scorer, rbatch, cfg)
        flat = reward.sequence_rewards(scorer, rbatch)
    assert reward.ranked_matrix(flat, rbatch["num_responses"]).shape == (2, 3)
    assert len(out["chosen"]) == 2 * 3  # C(3,2) comparisons per row
    assert losses[0].item() == pytest.approx(
        sum(
            -F.logsigmoid(flat[i] - flat[j]).item() + 0.1 * (flat[i] + flat[j]).item() ** 2
            for i, j in ((0, 1), (0, 2), (1, 2))
        )
        / 3,
        abs=1e-5,
    )


def test_ppo_options_run(world, tmp_path):
    # A reward model (random head) for the reward and as the value model's start.
    rm_dir = tmp_path / "rm"
    tok = models.load_tokenizer(str(world["model"]))
    rm, _ = models.load_score_model(str(world["model"]), tok.pad_token_id)
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    (rm_dir / models.NORMALIZATION_FILE).write_text(json.dumps({"bias": 0.25}))
    common_args = [
        f"data.source={world['prompts']}",
        "rollout.batch_size=8",
        "rollout.max_new_tokens=4",
        "optim.batch_size=4",
        "ppo.epochs=2",
        "optim.learning_rate=0.001",
    ]
    summary = ppo.run(
        cfg_of(
            ppo.PPOConfig,
            world,
            tmp_path / "ppo",
            *common_args,
            "ppo.iterations=2",
            f"reward.model={rm_dir}",
            "value.kind=model",
            "kl.estimator=k3",
            "kl.adaptive=true",
            "kl.coef=0.1",
            "kl.target=0.001",
            "kl.horizon=100",
            "ptx.coef=0.5",
            f"ptx.source={world['text']}",
            "model.lora.enabled=true",
            "reference.kind=adapter",
        )
    )
    rows = common.read_metrics(tmp_path / "ppo")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["kl_coef"] == pytest.approx(0.1)
    controller = rl.AdaptiveKLController(0.1, 0.001, 100)
    controller.update(rows[0]["kl"], n_steps=8)
    assert rows[1]["kl_coef"] == pytest.approx(controller.value, rel=1e-6)
    assert all(r["ptx_loss"] > 0 for r in rows)
    for key in ("reward", "kl", "entropy", "clipfrac", "value_loss", "approx_kl", "policy_loss"):
        assert all(math.isfinite(r[key]) for r in rows)
    assert (tmp_path / "ppo" / "final" / "adapter_config.json").is_file()
    assert (tmp_path / "ppo" / "value" / "config.json").is_file()
    assert summary["iterations"] == 2

    # A rule that pays nothing: the reward is exactly -no_eos_penalty x the share of responses without EOS.
    rule = tmp_path / "rule.py"
    rule.write_text("def zero(prompts, responses):\n    return [0.0] * len(responses)\n")
    ppo.run(
        cfg_of(
            ppo.PPOConfig,
            world,
            tmp_path / "ppo2",
            *common_args,
            "ppo.iterations=1",
            f"reward.function={rule}:zero",
            "reward.no_eos_penalty=2.0",
            "value.kind=head",
        )
    )
    row = common.read_metrics(tmp_path / "ppo2")[0]
    assert row["reward"] == pytest.approx(-2.0 * row["no_eos_fraction"])
    assert (tmp_path / "ppo2" / "value" / models.VALUE_HEAD_FILE).is_file()
    with pytest.raises(InputError, match="exactly one"):
        ppo.run(cfg_of(ppo.PPOConfig, world, tmp_path / "ppo3", *common_args))
    with pytest.raises(InputError, match="no function"):
        ppo.load_function(f"{rule}:missing")


def test_cli(world, tmp_path, capsys):
    assert cli.main(["llm"]) == 0
    assert "sft" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["llm", "dpo", "--help"])
    out = capsys.readouterr().out
    assert "reference.kind" in out and "loss.beta" in out
    assert cli.main(["llm", "nope"]) == 2
    assert cli.main(["llm", "dpo", "loss.nope=1"]) == 2
    assert "unknown config key 'loss.nope'" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "llm",
                "dpo",
                f"data.source={tmp_path / 'missing.jsonl'}",
                f"model.name_or_path={world['model']}",
                f"output_dir={tmp_path / 'o'}",
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "llm",
                "reward",
                f"model.name_or_path={world['model']}",
                f"data.source={world['rankings']}",
                "data.format=rankings",
                "optim.max_steps=2",
                "optim.batch_size=4",
                "tensorboard=false",
                f"output_dir={tmp_path / 'rm'}",
            ]
        )
        == 0
    )
    assert (tmp_path / "rm" / "final" / models.NORMALIZATION_FILE).is_file()


def test_gradient_accumulation_equals_the_larger_batch(world, tmp_path):
    # Two micro-batches of 8 pairs accumulated = one batch of 16 (the loss is a mean; accelerate divides
    # by 2).
    big = dpo_run(
        world, tmp_path / "big", "reference.kind=precomputed", "optim.batch_size=16", "optim.max_steps=3"
    )
    acc = dpo_run(
        world,
        tmp_path / "acc",
        "reference.kind=precomputed",
        "optim.batch_size=8",
        "optim.gradient_accumulation_steps=2",
        "optim.max_steps=3",
    )
    assert acc["steps"] == big["steps"] == 3
    losses = [[r["loss"] for r in common.read_metrics(tmp_path / d) if "loss" in r] for d in ("acc", "big")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    # Adam divides by the gradient's RMS, so float rounding in near-zero gradients shows up at ~lr * 1e-3.
    a, b = models.load_causal_lm(acc["final"]), models.load_causal_lm(big["final"])
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-4), name
