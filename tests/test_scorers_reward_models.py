"""The reward-model scorers: ImageReward against the reference package, OCR's formula, the VLM judge."""

from __future__ import annotations

import json
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

    assert {"imagereward", "ocr"} <= set(available())
