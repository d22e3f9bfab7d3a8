"""GenEval's rules (scorers/geneval.py) on images the test draws, with a detector stand-in returning the drawn
boxes; ``evaluate prompts=geneval`` on a tiny pipeline; the shapes world as an offline GenEval."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from diffusion_dpo.config import load_config
from diffusion_dpo.errors import InputError
from diffusion_dpo.evaluation.prompts import load_prompts, styles_of
from scorers import load_scorer
from scorers.geneval import (
    COUNTING_THRESHOLD,
    PALETTE,
    TASKS,
    Detection,
    box_iou,
    judge,
    keep_detections,
    load_metadata,
    palette_colours,
    relative_position,
)
from scorers.shapes.geneval import SHAPE_TASKS, ShapesGenEval, check, detect
from scorers.shapes.world import Scene, all_scenes, render


def drawing(objects, size=128):
    """An image with each (label, colour, box, score) drawn as a filled box, and the stand-in detector that
    'finds' exactly those boxes in it."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for _, colour, box, _ in objects:
        draw.rectangle(box, fill=PALETTE[colour])
    found = [Detection(label, score, tuple(float(v) for v in box)) for label, _, box, score in objects]
    return image, (lambda img: found)


def verdict(objects, metadata):
    image, detector = drawing(objects)
    return judge(image, keep_detections(detector(image), metadata["tag"]), metadata, palette_colours)[0]


