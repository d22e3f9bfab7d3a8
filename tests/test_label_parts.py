"""The label recipe's small pieces and the labeling components it composes: prompt sources, encodings,
model ids, schedulers, scorer options, relabelling (no generation)."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffusion_dpo.config import load_config
from diffusion_dpo.errors import InputError
from diffusion_dpo.labeling.records import encode
from diffusion_dpo.labeling.records import stored_bytes as _stored_bytes
from diffusion_dpo.labeling.relabel import original_labels as _original_labels
from diffusion_dpo.labeling.relabel import relabel_rows
from diffusion_dpo.labeling.scoring import scorer_options as _scorer_options
from diffusion_dpo.recipes.label import LabelConfig, load_prompt_list, model_id
from diffusion_dpo.sampling import set_scheduler


def cfg(*overrides):
    return load_config(LabelConfig, [], list(overrides))


def test_prompts_from_a_dataset_column_keep_first_appearance_once(tmp_path):
    """Captions of a pairs set repeat (one row per pair): each is kept once, in order of first appearance."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    pq.write_table(pa.table({"caption": ["a dog", "a cat", "a dog", " ", "a tree"]}), folder / "a.parquet")
    pq.write_table(pa.table({"caption": ["a cat", "a house"]}), folder / "b.parquet")
    texts, styles = load_prompt_list(cfg(f"prompts={folder}", "prompts_column=caption"))
    assert texts == ["a dog", "a cat", "a tree", "a house"] and styles == ["caption"] * 4
    texts, _ = load_prompt_list(cfg(f"prompts={folder}", "prompts_column=caption", "max_prompts=2"))
    assert texts == ["a dog", "a cat"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ["x y", "z"]) + "\n")
    assert load_prompt_list(cfg(f"prompts={jsonl}", "prompts_column=text"))[0] == ["x y", "z"]
    with pytest.raises(InputError, match="no column 'prompt'"):
        load_prompt_list(cfg(f"prompts={folder}", "prompts_column=prompt"))


def test_prompt_sets_and_files(tmp_path):
    texts, styles = load_prompt_list(cfg("prompts=hpsv2-offline:photo", "max_prompts=3"))
    assert len(texts) == 3 and styles == ["photo"] * 3
    f = tmp_path / "mine.txt"
    f.write_text("one\n\ntwo\n")
    assert load_prompt_list(cfg(f"prompts={f}")) == (["one", "two"], ["mine", "mine"])


def test_encodings_and_stored_bytes():
    image = Image.new("RGB", (8, 8), (10, 200, 30))
    png, jpeg = encode(image, "png"), encode(image, "jpeg")
    assert png.startswith(b"\x89PNG") and jpeg.startswith(b"\xff\xd8")
    assert Image.open(io.BytesIO(png)).getpixel((3, 3)) == (10, 200, 30)
    # a source cell keeps its own encoding; only a decoded PIL image is encoded (in image_format)
    assert _stored_bytes(jpeg, "png", "x") == jpeg
    assert _stored_bytes({"bytes": jpeg, "path": None}, "png", "x") == jpeg
    assert _stored_bytes(image, "png", "x") == png
    with pytest.raises(InputError, match="row 3"):
        _stored_bytes(42, "png", "row 3")


def test_model_id_and_scorer_options():
    assert model_id(cfg("model.pretrained=base")) == "base"
    assert model_id(cfg("model.pretrained=base", "model.lora=run/final")) == "base + lora=run/final"
    assert model_id(cfg("model.pretrained=base", "model.denoiser=ft/final")) == "base + denoiser=ft/final"
    # every process scores on its own device unless the user said otherwise
    assert _scorer_options("jpeg_compressibility", {}, "cuda:1") == {"device": "cuda:1"}
    assert _scorer_options("pickscore", {"device": "cpu"}, "cuda:1") == {"device": "cpu"}


def test_scheduler_swap(tmp_path):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    class Pipe:
        scheduler = DDIMScheduler()

    pipe = Pipe()
    set_scheduler(pipe, "EulerDiscreteScheduler")
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    with pytest.raises(InputError, match="not a diffusers scheduler"):
        set_scheduler(pipe, "UNet2DConditionModel")


def test_original_labels_are_checked():
    assert _original_labels({"label_0": 1, "label_1": 0}, "r") == (1.0, 0.0)
    assert _original_labels({"label_0": 0.5, "label_1": 0.5}, "r") == (0.5, 0.5)
    for bad in [(None, None), (0.7, 0.3), (True, False)]:
        with pytest.raises(InputError, match="row 9"):
            _original_labels({"label_0": bad[0], "label_1": bad[1]}, "row 9")


def test_relabel_rows_with_a_fake_scorer():
    """Scores are given by hand: pair 0 (3 vs 1) -> column 0 wins; pair 1 (2 vs 2.05) with min_margin 0.1 ->
    tie; the original labels 0/1 and 0/1 give one disagreement, one tie excluded -> agree 0 of 1."""
    import torch

    class Fixed:
        def score(self, images, prompts):
            assert prompts == ["a", "a", "b", "b"]
            return torch.tensor([3.0, 1.0, 2.0, 2.05])

    png = encode(Image.new("RGB", (4, 4)), "png")
    rows = [(10, {"caption": "a", "jpg_0": png, "jpg_1": png, "label_0": 0.0, "label_1": 1.0}),
            (11, {"caption": "b", "jpg_0": png, "jpg_1": png, "label_0": 0.0, "label_1": 1.0})]
    table, stats = relabel_rows(Fixed(), rows, "src", scorer_name="fixed", min_margin=0.1, image_format="png")
    out = table.to_pylist()
    assert [(r["label_0"], r["label_1"]) for r in out] == [(1.0, 0.0), (0.5, 0.5)]
    assert [r["source_index"] for r in out] == [10, 11] and out[0]["scorer"] == "fixed"
    assert out[0]["model_0"] is None
    assert stats == {"winner_score_sum": 3.0, "loser_score_sum": 1.0, "pairs": 2, "original_ties": 0,
                     "new_ties": 1, "compared": 1, "agree": 0}
