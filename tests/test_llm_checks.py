"""Rewards and pairs checked in the LLM paths: a reward is one finite number per response (never broadcast,
never NaN), a causal LM without a trained score head is no reward model, and pairs that cannot teach a
preference (chosen equal to rejected, an empty side) are counted bad rows. Through ``diffusion_dpo.cli.main``."""

import json

import pytest

from diffusion_dpo import cli
from diffusion_dpo.llm import models
from diffusion_dpo.llm import tiny as llm_tiny
from diffusion_dpo.llm.data import tokenize_pairs, tokenize_rankings


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    return {"model": str(llm_tiny.build_tiny_lm(root / "model")),
            "prompts": str(llm_tiny.write_rows(root / "prompts.jsonl", llm_tiny.prompt_rows(16)))}


def ppo(capsys, world, out, *overrides: str) -> tuple[int, str]:
    code = cli.main(["llm", "ppo", f"model.name_or_path={world['model']}", f"data.source={world['prompts']}",
                     f"output_dir={out}", "tensorboard=false", "rollout.batch_size=4", "rollout.max_new_tokens=3",
                     "optim.batch_size=4", "ppo.iterations=2", "ppo.epochs=1", *overrides])
    return code, capsys.readouterr().err


def rule(tmp_path, body: str) -> str:
    path = tmp_path / "rule.py"
    path.write_text(f"def reward(prompts, responses):\n    return {body}\n")
    return f"reward.function={path}:reward"


@pytest.mark.parametrize("body, words", [
    ("[1.0]", ["returned 1 value(s)", "for 4 responses", "expected one number per response"]),
    ("1.0", ["returned 1 value(s) of shape ()", "for 4 responses"]),
    ("[0.0, 1.0, float('nan'), 2.0]", ["returned nan for response 2", "expected a finite number"]),
    ("[0.0, float('inf'), 1.0, 2.0]", ["returned inf for response 1"]),
    ("['good'] * len(responses)", ["returned ['good'", "expected one number per response"]),
])
def test_a_reward_function_must_give_one_finite_number_per_response(tmp_path, capsys, world, body, words):
    code, err = ppo(capsys, world, tmp_path / "out", rule(tmp_path, body))
    assert code == 2, err
    assert "Traceback" not in err
    for word in ["reward.function", "at iteration 1", *words]:
        assert word in err, (word, err)


def test_a_reward_function_file_that_is_not_utf8_names_the_file_and_line(tmp_path, capsys, world):
    path = tmp_path / "rule.py"
    path.write_bytes(b"def reward(prompts, responses):\n    return [0.0] * len('caf\xe9')\n")
    code, err = ppo(capsys, world, tmp_path / "out", f"reward.function={path}:reward")
    assert code == 2 and "Traceback" not in err, err
    assert f"reward.function: {path}, line 2: not valid Python" in err and "utf-8" in err, err


def test_a_causal_lm_given_as_reward_model_is_refused(tmp_path, capsys, world):
    code, err = ppo(capsys, world, tmp_path / "out", f"reward.model={world['model']}")
    assert code == 2, err
    for word in [f"reward.model={world['model']} is not a reward model", "score.weight",
                 "diffusion-dpo llm reward"]:
        assert word in err, (word, err)


def test_a_causal_lm_adapter_given_as_reward_model_is_refused(tmp_path, world):
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    lm = models.load_causal_lm(world["model"])
    get_peft_model(lm, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(adapter)
    from diffusion_dpo.errors import InputError

    with pytest.raises(InputError, match="is not a reward model.*CAUSAL_LM"):
        models.load_score_model(str(adapter), 0, option="reward.model", trained_head=True)


def test_a_trained_reward_model_is_accepted(tmp_path, world):
    tok = models.load_tokenizer(world["model"])
    rm, _ = models.load_score_model(world["model"], tok.pad_token_id)
    rm.save_pretrained(tmp_path / "rm")
    model, bias = models.load_score_model(str(tmp_path / "rm"), tok.pad_token_id, trained_head=True)
    assert bias == 0.0 and model.config.num_labels == 1


def pair_rows() -> list[dict]:
    good = [{"prompt": f"q{i}", "chosen": "good good answer", "rejected": "bad answer"} for i in range(6)]
    return [*good[:2], {"prompt": "q", "chosen": "same answer", "rejected": "same answer"},
            *good[2:4], {"prompt": "q", "chosen": "  ", "rejected": "bad answer"},
            {"prompt": "q", "chosen": "good answer", "rejected": ""}, *good[4:]]


def test_llm_dpo_counts_identical_and_empty_pairs_as_bad_rows(tmp_path, capsys, world):
    rows = llm_tiny.write_rows(tmp_path / "pairs.jsonl", pair_rows())
    out = tmp_path / "dpo"
    code = cli.main(["llm", "dpo", f"model.name_or_path={world['model']}", f"data.source={rows}",
                     f"output_dir={out}", "tensorboard=false", "optim.max_steps=1", "optim.batch_size=2",
                     "data.eval_fraction=0", "reference.kind=none"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert (f"9 rows: 6 kept, 0 truncated to fit, 0 dropped (prompt fills max_length), bad rows: "
            f"2 empty_response, 1 identical_pair (first: {rows}[train], row 2: column 'chosen' and column "
            "'rejected' are the same)") in printed.out
    stats = json.loads((out / "data_stats.json").read_text())["train"]
    assert stats["kept"] == 6 and stats["bad_rows"] == {"identical_pair": 1, "empty_response": 2}


def test_reward_pairs_and_rankings_count_the_same_bad_rows(world):
    tok = models.load_tokenizer(world["model"])
    examples, stats = tokenize_pairs(pair_rows(), tok, max_length=64, source="pairs")
    assert len(examples) == 6 and stats.bad_rows == {"identical_pair": 1, "empty_response": 2}
    rankings = [{"prompt": "q", "responses": ["a b", "b", "c"]}, {"prompt": "q", "responses": ["a", "b", "a"]},
                {"prompt": "q", "responses": ["a", "", "c"]}]
    examples, stats = tokenize_rankings(rankings, tok, max_length=64, source="ranks")
    assert len(examples) == 1 and stats.kept == 1
    assert stats.first_bad == "ranks, row 1: response 0 and response 2 are the same"
    assert stats.bad_rows == {"identical_pair": 1, "empty_response": 1}
