"""The reward-model scorers: ImageReward and HPSv3 against the reference packages' scores on tiny models,
OCR's formula on hand-worked strings, the VLM judge's parsing and its run on a tiny Qwen2-VL."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from reward_fixtures import PROMPTS, TINY_MED_CONFIG, seeded_state, tiny_images, write_bert_vocab

from diffusion_dpo.errors import InputError
from scorers import load_scorer
from scorers.ocr import edit_distance, ocr_reward, quoted_text

DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------------------------------------- imagereward


def test_imagereward_equals_the_reference_package_on_a_tiny_model(tmp_path):
    # Scores made by the authors' image-reward 1.5 (scripts/imagereward_reference.py) on the same seeded
    # tiny ViT + BERT + head, images and prompts; the checkpoint uses the package's own tensor names.
    reference = json.loads((DATA / "imagereward_reference.json").read_text())
    torch.save(seeded_state(reference["shapes"]), tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(TINY_MED_CONFIG))
    scorer = load_scorer("imagereward", checkpoint=str(tmp_path / "ImageReward.pt"),
                         med_config=str(tmp_path / "med_config.json"), tokenizer=str(write_bert_vocab(tmp_path / "tok")),
                         vision_heads=4, device="cpu", batch_size=2)
    scores = scorer.score(tiny_images(), PROMPTS)
    torch.testing.assert_close(scores, torch.tensor(reference["scores"]), atol=1e-5, rtol=0)
    # The prompt matters (cross-attention reads the image per prompt): another prompt, another score.
    assert not torch.allclose(scorer.score(tiny_images()[:1], PROMPTS[1]), scores[:1])


def test_imagereward_rejects_a_checkpoint_of_another_model(tmp_path):
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(TINY_MED_CONFIG))
    with pytest.raises(InputError, match="blip.visual_encoder"):
        load_scorer("imagereward", checkpoint=str(tmp_path / "other.pt"), med_config=str(tmp_path / "med_config.json"),
                    device="cpu")


# ---------------------------------------------------------------------------------------------------- hpsv3


def test_hpsv3_equals_the_reference_package_on_a_tiny_model(tmp_path):
    # (mu, sigma) made by the authors' hpsv3 1.0.0 under transformers 4.45 (scripts/hpsv3_reference.py) on
    # the same seeded tiny Qwen2-VL + head, images (resized to 256 * 28 * 28 pixels) and prompts, in one
    # right-padded batch; here in chunks of 2 and 1, from a checkpoint in the package's tensor names.
    from reward_fixtures import write_tiny_qwen2_vl
    from safetensors.torch import save_file

    reference = json.loads((DATA / "hpsv3_reference.json").read_text())
    save_file(seeded_state(reference["shapes"]), str(tmp_path / "HPSv3.safetensors"))
    base = write_tiny_qwen2_vl(tmp_path / "base", max_pixels=256 * 28 * 28, with_model=False)
    scorer = load_scorer("hpsv3", checkpoint=str(tmp_path / "HPSv3.safetensors"), base=str(base), device="cpu",
                         batch_size=2)
    expected = torch.tensor(reference["mu_sigma"])
    torch.testing.assert_close(scorer.score(tiny_images(), PROMPTS), expected[:, 0], atol=1e-5, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(scorer.mu_sigma(tiny_images(), PROMPTS), expected, atol=1e-5, rtol=0)


def test_hpsv3_resizes_to_the_trained_area():
    from scorers.hpsv3 import PIXELS, target_size

    assert target_size(448, 448) == (448, 448)                    # 16 x 16 patches of 28: exactly 256 tokens
    assert target_size(1024, 1024) == (448, 448)
    assert target_size(512, 768) == (364, 532)  # scale 1/sqrt(393216 / 200704): 365.8 x 548.7, floored to 28s
    height, width = target_size(240, 320)
    assert height % 28 == width % 28 == 0 and abs(height * width - PIXELS) / PIXELS < 0.1
    with pytest.raises(InputError, match="elongated"):
        target_size(1, 400)


# ------------------------------------------------------------------------------------------------------ ocr


@pytest.mark.parametrize("a, b, distance", [
    ("", "", 0), ("abc", "", 3), ("", "abc", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
    ("hello", "hello", 0), ("hello", "helo", 1), ("abc", "cab", 2),
])
def test_edit_distance_on_hand_worked_pairs(a, b, distance):
    assert edit_distance(a, b) == distance == edit_distance(b, a)


def test_ocr_reward_follows_flow_grpo_on_hand_worked_strings():
    # Target 'Hello World' -> 'helloworld' (10 characters).
    assert ocr_reward("HELLO  WORLD", "Hello World") == 1.0                  # case and spaces ignored
    assert ocr_reward("Big sale: hello world today", "Hello World") == 1.0  # the target inside other text
    assert ocr_reward("helo world", "Hello World") == pytest.approx(0.9)    # one deletion: 1 - 1/10
    assert ocr_reward("jello wor1d", "Hello World") == pytest.approx(0.8)   # two substitutions
    assert ocr_reward("", "Hello World") == 0.0                              # nothing read: d = 10
    assert ocr_reward("x" * 40, "Hello World") == 0.0                        # d = 40, capped at 10
    assert quoted_text('a neon sign that says "Open Late" over a door') == "Open Late"
    with pytest.raises(InputError, match="double quotes"):
        quoted_text("a neon sign over a door")


def test_ocr_scorer_with_an_injected_recognizer():
    readings = {(255, 0, 0): "STOP", (0, 255, 0): "ST0P", (0, 0, 255): ""}
    images = [Image.new("RGB", (8, 8), colour) for colour in readings]
    scorer = load_scorer("ocr", recognizer=lambda image: readings[image.getpixel((0, 0))], device="cpu")
    scores = scorer.score(images, 'a road sign reading "stop"')
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.75, 0.0]))
    with pytest.raises(InputError, match="double quotes"):
        scorer.score(images[:1], "a road sign")


def test_ocr_without_easyocr_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_easyocr(name, *args, **kwargs):
        if name == "easyocr":
            raise ImportError("No module named 'easyocr'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_easyocr)
    with pytest.raises(InputError, match=r"pip install diffusion-dpo\[ocr\]"):
        load_scorer("ocr", device="cpu")


def test_registry_lists_the_reward_model_scorers():
    from scorers import available

    assert {"imagereward", "hpsv3", "ocr", "vlm_judge"} <= set(available())


# ----------------------------------------------------------------------------------------------- vlm_judge


@pytest.mark.parametrize("answer, score", [
    ("The fox is clear.\nScore: 7/10", 0.7), ("score = 9", 0.9), ("**Score:** 3 out of 5", 0.6),
    ("Final score: 10/10", 1.0), ("Score: 0/10", 0.0), ("Score: 4/10 at first, but on reflection Score: 6/10", 0.6),
    ("Score: 8.5", 0.85), ("I would rate it highly.", None), ("Score: 12/10", None), ("Score: -3", None),
])
def test_vlm_judge_parses_the_last_score_in_the_answer(answer, score):
    from scorers.vlm_judge import parse_score

    assert parse_score(answer) == (None if score is None else pytest.approx(score))


def test_vlm_judge_fills_the_template_and_handles_unparsed_answers(tmp_path):
    template = tmp_path / "rubric.txt"
    template.write_text("Does this image show {prompt}? Keep {braces} as written. Answer 'Score: N/4'.")
    seen = []

    def generate(images, rubrics):
        seen.extend(rubrics)
        return ["Score: 3/4" if image.getpixel((0, 0)) == (255, 0, 0) else "no idea" for image in images]

    images = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255), (255, 0, 0)]]
    judge = load_scorer("vlm_judge", template=str(template), generate=generate, on_unparsed="nan", device="cpu")
    scores = judge.score(images, ["a red square", "a blue square", "a red square"])
    assert scores[0] == scores[2] == 0.75 and math.isnan(scores[1]) and judge.unparsed == 1
    assert seen[1] == "Does this image show a blue square? Keep {braces} as written. Answer 'Score: N/4'."
    strict = load_scorer("vlm_judge", template=str(template), generate=generate, device="cpu")
    with pytest.raises(InputError, match="no idea"):
        strict.score(images[1:2], "a blue square")
    template.write_text("Rate the image from 0 to 10.")
    with pytest.raises(InputError, match=r"\{prompt\}"):
        load_scorer("vlm_judge", template=str(template), generate=generate, device="cpu")


def test_vlm_judge_runs_a_tiny_qwen2_vl_and_batches_like_one_at_a_time(tmp_path):
    from reward_fixtures import write_tiny_qwen2_vl

    folder = write_tiny_qwen2_vl(tmp_path / "qwen")
    prompts = ["a red fox", "a small blue cat sitting on the table", "grass"]
    last_answers = {}
    for batch_size in (3, 1):
        judge = load_scorer("vlm_judge", model=str(folder), on_unparsed="nan", max_new_tokens=6, device="cpu",
                            batch_size=batch_size)
        scores = judge.score(tiny_images(), prompts)
        # A random model writes random words: no score, every answer counted as unparsed.
        assert torch.isnan(scores).all() and judge.unparsed == 3
        last_answers[batch_size] = judge.last_answers  # the answers of the last chunk
    assert len(last_answers[3]) == 3 and all(isinstance(a, str) and a for a in last_answers[3])
    # The short last prompt, padded on the left in a chunk of 3, is answered as when it is alone.
    assert last_answers[3][-1] == last_answers[1][0]


def test_an_old_transformers_names_the_extra(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.45.2")
    with pytest.raises(InputError, match=r"pip install diffusion-dpo\[hpsv3\]"):
        load_scorer("hpsv3", checkpoint="unused.safetensors", device="cpu")
    with pytest.raises(InputError, match=r"pip install diffusion-dpo\[vlm\]"):
        load_scorer("vlm_judge", model="unused", device="cpu")
