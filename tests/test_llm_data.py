"""Rows -> token ids: prompt/completion separation, EOS, chat templates, implicit prompts, truncation counts,
reading local files, and clear errors."""

import json

import pytest
import torch

from diffusion_dpo.errors import InputError
from diffusion_dpo.llm import collate, data, models, tiny


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tiny.write_word_tokenizer(path, tiny.WORDS + ["<sep>"])
    return models.load_tokenizer(str(path))


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_plain_pair_keeps_prompt_and_completions_apart_with_eos(tok):
    rows = [{"prompt": "red cat", "chosen": "good dog", "rejected": "bad dog"}]
    (ex,), stats = data.tokenize_pairs(rows, tok, max_length=32)
    assert ex["prompt"] == ids(tok, "red cat")
    assert ex["chosen"] == ids(tok, "good dog") + [tok.eos_token_id]
    assert ex["rejected"] == ids(tok, "bad dog") + [tok.eos_token_id]
    assert stats.as_dict() == {"rows": 1, "kept": 1, "truncated": 0, "dropped": 0}


def test_conversation_pair_rendered_with_the_chat_template(tok):
    rows = tiny.preference_rows(1, seed=3, conversational=True)
    (ex,), _ = data.tokenize_pairs(rows, tok, max_length=64)
    user, chosen = rows[0]["prompt"][0]["content"], rows[0]["chosen"][0]["content"]
    assert ex["prompt"] == ids(tok, f"user: {user} assistant:")
    assert ex["chosen"] == ids(tok, chosen) + [tok.eos_token_id]
    # prompt + completion ids are the rendered conversation (plus the EOS that ends the completion)
    full = tok.apply_chat_template(rows[0]["prompt"] + rows[0]["chosen"], tokenize=False)
    assert ex["prompt"] + ex["chosen"] == ids(tok, full) + [tok.eos_token_id]
    # a plain-text completion under a conversation prompt becomes the assistant's message
    (ex2,), _ = data.tokenize_pairs([{**rows[0], "chosen": chosen}], tok, max_length=64)
    assert ex2 == ex


def test_template_that_closes_turns_with_eos_keeps_exactly_one(tmp_path):
    # Like Qwen's "<|im_end|>\n": the template ends an assistant turn with EOS and a separator.
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token + ' <sep> ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tiny.write_word_tokenizer(tmp_path, tiny.WORDS + ["<sep>"], chat_template=template)
    tok = models.load_tokenizer(str(tmp_path))
    enc = data.Encoder(tok)
    prompt = [{"role": "user", "content": "red"}]
    out = enc.completion(prompt, [{"role": "assistant", "content": "good dog"}])
    assert out == ids(tok, "good dog") + [tok.eos_token_id]


def test_implicit_prompt_from_whole_conversations(tok):
    user = [{"role": "user", "content": "red cat"}]
    row = {
        "chosen": user + [{"role": "assistant", "content": "good"}],
        "rejected": user + [{"role": "assistant", "content": "bad"}],
    }
    (ex,), _ = data.tokenize_pairs([row], tok, max_length=32)
    assert ex["prompt"] == ids(tok, "user: red cat assistant:")
    assert ex["chosen"] == ids(tok, "good") + [tok.eos_token_id]
    # A prompt column given as text next to whole conversations (HuggingFaceH4 layout) changes nothing.
    (ex2,), _ = data.tokenize_pairs([{**row, "prompt": "red cat"}], tok, max_length=32)
    assert ex2 == ex


def test_implicit_prompt_from_texts_splits_at_a_word_boundary():
    p, c, r = data.implicit_prompt("Human: hi Assistant: I think so", "Human: hi Assistant: I don't")
    assert (p, c, r) == ("Human: hi Assistant: I", " think so", " don't")
    p, c, r = data.implicit_prompt("Human: hi Assistant: Sure", "Human: hi Assistant: No")
    assert (p, c, r) == ("Human: hi Assistant:", " Sure", " No")
    p, c, r = data.implicit_prompt("Q: thi is", "Q: this is")
    assert (p, c, r) == ("Q:", " thi is", " this is")


