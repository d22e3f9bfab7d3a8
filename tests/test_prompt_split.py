"""Training prompts apart from evaluation prompts: the ``hpdv2-train`` set holds out the HPSv2 benchmark, the
example label configs draw from it while the evaluation configs use the benchmark, and evaluate says when its
prompts are captions of the training pairs it is given."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffusion_dpo import ASSETS
from diffusion_dpo.config import load_config
from diffusion_dpo.errors import InputError
from diffusion_dpo.evaluation.paired import EvaluateConfig, training_captions
from diffusion_dpo.evaluation.prompts import HPS_STYLES, Prompt, load_prompts, overlap_warning
from diffusion_dpo.recipes.label import LabelConfig

CONFIGS = ASSETS / "configs"


def _hpdv2_copy(root, train_prompts):
    """A local copy of the HPDv2 dataset's layout: train.json rows and benchmark/<style>.json."""
    (root / "benchmark").mkdir(parents=True)
    for style in HPS_STYLES:
        (root / "benchmark" / f"{style}.json").write_text(json.dumps([f"{style} benchmark {i}" for i in range(3)]))
    rows = [{"prompt": t, "image_path": ["a.jpg", "b.jpg"], "human_preference": [1, 0]} for t in train_prompts]
    (root / "train.json").write_text(json.dumps(rows))
    return root


def test_hpdv2_train_is_the_train_prompts_once_each_without_the_benchmark(tmp_path):
    root = _hpdv2_copy(tmp_path / "HPDv2", ["a fox", " a fox ", "photo benchmark 1", "a ship", "a fox"])
    prompts = load_prompts("hpdv2-train", prompts_dir=str(root))
    assert prompts == [Prompt("a fox", "hpdv2-train", 0), Prompt("a ship", "hpdv2-train", 1)]
    with pytest.raises(InputError, match="has no styles"):
        load_prompts("hpdv2-train:photo", prompts_dir=str(root))
    with pytest.raises(InputError, match="train.json and benchmark"):
        load_prompts("hpdv2-train", prompts_dir=str(tmp_path))
    (root / "train.json").write_text(json.dumps([{"prompt": "ok"}, {"caption": "no prompt key"}]))
    with pytest.raises(InputError, match="row 1 has no non-empty 'prompt'"):
        load_prompts("hpdv2-train", prompts_dir=str(root))


def _label_and_evaluate_configs():
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    labels = [n for n in names if " label --config" in (CONFIGS / f"{n}.yaml").read_text().split("\n")[0]]
    evaluations = [n for n in names if " evaluate --config" in (CONFIGS / f"{n}.yaml").read_text().split("\n")[0]]
    return labels, evaluations


def test_label_and_evaluate_configs_share_no_prompt(tmp_path):
    labels, evaluations = _label_and_evaluate_configs()
    assert len(labels) >= 4 and evaluations == ["evaluate"]
    train_prompts = ["a fox"] + [f"{style} benchmark 0" for style in HPS_STYLES] + ["a ship"]
    root = _hpdv2_copy(tmp_path / "HPDv2", train_prompts)
    evaluated = set()
    for name in evaluations:
        cfg = load_config(EvaluateConfig, [str(CONFIGS / f"{name}.yaml")])
        evaluated |= {p.text for p in load_prompts(cfg.prompts, prompts_dir=str(root / "benchmark"))}
    for name in labels:
        cfg = load_config(LabelConfig, [str(CONFIGS / f"{name}.yaml")])
        labelled = {p.text for p in load_prompts(cfg.prompts, prompts_dir=str(root))}
        assert labelled == {"a fox", "a ship"} and not labelled & evaluated, name


def test_evaluate_warns_when_its_prompts_are_training_captions(tmp_path):
    folder = tmp_path / "pairs" / "train"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"caption": ["a red fox ", "a ship", None], "jpg_0": [b"x"] * 3}),
                   folder / "train-00000.parquet")
    captions = training_captions(str(tmp_path / "pairs"))
    assert captions == {"a red fox", "a ship"}
    prompts = [Prompt("a red fox", "photo", 0), Prompt("a castle", "photo", 1), Prompt("a ship", "anime", 0)]
    line = overlap_warning(prompts, captions, "runs/pairs")
    assert line.startswith("warning: 2 of 3 evaluation prompts are captions of the 2 distinct training captions "
                           "in runs/pairs (e.g. 'a red fox'; 'a ship')") and "\n" not in line
    assert overlap_warning(prompts[1:2], captions, "runs/pairs") is None
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(InputError, match="caption column"):
        training_captions(str(tmp_path / "other.parquet"))
