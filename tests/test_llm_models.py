"""Sequence log-probs against an independent per-token computation, the concatenated forward pass, DPO at
policy == reference, reward/value scorers and model loading (LoRA adapter folders, normalisation bias)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_dpo.config import load_config
from diffusion_dpo.llm import collate, data, models, tiny
from diffusion_dpo.llm.logprobs import forward_logps, position_ids, sequence_logps
from diffusion_dpo.recipes import llm_dpo as dpo
from diffusion_dpo.reference import FrozenCopy


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tmp_path_factory):
    path = tiny.build_tiny_lm(tmp_path_factory.mktemp(request.param), arch=request.param, seed=1)
    tok = models.load_tokenizer(str(path))
    model = models.load_causal_lm(str(path)).eval()
    models.disable_dropout(model)
    return path, tok, model


@pytest.fixture(scope="module")
def batch(lm):
    _, tok, _ = lm
    examples, _ = data.tokenize_pairs(tiny.preference_rows(3, seed=2), tok, max_length=32)
    return examples, collate.PairCollator(tok.pad_token_id)(examples)


def test_sequence_logps_equal_independent_sum_over_completion_tokens(lm, batch):
    _, _, model = lm
    examples, b = batch
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    logps, lengths = sequence_logps(logits, b["input_ids"], b["completion_mask"])
    seqs = [(e["prompt"], e["chosen"]) for e in examples] + [(e["prompt"], e["rejected"]) for e in examples]
    for i, (prompt, completion) in enumerate(seqs):
        # Independently: each sequence alone (no padding), log softmax at the position before each token.
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            alone = model(input_ids=ids).logits[0]
        expected = sum(
            float(F.log_softmax(alone[t - 1], -1)[ids[0, t]])
            for t in range(len(prompt), len(prompt) + len(completion))
        )
        assert logps[i].item() == pytest.approx(expected, abs=1e-4)
        assert lengths[i].item() == len(completion)
    # The prompt does not count: changing what the model predicts on prompt positions changes nothing.
    mangled = logits.clone()
    first = int(b["completion_mask"][0].argmax())
    mangled[0, : first - 1] = torch.randn_like(mangled[0, : first - 1])
    mangled[0, b["attention_mask"][0].sum() :] = 0.0  # nor does padding
    assert sequence_logps(mangled, b["input_ids"], b["completion_mask"])[0][0] == pytest.approx(
        logps[0].item()
    )


def test_concatenated_forward_equals_separate_forwards(lm, batch):
    _, tok, model = lm
    examples, b = batch
    with torch.no_grad():
        both, _ = forward_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"])
        chosen = collate.collate_completions(
            [e["prompt"] for e in examples], [e["chosen"] for e in examples], tok.pad_token_id
        )
        alone, _ = forward_logps(
            model, chosen["input_ids"], chosen["attention_mask"], chosen["completion_mask"]
        )
    assert torch.allclose(both[: len(examples)], alone, atol=1e-5)


def test_dpo_loss_is_ln2_when_policy_equals_reference(lm, batch):
    path, _, model = lm
    _, b = batch
    for loss_type, expected in (("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", (1 / (2 * 0.1)) ** 2)):
        cfg = load_config(dpo.DPOConfig, [], [f"model.name_or_path={path}", f"loss.loss_type={loss_type}"])
        with torch.no_grad():
            losses, metrics = dpo.dpo_batch(model, b, cfg, reference=FrozenCopy.of(model))
        assert torch.allclose(losses, torch.full_like(losses, expected), atol=1e-5)
        assert float(metrics["rewards/margins"].abs().max()) < 1e-5
        assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                                "logps/chosen", "logps/rejected"}


def test_token_scorer_reads_the_last_real_token(lm, batch):
    path, tok, _ = lm
    _, b = batch
    model, bias = models.load_score_model(str(path), tok.pad_token_id)
    model.eval()
    assert bias == 0.0
    scorer = models.TokenScorer(model)
    with torch.no_grad():
        ours = models.last_token(scorer(b["input_ids"], b["attention_mask"]), b["attention_mask"])
        # pad (0) differs from EOS (1) here, so transformers' own pooling finds the same token
        theirs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, 0]
        # left padding with position ids gives the same rewards
        rows = [r[m.bool()].tolist() for r, m in zip(b["input_ids"], b["attention_mask"])]
        ids, mask = collate.pad(rows, tok.pad_token_id, side="left")
        left = models.last_token(scorer(ids, mask, position_ids(mask)), mask)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(ours, left, atol=1e-4)
    assert models.last_token(
        torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), torch.tensor([[1, 1, 0], [0, 1, 1]])
    ).tolist() == [2.0, 6.0]


def test_policy_with_value_head(lm, batch):
    _, _, model = lm
    _, b = batch
    wrapped = models.PolicyWithValueHead(model, value_head=True)
    logits, values = wrapped(b["input_ids"], b["attention_mask"])
    with torch.no_grad():
        assert torch.allclose(
            logits, model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        )
    assert (
        values.shape == b["input_ids"].shape and float(values.detach().abs().max()) == 0.0
    )  # zero-init head
    values.sum().backward()
    assert wrapped.value_head.weight.grad is not None and wrapped.value_head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    assert models.PolicyWithValueHead(model, value_head=False)(b["input_ids"], b["attention_mask"])[1] is None


def test_lora_adapter_folder_loads_merged_and_normalisation_bias(tmp_path):
    path = tiny.build_tiny_lm(tmp_path / "base", seed=4)
    base = models.load_causal_lm(str(path))
    cfg = models.LoraSection(enabled=True, r=2)
    peft_model = models.add_lora(base, cfg, "CAUSAL_LM")
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained-looking adapter
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        merged = models.load_causal_lm(str(tmp_path / "adapter"))
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)
        with peft_model.disable_adapter():
            assert not torch.allclose(peft_model(input_ids=ids).logits, expected, atol=1e-3)
    rm_dir = tmp_path / "rm"
    model, _ = models.load_score_model(str(path), pad_token_id=0)
    model.save_pretrained(rm_dir)
    (rm_dir / models.NORMALIZATION_FILE).write_text(json.dumps({"bias": -1.5}))
    assert models.load_score_model(str(rm_dir), pad_token_id=0)[1] == -1.5
    with pytest.raises(Exception, match="cannot load"):
        models.load_causal_lm(str(tmp_path / "nothing-here"))