def test_truncation_keeps_starts_and_counts(tok):
    rows = [
        {"prompt": "red cat", "chosen": "good dog", "rejected": "bad"},  # 2 + 3 tokens: fits in 6
        {"prompt": "red cat", "chosen": "good dog sun tree", "rejected": "bad"},  # chosen 5 > 4 left: cut
        {
            "prompt": "red cat dog fish sun tree",
            "chosen": "good",
            "rejected": "bad",
        },  # prompt fills 6: dropped
        {"prompt": "red cat dog fish sun", "chosen": "good", "rejected": "bad"},  # 1 token left: both cut
    ]
    out, stats = data.tokenize_pairs(rows, tok, max_length=6)
    assert stats.as_dict() == {"rows": 4, "kept": 3, "truncated": 2, "dropped": 1}
    assert "3 kept, 2 truncated to fit, 1 dropped" in stats.describe()
    assert out[0]["chosen"] == ids(tok, "good dog") + [tok.eos_token_id]
    assert out[1]["chosen"] == ids(tok, "good dog sun tree")  # the start is kept, the EOS was cut
    assert out[2]["chosen"] == ids(tok, "good") and out[2]["rejected"] == ids(tok, "bad")
    # With a prompt limit of 4 the long prompts keep their first 4 tokens (side "right") instead of being dropped.
    out, stats = data.tokenize_pairs(rows, tok, max_length=8, max_prompt_length=4, prompt_truncation="right")
    assert stats.as_dict() == {"rows": 4, "kept": 4, "truncated": 2, "dropped": 0}
    assert out[2]["prompt"] == ids(tok, "red cat dog fish")
    assert out[1]["chosen"] == ids(tok, "good dog sun tree") + [tok.eos_token_id]
    assert all(len(e["prompt"]) + len(e["chosen"]) <= 8 for e in out)


def test_fit_directly():
    assert data.fit([1, 2, 3], [[4, 5], [6]], max_length=4) == ([1, 2, 3], [[4], [6]], True)
    assert data.fit([1, 2, 3, 4], [[5]], max_length=4) is None
    assert data.fit([1, 2, 3, 4], [[5]], max_length=4, max_prompt_length=2, prompt_truncation="right") == (
        [1, 2], [[5]], True
    )
    # The default side drops the oldest prompt tokens.
    assert data.fit([1, 2, 3, 4], [[5]], max_length=4, max_prompt_length=2) == ([3, 4], [[5]], True)
    with pytest.raises(InputError, match="'left' or 'right', got 'start'"):
        data.fit([1, 2, 3, 4], [[5]], max_length=4, max_prompt_length=2, prompt_truncation="start")


def test_rankings_demos_and_prompts(tok):
    (ex,), _ = data.tokenize_rankings(tiny.ranking_rows(1, k=4), tok, max_length=32)
    assert len(ex["responses"]) == 4 and all(r[-1] == tok.eos_token_id for r in ex["responses"])
    assert ex["responses"][0].count(tok.convert_tokens_to_ids("good")) == 3
    with pytest.raises(InputError, match="row 0.*at least 2"):
        data.tokenize_rankings([{"prompt": "red", "responses": ["good"]}], tok, max_length=32)
    msgs = [{"role": "user", "content": "red"}, {"role": "assistant", "content": "good dog"}]
    (demo,), _ = data.tokenize_demos([{"messages": msgs}], tok, max_length=32)
    assert demo["prompt"] == ids(tok, "user: red assistant:")
    assert demo["completion"] == ids(tok, "good dog") + [tok.eos_token_id]
    (demo2,), _ = data.tokenize_demos([{"prompt": "red", "completion": "good dog"}], tok, max_length=32)
    assert demo2["completion"] == demo["completion"]
    prompts, stats = data.tokenize_prompts(
        [{"prompt": "red cat dog"}, {"chosen": "red good", "rejected": "red bad"}], tok, max_prompt_length=2,
        prompt_truncation="right",
    )
    assert [p["prompt"] for p in prompts] == [ids(tok, "red cat"), ids(tok, "red")]
    assert stats.truncated == 1


def test_reading_local_files(tmp_path):
    rows = tiny.preference_rows(5)
    tiny.write_rows(tmp_path / "folder" / "train" / "a.parquet", rows[:3])
    tiny.write_rows(tmp_path / "folder" / "train" / "b.jsonl", rows[3:])
    tiny.write_rows(tmp_path / "folder" / "test" / "c.jsonl", rows[:1])
    assert list(data.read_rows(str(tmp_path / "folder"))) == rows
    assert list(data.read_rows(str(tmp_path / "folder"), "test")) == rows[:1]
    assert list(data.read_rows(str(tmp_path / "folder"), max_rows=2)) == rows[:2]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    assert list(data.read_rows(str(tmp_path / "list.json"))) == rows
    flat = tmp_path / "flat"
    tiny.write_rows(flat / "x.jsonl", rows)
    assert list(data.read_rows(str(flat))) == rows
    with pytest.raises(InputError, match="no subfolder 'test'"):
        list(data.read_rows(str(flat), "test"))
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(InputError, match="bad.jsonl, line 2"):
        list(data.read_rows(str(tmp_path / "bad.jsonl")))
    with pytest.raises(InputError, match="does not exist"):
        data.read_rows(str(tmp_path / "missing.jsonl"))


