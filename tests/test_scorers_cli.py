"""``diffusion-dpo score``: scores printed per file, and agreement with the labels of a pairs dataset, checked
against JPEG sizes computed here independently (the JPEG scorers need no weights)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffusion_dpo.cli import main as cli_main
from diffusion_dpo.config import load_config
from diffusion_dpo.recipes.score import ScoreConfig, score_pairs
from diffusion_dpo.tiny import write_tiny_pairs


def _jpeg_kb(image: Image.Image) -> float:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=95)
    return len(buf.getvalue()) / 1000


def _write_images(folder) -> list[str]:
    rng = np.random.RandomState(0)
    paths = []
    for i, (w, h) in enumerate([(16, 16), (40, 24), (24, 40)]):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    path = folder / "flat.png"
    Image.new("RGBA", (32, 32), (10, 200, 30, 255)).save(path)
    return paths + [str(path)]


def test_cli_prints_path_tab_score(tmp_path, capsys):
    paths = _write_images(tmp_path)
    assert cli_main(["score", "scorer.name=jpeg_compressibility", "scorer.options.batch_size=2", *paths]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == paths
    for line, path in zip(lines, paths):
        assert float(line.split("\t")[1]) == pytest.approx(-_jpeg_kb(Image.open(path)), abs=5e-6)


def test_cli_errors_exit_2_with_message(tmp_path, capsys):
    paths = _write_images(tmp_path)
    assert cli_main(["score", "scorer.name=jpeg_compressibility", str(tmp_path / "missing.png")]) == 2
    assert "missing.png does not exist" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"no image here")
    assert cli_main(["score", "scorer.name=jpeg_compressibility", f"images=[{tmp_path / 'bad.png'}]"]) == 2
    assert "bad.png cannot be read as an image" in capsys.readouterr().err
    assert cli_main(["score", "scorer.name=jpeg_compressibility", "scorer.options=quality"] + paths) == 2
    assert "config key 'scorer.options': expected a mapping, got 'quality'" in capsys.readouterr().err
    assert cli_main(["score", "scorer.name=jpeg_compressibility"]) == 2
    assert "either image files" in capsys.readouterr().err
    assert cli_main(["score", "scorer.name=jpeg_compressibility", "prompts=[a, b]", *paths]) == 2
    assert "one prompt per image (4)" in capsys.readouterr().err
    assert cli_main(["score", "scorer.name=combo", "scorer.options.parts={jpeg_compressibility: 1, hpsv2: 1}",
                     "scorer.options.options={hpsv2: {checkpoint: /nonexistent.pt}}", *paths]) == 2
    assert "/nonexistent.pt (option checkpoint=) does not exist" in capsys.readouterr().err


def test_scorer_options_read_yaml_values():
    """Free-form scorer options follow the config rule for values without a declared type: YAML's reading
    (so ``weights=no`` is false; quote it, ``weights='no'``, for the text)."""
    options = [f"scorer.options.{o}" for o in ("batch_size=8", "model=ckpt/x",
                                               "parts={pickscore: 1.0, hpsv2.1: 0.5}", "dtype=bf16",
                                               "weights=no", "name='no'")]
    assert load_config(ScoreConfig, [], ["images=[a.png]", *options]).scorer.options == {
        "batch_size": 8, "model": "ckpt/x", "parts": {"pickscore": 1.0, "hpsv2.1": 0.5}, "dtype": "bf16",
        "weights": False, "name": "no"}


def test_images_from_config_file_and_arguments_and_output_file(tmp_path, capsys):
    """images from a YAML file come first, plain arguments after them; output= gets the printed lines."""
    paths = _write_images(tmp_path)
    config = tmp_path / "score.yaml"
    config.write_text(f"scorer:\n  name: jpeg_compressibility\nimages: [{paths[0]}]\n")
    out = tmp_path / "scores.tsv"
    assert cli_main(["score", "--config", str(config), f"output={out}", *paths[1:]]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    assert [line.split("\t")[0] for line in printed.splitlines()] == paths


def test_cli_pairs_agreement_matches_independent_count(tmp_path, capsys):
    """12 pairs, the last 3 ties. The expected agreement of jpeg_incompressibility with the labels is counted
    here from the parquet file: a pair agrees when the labelled winner has the larger JPEG."""
    folder = write_tiny_pairs(tmp_path / "pairs", n_pairs=12, n_ties=3, size=24, seed=4)
    table = pq.read_table(next(folder.glob("*.parquet"))).to_pylist()[:10]   # --limit 10: 9 decided, 1 tie
    agree = 0
    for row in table:
        if row["label_0"] == row["label_1"]:
            continue
        sizes = [_jpeg_kb(Image.open(io.BytesIO(row[c]))) for c in ("jpg_0", "jpg_1")]
        agree += (sizes[0] > sizes[1]) == (row["label_0"] > row["label_1"])
    command = ["score", "scorer.name=jpeg_incompressibility", f"data.source={folder}", "data.max_pairs=10"]
    assert cli_main(command) == 0
    out = capsys.readouterr().out
    assert "pairs: 10 (9 with a preference, 1 label ties excluded)" in out
    assert f"agreement: {100 * agree / 9:.2f}% ({agree} of 9;" in out

    from scorers import load_scorer

    summary = score_pairs(load_scorer("jpeg_incompressibility"), str(folder))
    assert (summary["pairs"], summary["ties"], summary["decided"]) == (12, 3, 9)
    assert summary["accuracy"] == pytest.approx(agree / 9)


@pytest.mark.parametrize("name", ["hpdv2", "open_image_preferences", "pickapic_v2_urls", "rapidata_700k"])
def test_shipped_data_configs_are_score_configs(name):
    """score.md says a public set mapped with a data config works: score's data section is train's."""
    cfg = load_config(ScoreConfig, [f"assets/configs/data/{name}.yaml"], [])
    assert cfg.data.source


def test_url_data_config_scores_a_local_file(tmp_path, capsys):
    """The Pick-a-Pic URL config's columns (image_0_url, image_1_url) on a local parquet file whose
    "URLs" are image paths: 4 pairs, the labelled winner the noisier (larger JPEG) image in 3."""
    import datasets

    rng = np.random.RandomState(0)
    rows = []
    for i, first_noisy in enumerate([True, True, True, False]):
        noisy, flat = tmp_path / f"noisy{i}.png", tmp_path / f"flat{i}.png"
        Image.fromarray(rng.randint(0, 256, (24, 24, 3), dtype=np.uint8)).save(noisy)
        Image.new("RGB", (24, 24), (10, 20, 30)).save(flat)
        rows.append({"caption": f"c{i}", "image_0_url": str(noisy), "image_1_url": str(flat),
                     "label_0": 1.0 if first_noisy else 0.0, "label_1": 0.0 if first_noisy else 1.0})
    (tmp_path / "p").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p" / "train-0.parquet"))
    command = ["score", "--config", "assets/configs/data/pickapic_v2_urls.yaml", "scorer.name=jpeg_incompressibility",
               f"data.source={tmp_path / 'p'}", f"data.image_cache_dir={tmp_path / 'cache'}"]
    assert cli_main(command) == 0
    out = capsys.readouterr().out
    assert "pairs: 4 (4 with a preference" in out and "agreement: 75.00% (3 of 4;" in out


def test_missing_weights_message_names_the_command_key(monkeypatch, tmp_path, capsys):
    """Offline, PickScore's processor is not cached: the message names scorer.options.processor, the key
    the command takes (the scorers library itself says processor=, its Python option)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    paths = _write_images(tmp_path)
    assert cli_main(["score", "scorer.name=pickscore", "scorer.options.processor=nobody-xyz/no-such-processor",
                     "prompt=x", *paths]) == 2
    err = capsys.readouterr().err
    assert "nobody-xyz/no-such-processor" in err and "with scorer.options.processor=PATH" in err