def test_geometry_by_hand():
    # Sides 10 px inclusive: overlap 5 x 10 = 50 px, union 150.
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0
    # Centres 20 px apart, sides 10 + 10: the 0.1 margin takes 2 px off, 18 / 20 = 0.9 > 0.5.
    assert relative_position((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    assert relative_position((20, 0, 30, 10), (0, 0, 10, 10)) == {"right of"}
    assert relative_position((0, 30, 10, 40), (0, 0, 10, 10)) == {"below"}
    # 1 px apart against a 2 px margin: no relation at all.
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()
    # Diagonal (10, 10) - margin 2 each: 8 / 14.14 = 0.57 on both axes.
    assert relative_position((10, 10, 20, 20), (0, 0, 10, 10)) == {"right of", "below"}
    # Diagonal but mostly sideways: dy = (3 - 2) / 20.2 is below 0.5.
    assert relative_position((20, 3, 30, 13), (0, 0, 10, 10)) == {"right of"}


def test_thresholds_and_overlap():
    found = [("cat", 0.95, (0, 0, 9, 9)), ("cat", 0.5, (2, 0, 11, 9)), ("cat", 0.2, (50, 50, 60, 60)),
             ("dog", 0.31, (0, 0, 5, 5))]
    kept = keep_detections(found, "two_object")
    assert [d.score for d in kept["cat"]] == [0.95, 0.5] and "dog" in kept  # 0.2 < 0.3 is dropped
    counting = keep_detections(found, "counting")
    assert [d.score for d in counting["cat"]] == [0.95] and "dog" not in counting  # 0.9 for counting
    assert COUNTING_THRESHOLD == 0.9
    # IoU of the two cats is 8 x 10 / 120 = 0.67: dropped at max_overlap 0.5, kept at 0.7.
    assert len(keep_detections(found, "two_object", max_overlap=0.5)["cat"]) == 1
    assert len(keep_detections(found, "two_object", max_overlap=0.7)["cat"]) == 2
    assert len(keep_detections([("cat", 0.9, (i, i, i + 1, i + 1)) for i in range(20)], "x")["cat"]) == 16


def test_the_six_tasks_on_drawn_images():
    meta = load_metadata()
    clocks = meta["a photo of two clocks"]
    assert clocks["tag"] == "counting"
    two = [("clock", "white", (5, 5, 30, 30), 0.95), ("clock", "white", (60, 60, 90, 90), 0.95)]
    assert verdict(two, clocks)
    assert not verdict(two[:1], clocks)  # one clock
    assert not verdict(two + [("clock", "white", (100, 5, 120, 20), 0.95)], clocks)  # three: excluded
    assert verdict(two + [("clock", "white", (100, 5, 120, 20), 0.8)], clocks)  # the third is below 0.9

    attr = meta["a photo of a purple wine glass and a black apple"]
    right = [("wine glass", "purple", (5, 5, 40, 60), 0.9), ("apple", "black", (70, 70, 110, 110), 0.9)]
    assert verdict(right, attr)
    swapped = [("wine glass", "black", (5, 5, 40, 60), 0.9), ("apple", "purple", (70, 70, 110, 110), 0.9)]
    assert not verdict(swapped, attr)

    position = meta["a photo of a dog right of a teddy bear"]
    bear, dog = ("teddy bear", "brown", (5, 40, 45, 90), 0.9), ("dog", "white", (70, 40, 110, 90), 0.9)
    assert verdict([bear, dog], position)
    assert not verdict([("teddy bear", "brown", (70, 40, 110, 90), 0.9), ("dog", "white", (5, 40, 45, 90), 0.9)],
                       position)
    assert not verdict([dog], position)  # no bear to be right of

    single = next(m for m in meta.values() if m["tag"] == "single_object")
    name = single["include"][0]["class"]
    assert verdict([(name, "red", (10, 10, 50, 50), 0.4)], single)
    assert not verdict([(name, "red", (10, 10, 50, 50), 0.25)], single)
    colour = next(m for m in meta.values() if m["tag"] == "colors")
    clause = colour["include"][0]
    other = next(c for c in PALETTE if c != clause["color"])
    assert verdict([(clause["class"], clause["color"], (10, 10, 60, 60), 0.9)], colour)
    assert not verdict([(clause["class"], other, (10, 10, 60, 60), 0.9)], colour)
    pair = next(m for m in meta.values() if m["tag"] == "two_object")
    a, b = (c["class"] for c in pair["include"])
    assert verdict([(a, "red", (0, 0, 40, 40), 0.9), (b, "blue", (60, 60, 100, 100), 0.9)], pair)
    assert not verdict([(a, "red", (0, 0, 40, 40), 0.9)], pair)


def test_the_prompt_set_and_the_scorer_on_drawn_images():
    prompts = load_prompts("geneval")
    assert len(prompts) == 553 and styles_of(prompts) == list(TASKS)
    assert len(load_prompts("geneval:position")) == 100
    image, detector = drawing([("clock", "white", (5, 5, 30, 30), 0.95), ("clock", "white", (60, 60, 90, 90), 0.95)])
    scorer = load_scorer("geneval", detector=detector, colours="palette", device="cpu")
    scores = scorer.score([image, image], ["a photo of two clocks", "a photo of four clocks"])
    assert scores.tolist() == [1.0, 0.0]
    assert scorer.last_reasons[1] == ["expected clock>=4, found 2"]
    with pytest.raises(InputError, match="not a GenEval prompt"):
        scorer.score([image], ["a photo of a unicorn"])
    with pytest.raises(InputError, match="threshold"):
        load_scorer("geneval", detector=detector, colours="palette", device="cpu", threshold=1.5)
    with pytest.raises(InputError, match="detector"):
        load_scorer("geneval", detector="no_such_detector", colours="palette", device="cpu")


def test_bad_metadata_is_refused(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps({"tag": "position", "prompt": "x", "include": [
        {"class": "cat", "count": 1, "position": ["right of", 0]}]}) + "\n")
    with pytest.raises(InputError, match="earlier include clause"):
        load_metadata(path)
    path.write_text(json.dumps({"tag": "colors", "prompt": "x", "include": [{"class": "cat", "count": 1,
                                                                             "color": "teal"}]}) + "\n")
    with pytest.raises(InputError, match="teal"):
        load_metadata(path)


# ------------------------------------------------------------------ evaluate prompts=geneval, stand-in detector

def standin_detector(image):
    """Finds one object of each class in every image, twice over when the image's red channel is brighter
    than its blue (so base and tuned images differ), at a score of 0.95; no masks."""
    from scorers.geneval_models import LABEL_NAMES  # noqa: F401 (the module the real detector lives in loads)

    pixels = np.asarray(image, dtype=np.float64)
    twice = pixels[..., 0].mean() > pixels[..., 2].mean()
    w, h = image.size
    names = {c["class"] for m in load_metadata().values() for c in m.get("include", [])}
    found = [Detection(n, 0.95, (0.0, 0.0, w / 2 - 1, h - 1.0)) for n in names]
    if twice:
        found += [Detection(n, 0.95, (w / 2, 0.0, w - 1.0, h - 1.0)) for n in names]
    return found


@pytest.mark.slow
def test_evaluate_geneval_writes_the_per_task_table(tmp_path):
    from diffusion_dpo.recipes.evaluate import EvaluateConfig, run
    from diffusion_dpo.tiny import build_tiny_pipeline

    base = build_tiny_pipeline(tmp_path / "base", seed=0)
    other = build_tiny_pipeline(tmp_path / "other", seed=1)
    cfg = load_config(EvaluateConfig, [], [
        f"model.pretrained={base}", f"tuned.pretrained={other}", f"output_dir={tmp_path / 'eval'}",
        "prompts=geneval", "max_prompts_per_style=2", "scorers=geneval", "sampling.num_inference_steps=2",
        "n_boot=50", "grid_prompts=0", "device=cpu",
        "scorer_options={geneval: {detector: 'test_geneval:standin_detector', colours: palette}}"])
    result = run(cfg)
    table = result.benchmarks["geneval"]
    assert list(table["tasks"]) == list(TASKS)
    # Each task's share by hand from the stored scores, then the overall as the mean of the six.
    rows = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    for model in ("base", "tuned"):
        shares = []
        for task in TASKS:
            values = [r["score"] for r in rows if r["style"] == task and r["model"] == model]
            assert len(values) == 2 and set(values) <= {0.0, 1.0}
            shares.append(sum(values) / 2)
            assert table["tasks"][task][model] == pytest.approx(shares[-1])
        assert table["overall"][model] == pytest.approx(sum(shares) / 6)
    # The stand-in finds everything once: single objects and two objects right, counting (two of a kind,
    # never three) right only where it finds each class twice.
    assert table["tasks"]["single_object"]["base"] == 1.0
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "GenEval score" in report and "| **overall** (mean of tasks) |" in report
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["benchmarks"]["geneval"] == table
    # Other prompts are refused before any image is made.
    cfg.prompts, cfg.output_dir = "hpsv2-offline:photo", str(tmp_path / "other")
    with pytest.raises(InputError, match="not a GenEval prompt"):
        run(cfg)
    assert not (tmp_path / "other" / "images").exists()


# -------------------------------------------------------------------------------- the shapes world's GenEval

def as_pixels(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def test_the_shapes_detector_is_exact_on_the_world():
    wrong = []
    for k, scene in enumerate(all_scenes()):
        found = check(*detect(as_pixels(render(scene, random.Random(k)))), scene)
        if not all(found.values()):
            wrong.append((scene, found))
    assert not wrong


def test_shapes_checks_fail_where_the_image_is_wrong():
    scene = Scene("small", "red", "square", "blue")
    image = render(scene, random.Random(0))
    scorer = ShapesGenEval()
    ok = scorer.score_tasks([image], scene.prompt)
    assert all(v.tolist() == [1.0] for v in ok.values()) and scorer.score([image], scene.prompt).tolist() == [1.0]
    # Asked for a green triangle on white: the colour, the shape and the background checks fail.
    asked = scorer.score_tasks([image], "a large green triangle on a white background")
    assert {t: v.item() for t, v in asked.items()} == {"counting": 1, "colors": 0, "shape": 0, "size": 0,
                                                      "position": 1, "background": 0}
    # Two squares: counting fails. A square touching the edge: position fails.
    two = Image.new("RGB", (32, 32), (30, 60, 220))
    draw = ImageDraw.Draw(two)
    draw.rectangle((4, 4, 14, 14), fill=(220, 30, 30))
    draw.rectangle((18, 18, 28, 28), fill=(220, 30, 30))
    assert scorer.score_tasks([two], scene.prompt)["counting"].item() == 0
    edge = Image.new("RGB", (32, 32), (30, 60, 220))
    ImageDraw.Draw(edge).rectangle((0, 10, 10, 20), fill=(220, 30, 30))
    found = scorer.score_tasks([edge], scene.prompt)
    assert found["position"].item() == 0 and found["counting"].item() == 1
    assert list(found) == list(SHAPE_TASKS)


def test_the_demo_evaluates_with_the_shapes_geneval(tmp_path):
    from diffusion_dpo.evaluation.benchmarks import benchmark_tables
    from diffusion_dpo.evaluation.paired import _scores, row_names
    from diffusion_dpo.evaluation.reports import build_report, geneval_sentence
    from diffusion_dpo.recipes import demo, demo_common

    cfg = load_config(demo.DemoConfig, [], [])
    evaluation = demo_common.evaluate_config(cfg, "base", "tuned", tmp_path / "p.txt", tmp_path / "e", None)
    assert "shapes_geneval" in evaluation.scorers.split(",")
    # The rows evaluate writes for it, and the table built from them, on rendered world images (base) and
    # the same images with the colours inverted (tuned: every check but counting and position fails).
    scorers = {"shapes_geneval": load_scorer("shapes_geneval")}
    scenes = all_scenes()[:6]
    images = {"base": [render(s, random.Random(i)) for i, s in enumerate(scenes)]}
    images["tuned"] = [Image.fromarray(255 - np.asarray(im)) for im in images["base"]]
    rows = []
    for model, shown in images.items():
        for name, values in _scores("shapes_geneval", scorers["shapes_geneval"], shown, [s.prompt for s in scenes]).items():
            rows += [{"style": "world", "index": i, "prompt": s.prompt, "seed": 0, "model": model, "scorer": name,
                      "score": v, "image": ""} for i, (s, v) in enumerate(zip(scenes, values))]
    assert sorted({r["scorer"] for r in rows}) == sorted(row_names(scorers))
    report = build_report(rows, n_seeds=1, n_boot=20)
    table = benchmark_tables(report, scorers)["shapes_geneval"]
    assert table["overall"]["base"] == 1.0 and table["all_correct"]["base"] == 1.0
    assert table["all_correct"]["tuned"] == 0.0 and table["tasks"]["colors"]["tuned"] == 0.0
    assert "Shapes-world GenEval" in geneval_sentence(table)


# ------------------------------------------------------------------------------- the models, tiny and random

from test_scorers import tiny_clip  # noqa: E402,F401 (a fixture: a random 16-d CLIP folder)


def test_clip_colours_follow_genevals_classifier_by_hand(tiny_clip):  # noqa: F811 (the fixture)
    from transformers import CLIPModel, CLIPProcessor

    from scorers.geneval import GENEVAL_COLORS
    from scorers.geneval_models import COLOUR_TEMPLATES, ClipColours, crop

    image, _ = drawing([("cat", "red", (10, 10, 60, 60), 0.9)], size=96)
    mask = np.zeros((96, 96), dtype=bool)
    mask[20:40, 20:40] = True
    objects = [Detection("cat", 0.9, (10.0, 10.0, 60.0, 60.0), mask), Detection("cat", 0.9, (0.0, 0.0, 95.0, 95.0))]
    cut = np.asarray(crop(image, objects[0]))
    assert cut.shape == (50, 50, 3)
    assert tuple(cut[0, 0]) == (153, 153, 153) and tuple(cut[20, 20]) == PALETTE["red"]  # outside / inside mask
    found = ClipColours(device="cpu", model=tiny_clip)(image, objects, "cat")

    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)

    def unit(x):
        x = getattr(x, "pooler_output", x)
        return x / x.norm(dim=-1, keepdim=True)

    with torch.no_grad():
        classes = []
        for colour in GENEVAL_COLORS:
            tokens = processor.tokenizer([t.format(c=colour, o="cat") for t in COLOUR_TEMPLATES], padding=True,
                                         return_tensors="pt")
            classes.append(unit(unit(model.get_text_features(**tokens)).mean(0)))
        pixels = processor.image_processor([crop(image, o) for o in objects], return_tensors="pt")["pixel_values"]
        logits = unit(model.get_image_features(pixel_values=pixels)) @ torch.stack(classes).T
    assert found == [GENEVAL_COLORS[i] for i in logits.argmax(1).tolist()]


def test_mask2former_detector_on_a_tiny_random_model(tmp_path):
    from transformers import Mask2FormerConfig, Mask2FormerImageProcessor, SwinConfig

    from scorers.geneval_models import Mask2FormerDetector

    try:
        import scipy  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match=r"diffusion-dpo\[geneval\]"):
            Mask2FormerDetector(device="cpu", model=str(tmp_path))
        return
    from transformers import Mask2FormerForUniversalSegmentation

    names = ["cat", "mouse", "dog"]
    torch.manual_seed(0)
    config = Mask2FormerConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=64,
                                   out_features=["stage1", "stage2", "stage3", "stage4"]),
        hidden_dim=32, num_queries=4, encoder_layers=1, decoder_layers=2, mask_feature_size=32, feature_size=32,
        dim_feedforward=32, num_attention_heads=2, encoder_feedforward_dim=32, id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)})
    Mask2FormerForUniversalSegmentation(config).save_pretrained(tmp_path)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(tmp_path)
    found = Mask2FormerDetector(device="cpu", model=str(tmp_path))(Image.new("RGB", (48, 40), (200, 30, 30)))
    assert found and all(d.label in ("cat", "computer mouse", "dog") for d in found)  # COCO "mouse" renamed
    for d in found:
        ys, xs = np.nonzero(d.mask)
        assert d.mask.shape == (40, 48) and d.box == (xs.min(), ys.min(), xs.max(), ys.max())
        assert 0 < d.score <= 1