def test_bad_rows_name_row_and_column(tok):
    with pytest.raises(InputError, match="row 1: missing column 'rejected'"):
        data.tokenize_pairs(
            [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}],
            tok,
            max_length=8,
        )
    with pytest.raises(InputError, match="row 0, completion 0: expected a string"):
        data.tokenize_pairs([{"prompt": "a", "chosen": 3, "rejected": "c"}], tok, max_length=8)
    with pytest.raises(InputError, match="'margin' must be a number"):
        data.tokenize_pairs(
            [{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "x"}],
            tok,
            max_length=8,
            margin_column="margin",
        )


def test_holdout_is_seeded_and_disjoint():
    examples = [{"i": i} for i in range(20)]
    train, held = data.holdout(examples, 0.25, seed=1)
    assert len(held) == 5 and len(train) == 15
    assert {e["i"] for e in train} | {e["i"] for e in held} == set(range(20))
    assert data.holdout(examples, 0.25, seed=1)[1] == held
    assert data.holdout(examples, 0.0, seed=1) == (examples, [])


def test_collators():
    pairs = [{"prompt": [5, 6], "chosen": [7, 1], "rejected": [8, 9, 1], "margin": 0.5}]
    batch = collate.PairCollator(pad_id=0)(pairs)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 0], [5, 6, 8, 9, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert batch["margin"].tolist() == [0.5]
    ranks = collate.RankingCollator(pad_id=0)(
        [
            {"prompt": [5], "responses": [[7, 1], [8, 1], [9, 1]]},
            {"prompt": [6], "responses": [[7, 1], [8, 1]]},
        ]
    )
    assert ranks["input_ids"].shape == (5, 3) and ranks["num_responses"].tolist() == [3, 2]
    left = collate.PromptCollator(pad_id=0)([{"prompt": [5, 6, 7]}, {"prompt": [8]}])
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert torch.equal(collate.pad([[1], [2, 3]], 0)[0], torch.tensor([[1, 0], [2, 3]]))


def test_long_chat_prompt_keeps_its_latest_turns_and_generation_header(tok):
    turns = ["red cat", "good dog", "blue fish", "good sun", "green tree"]
    prompt = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    row = {"prompt": prompt, "chosen": "good", "rejected": "bad"}
    full = ids(tok, "user: red cat assistant: good dog user: blue fish assistant: good sun user: green tree "
                    "assistant:")
    header = ids(tok, "assistant:")
    assert len(full) == 16 and len(header) == 1
    (ex,), stats = data.tokenize_pairs([row], tok, max_length=32, max_prompt_length=4)
    # 4 tokens kept from the end: the last user turn and the header the model answers after.
    assert ex["prompt"] == full[-4:] == ids(tok, "user: green tree assistant:")
    assert ex["prompt"][-len(header):] == header and stats.truncated == 1
    (old,), _ = data.tokenize_pairs([row], tok, max_length=32, max_prompt_length=5, prompt_truncation="right")
    assert old["prompt"] == full[:5] and old["prompt"][-1:] != header  # the start kept: no header at the end
    (demo,), _ = data.tokenize_demos([{"messages": prompt + [{"role": "assistant", "content": "good"}]}],
                                     tok, max_length=32, max_prompt_length=3)
    assert demo["prompt"] == ids(tok, "green tree assistant:")
    (ranked,), _ = data.tokenize_rankings([{"prompt": prompt, "responses": ["good", "bad"]}], tok,
                                          max_length=32, max_prompt_length=5)
    assert ranked["prompt"] == full[-5:] == ids(tok, "sun user: green tree assistant:")
    (rollout,), _ = data.tokenize_prompts([{"prompt": prompt}], tok, max_prompt_length=2)
    assert rollout["prompt"] == ids(tok, "tree assistant:")


def test_prompt_truncation_is_a_data_key_defaulting_to_the_end():
    from diffusion_dpo.config import ConfigError, load_config
    from diffusion_dpo.llm.common import DataSection

    assert DataSection().prompt_truncation == "left"
    assert load_config(DataSection, [], ["prompt_truncation=right"]).prompt_truncation == "right"
    with pytest.raises(ConfigError, match="'prompt_truncation'"):
        load_config(DataSection, [], ["prompt_truncation=start"])
