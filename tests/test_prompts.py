import json

import pytest

from diffusion_dpo.errors import InputError
from diffusion_dpo.evaluation.prompts import HPS_STYLES, Prompt, load_prompts, styles_of, take_per_style


def _benchmark_folder(path, n=3):
    path.mkdir()
    for style in HPS_STYLES:
        (path / f"{style}.json").write_text(json.dumps([f"{style} prompt {i}" for i in range(n)]))
    return path


def test_builtin_offline_set_has_four_styles_of_our_own_prompts():
    prompts = load_prompts("hpsv2-offline")
    assert styles_of(prompts) == list(HPS_STYLES)
    for style in HPS_STYLES:
        texts = [p.text for p in prompts if p.style == style]
        assert len(texts) >= 25 and len(set(texts)) == len(texts)
        assert [p.index for p in prompts if p.style == style] == list(range(len(texts)))
    one = load_prompts("hpsv2-offline:concept-art")
    assert {p.style for p in one} == {"concept-art"}
    assert one == [p for p in prompts if p.style == "concept-art"]


def test_official_set_from_a_local_folder(tmp_path):
    folder = _benchmark_folder(tmp_path / "benchmark")
    prompts = load_prompts("hpsv2", prompts_dir=str(folder))
    assert len(prompts) == 12 and styles_of(prompts) == list(HPS_STYLES)
    assert load_prompts("hpsv2:photo", prompts_dir=str(folder)) == [
        Prompt("photo prompt 0", "photo", 0), Prompt("photo prompt 1", "photo", 1), Prompt("photo prompt 2", "photo", 2)
    ]
    # The folder itself is a spec too: every <style>.json in it is a style.
    assert load_prompts(str(folder)) == prompts
    assert load_prompts(f"{folder}:anime") == [p for p in prompts if p.style == "anime"]


def test_official_set_from_the_hub(tmp_path, monkeypatch):
    """The hub path asks huggingface_hub for benchmark/<style>.json of the dataset zhwang/HPDv2."""
    folder = _benchmark_folder(tmp_path / "cache", n=2)
    asked = []

    def fake_download(repo_id, filename, repo_type):
        asked.append((repo_id, filename, repo_type))
        return str(folder / filename.split("/")[1])

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    prompts = load_prompts("hpsv2:paintings")
    assert asked == [("zhwang/HPDv2", "benchmark/paintings.json", "dataset")]
    assert [p.text for p in prompts] == ["paintings prompt 0", "paintings prompt 1"]


def test_official_set_offline_points_to_the_ways_out(monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", unreachable)
    with pytest.raises(InputError, match="hpsv2-offline.*prompts_dir="):
        load_prompts("hpsv2")


def test_text_file_ignores_blank_lines(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("a red circle\n\n   \n  a blue square  \n")
    assert load_prompts(str(path)) == [Prompt("a red circle", "mine", 0), Prompt("a blue square", "mine", 1)]


def test_json_list(tmp_path):
    path = tmp_path / "photo.json"
    path.write_text(json.dumps(["a dog", "a cat"]))
    assert load_prompts(str(path)) == [Prompt("a dog", "photo", 0), Prompt("a cat", "photo", 1)]


def test_partiprompts_tsv_category_becomes_style(tmp_path):
    path = tmp_path / "parti.tsv"
    path.write_text(
        "Prompt\tCategory\tChallenge\tNote\n"
        "a bear in a field\tAnimals\tBasic\t\n"
        "a skyline at night\tWorld Knowledge\tSimple Detail\tx\n"
        "a fox jumping\tAnimals\tBasic\t\n"
    )
    prompts = load_prompts(str(path))
    assert prompts == [
        Prompt("a bear in a field", "Animals", 0),
        Prompt("a skyline at night", "World Knowledge", 0),
        Prompt("a fox jumping", "Animals", 1),
    ]
    assert load_prompts(f"{path}:Animals") == [prompts[0], prompts[2]]
    with pytest.raises(InputError, match="no style 'Vehicles'.*Animals, World Knowledge"):
        load_prompts(f"{path}:Vehicles")


def test_take_per_style_keeps_the_first_n_of_each_style():
    prompts = load_prompts("hpsv2-offline")
    few = take_per_style(prompts, 2)
    assert len(few) == 8 and [p.index for p in few] == [0, 1] * 4
    assert take_per_style(prompts, None) == prompts


@pytest.mark.parametrize("spec, message", [
    ("hpsv2-offline:sketch", "no style 'sketch'; styles: anime, concept-art, paintings, photo"),
    ("hpsv2:sketch", "no style 'sketch'; styles: anime, concept-art, paintings, photo"),
    ("laion-aesthetics", "neither a built-in set"),
    ("hpsv2-offline:", "no style after it"),
])
def test_unknown_set_or_style(spec, message):
    with pytest.raises(InputError, match=message):
        load_prompts(spec)


@pytest.mark.parametrize("name, content", [
    ("empty.txt", "\n\n  \n"), ("empty.json", "[]"), ("blank.json", ""), ("empty.tsv", ""),
])
def test_empty_file_names_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=f"{path}.*empty"):
        load_prompts(str(path))


def test_malformed_files(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps(["ok", 3]))
    with pytest.raises(InputError, match="item 1 is 3"):
        load_prompts(str(bad_json))
    bad_tsv = tmp_path / "bad.tsv"
    bad_tsv.write_text("Text\tCategory\nhello\tA\n")
    with pytest.raises(InputError, match="no 'Prompt' column"):
        load_prompts(str(bad_tsv))
    with pytest.raises(InputError, match="not a folder"):
        load_prompts("hpsv2", prompts_dir=str(tmp_path / "missing"))
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "photo.json").write_text('["a"]')
    with pytest.raises(InputError, match="no style 'anime'"):
        load_prompts("hpsv2", prompts_dir=str(incomplete))