def test_benchmark_prompt_sets(tmp_path, monkeypatch):
    parti = load_prompts("partiprompts")
    assert len(parti) == 1632 and parti[0].text == "bond" and parti[0].style == "Abstract"
    assert {p.style for p in load_prompts("partiprompts:Animals")} == {"Animals"}
    ocr = load_prompts("ocr")
    assert len(ocr) == 1018 and all(p.style == "ocr" and p.text.count('"') >= 2 for p in ocr[:50])
    # DrawBench is not shipped: a local copy through prompts_dir, else the cache, else the hub with a way out.
    (tmp_path / "drawbench.tsv").write_text("Prompt\tCategory\nA red colored car.\tColors\nA tiny cat.\tCount\n")
    assert [(p.text, p.style) for p in load_prompts("drawbench:Colors", prompts_dir=str(tmp_path))] == [
        ("A red colored car.", "Colors")]
    monkeypatch.setenv("DIFFUSION_DPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    def unreachable(*args, **kwargs):  # the hub as CI has it, without the network's timeouts (20 s in the suite)
        raise ConnectionError("the hub is unreachable")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(InputError, match="prompts_dir"):
        load_prompts("drawbench")
    (tmp_path / "cache" / "prompts").mkdir(parents=True)
    (tmp_path / "cache" / "prompts" / "drawbench.tsv").write_text("Prompt\tCategory\nA tiny cat.\tCount\n")
    assert [p.text for p in load_prompts("drawbench")] == ["A tiny cat."]
    with pytest.raises(InputError, match="no style"):
        load_prompts("geneval:nonsense")
