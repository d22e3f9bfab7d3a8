"""``diffusion-dpo label`` on the tiny pipeline with the jpeg_compressibility scorer (no weights, offline)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from run_files import run_on_two_processes

from diffusion_dpo.config import load_config
from diffusion_dpo.errors import InputError
from diffusion_dpo.labeling.pairing import candidate_seed, prompt_rng
from diffusion_dpo.recipes.label import LabelConfig, run
from diffusion_dpo.tiny import build_tiny_pipeline

N_PROMPTS, K = 4, 3
COLUMNS = ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "score_0", "score_1", "scorer", "model_0",
           "model_1", "seed_0", "seed_1", "prompt_index", "style", "sampler", "num_inference_steps",
           "guidance_scale", "height", "width"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("label")
    pipe = build_tiny_pipeline(root / "tiny-sd")
    prompts = root / "prompts.txt"
    words = ["red dog", "blue cat", "green house", "yellow tree", "pink car", "white flower"]
    prompts.write_text("\n".join(f"a {w} on a black background" for w in words[:N_PROMPTS]) + "\n")
    return {"root": root, "pipe": str(pipe), "prompts": str(prompts)}


def make_cfg(world, out, *overrides):
    base = [f"model.pretrained={world['pipe']}", f"prompts={world['prompts']}",
            "scorer.name=jpeg_compressibility", f"candidates_per_prompt={K}", "sampling.num_inference_steps=1",
            "prompts_per_shard=2", "batch_size=6", f"output_dir={out}"]
    return load_config(LabelConfig, [], base + list(overrides))


def read(folder):
    return pq.read_table(sorted(Path(folder).glob("*.parquet"))).to_pylist()


@pytest.fixture(scope="module")
def baseline(world):
    out = world["root"] / "baseline"
    summary = run(make_cfg(world, out))
    return out, summary


def test_schema_labels_seeds_and_summary(world, baseline):
    out, summary = baseline
    assert sorted(p.name for p in out.glob("*.parquet")) == ["train-00000.parquet", "train-00001.parquet"]
    assert pq.read_schema(out / "train-00000.parquet").names == COLUMNS
    rows = read(out)
    assert 0 < len(rows) <= N_PROMPTS  # best_worst: at most one pair per prompt (exact ties dropped)
    texts = Path(world["prompts"]).read_text().split("\n")
    for r in rows:
        assert (r["label_0"], r["label_1"]) in ((1.0, 0.0), (0.0, 1.0))
        winner, loser = (r["score_0"], r["score_1"]) if r["label_0"] == 1.0 else (r["score_1"], r["score_0"])
        assert winner > loser  # the winner's stored score is the larger
        assert r["caption"] == texts[r["prompt_index"]]
        seeds = [candidate_seed(0, r["prompt_index"], k) for k in range(K)]
        assert r["seed_0"] in seeds and r["seed_1"] in seeds and r["seed_0"] != r["seed_1"]
        assert r["scorer"] == "jpeg_compressibility" and r["model_0"] == r["model_1"] == world["pipe"]
        assert (r["sampler"], r["num_inference_steps"], r["guidance_scale"], r["height"], r["width"]) == (
            "DDIMScheduler", 1, 7.5, 32, 32)
        # the winner's column is a coin flip, the first draw of the prompt's rng (best_worst draws nothing else)
        assert (r["label_0"] == 1.0) == (prompt_rng(0, r["prompt_index"]).random() < 0.5)
    assert len({r["prompt_index"] for r in rows}) == len(rows)  # every prompt at most once
    # the summary is the rows': pairs + dropped = one proposal per prompt
    assert summary.pairs_written == len(rows)
    assert summary.pairs_written + summary.pairs_dropped_for_margin == N_PROMPTS
    assert summary.prompts == N_PROMPTS and summary.images_generated == N_PROMPTS * K
    assert summary.mean_winner_score == pytest.approx(np.mean([max(r["score_0"], r["score_1"]) for r in rows]))
    assert summary.mean_loser_score == pytest.approx(np.mean([min(r["score_0"], r["score_1"]) for r in rows]))
    on_disk = json.loads((out / "summary.json").read_text())
    assert {k: v for k, v in on_disk.items() if k != "this_run"} == {
        k: v for k, v in dataclasses.asdict(summary).items() if k != "this_run"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["num_shards"] == 2
    assert (out / "config.yaml").is_file()


def test_seed_regenerates_the_same_image(world, baseline):
    from diffusion_dpo.data import decode_image
    from diffusion_dpo.sampling import generate, load_pipeline

    row = read(baseline[0])[0]
    pipe = load_pipeline(world["pipe"], device="cpu")
    for col in (0, 1):
        (image,) = generate(pipe, [row["caption"]], [row[f"seed_{col}"]],
                            num_inference_steps=row["num_inference_steps"], guidance_scale=row["guidance_scale"],
                            height=row["height"], width=row["width"], batch_size=1)
        stored = np.asarray(decode_image(row[f"jpg_{col}"], f"jpg_{col}")).astype(int)
        diff = np.abs(np.asarray(image).astype(int) - stored)
        # Generated alone instead of in a batch of 6, the kernels round differently: at most 1/255 on a few
        # pixels (the noise itself is the same), far from what another seed gives (below).
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    (other,) = generate(pipe, [row["caption"]], [row["seed_0"] + 1], num_inference_steps=row["num_inference_steps"],
                        guidance_scale=row["guidance_scale"], height=row["height"], width=row["width"])
    stored_0 = np.asarray(decode_image(row["jpg_0"], "jpg_0")).astype(int)
    assert np.abs(np.asarray(other).astype(int) - stored_0).mean() > 5


def test_resume_after_interrupt_equals_uninterrupted(world, baseline):
    out = world["root"] / "interrupted"
    cfg = make_cfg(world, out)

    def crash_after_first(index):
        raise KeyboardInterrupt  # Ctrl-C right after shard `index` was written

    with pytest.raises(KeyboardInterrupt):
        run(cfg, on_shard=crash_after_first)
    assert [p.name for p in out.glob("*.parquet")] == ["train-00000.parquet"]
    assert not (out / "summary.json").exists()
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    (out / "train-00001.parquet.tmp").write_bytes(b"a shard cut off mid-write")

    written = []
    summary = run(cfg, on_shard=written.append)
    assert written == [1]  # only the missing shard
    assert not list(out.glob("*.tmp"))
    assert read(out) == read(baseline[0])  # same rows, image bytes included
    strip = lambda s: {k: v for k, v in dataclasses.asdict(s).items()  # noqa: E731
                       if k not in ("this_run", "output_dir", "files")}
    assert strip(summary) == strip(baseline[1])
    # a third run has nothing left to do
    again = []
    assert strip(run(cfg, on_shard=again.append)) == strip(baseline[1]) and again == []


def test_other_configuration_is_refused(world, baseline):
    out = baseline[0]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(InputError, match=r"different configuration.*seed: 0 -> 1"):
        run(make_cfg(world, out, "seed=1"))
    with pytest.raises(InputError, match=r"sampling.num_inference_steps: 1 -> 3"):
        run(make_cfg(world, out, "sampling.num_inference_steps=3"))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    # settings that only change speed are not part of the configuration: batch size may differ on resume
    assert run(make_cfg(world, out, "batch_size=2")).pairs_written == baseline[1].pairs_written


def test_one_folder_rule_continue_refuse_replace(world, baseline, tmp_path):
    """resume=auto (the default) continues, resume=null refuses a folder holding a run (naming both ways out),
    overwrite=true replaces it, even one written under another configuration."""
    import shutil

    out = tmp_path / "used"
    shutil.copytree(baseline[0], out)
    before = read(out)
    with pytest.raises(InputError, match="already holds a run.*resume=auto.*overwrite=true"):
        run(make_cfg(world, out, "resume=null"))
    assert read(out) == before
    again = []
    assert run(make_cfg(world, out), on_shard=again.append).pairs_written == baseline[1].pairs_written
    assert again == []
    written = []
    replaced = run(make_cfg(world, out, "overwrite=true", "seed=1"), on_shard=written.append)
    rows = read(out)
    assert written == [0, 1] and replaced.pairs_written == len(rows) and rows != before
    assert all(r["seed_0"] in [candidate_seed(1, r["prompt_index"], k) for k in range(K)] for r in rows)


def test_all_pairing_with_min_margin(world, baseline):
    """``all`` proposes K(K-1)/2 = 3 pairs per prompt. With min_margin m = the median of the best_worst
    margins, a prompt whose best pair reaches m keeps that pair among others, and a prompt whose best pair
    falls short keeps nothing (no pair of it can have a larger margin than its best one)."""
    margin = lambda r: abs(r["score_0"] - r["score_1"])  # noqa: E731
    key = lambda r: (r["prompt_index"], frozenset((r["seed_0"], r["seed_1"])))  # noqa: E731
    best = {r["prompt_index"]: r for r in read(baseline[0])}
    m = float(np.median([margin(r) for r in best.values()]))
    out = world["root"] / "all"
    summary = run(make_cfg(world, out, "pairing=all", f"min_margin={m}"))
    rows = read(out)
    assert summary.pairs_written == len(rows) > 0
    assert summary.pairs_written + summary.pairs_dropped_for_margin == N_PROMPTS * 3
    assert all(margin(r) >= m for r in rows)
    assert len({key(r) for r in rows}) == len(rows)  # each unordered pair at most once
    kept_prompts = {r["prompt_index"] for r in rows}
    assert kept_prompts == {p for p, r in best.items() if margin(r) >= m}
    assert {key(r) for r in best.values() if margin(r) >= m} <= {key(r) for r in rows}


def test_bad_input_fails_before_anything_is_written(world, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        ([f"prompts={empty}"], "empty"),
        (["prompts=hpsv2-offline:cartoons"], "cartoons"),
        (["prompts=no-such-set"], "no-such-set"),
        (["candidates_per_prompt=1"], "at least 2"),
        (["scorer.name=aesthetic", f"scorer.options.weights={tmp_path / 'missing.pth'}"], "missing.pth"),
        (["scorer.name=no_such_scorer"], "no_such_scorer"),
        (["sampling.scheduler=NotAScheduler"], "NotAScheduler"),
    ]
    for i, (overrides, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(InputError, match=message):
            run(make_cfg(world, out, *overrides))
        assert not out.exists(), overrides


def test_cli_reports_bad_input_without_traceback(world, tmp_path, capsys):
    from diffusion_dpo.cli import main

    assert main(["label", f"output_dir={tmp_path / 'o'}", "candidates_per_prompt=1"]) == 2
    assert "candidates_per_prompt" in capsys.readouterr().err


def test_training_data_module_reads_the_output(baseline):
    from diffusion_dpo.data import DataConfig, PreferencePairs, open_pairs

    out = baseline[0]
    rows = read(out)
    assert len(open_pairs(str(out))) == len(rows)
    pairs = PreferencePairs(DataConfig(source=str(out), resolution=32, caption_dropout=0.0, random_flip=False),
                            seed=0)
    assert pairs.num_pairs == len(rows)
    batch = next(pairs.batches(len(rows)))
    assert batch["pixel_values"].shape == (len(rows), 2, 3, 32, 32)


def _make_pair_set(folder):
    """Six hand-built pairs. A flat image's JPEG is smaller than a noise image's, so jpeg_compressibility
    prefers the flat one. Rows (column 0, column 1, original labels):
      0 flat  noise 1/0  agree        3 flat  noise 0/1  disagree
      1 noise flat  0/1  agree        4 noise flat  .5/.5 original tie (excluded)
      2 flat  noise 1/0  agree        5 flat  flat  1/0  scorer tie (excluded)
    -> compared 4, agree 3, agreement 0.75."""
    import pyarrow as pa
    from PIL import Image

    from diffusion_dpo.tiny import encode_image

    rng = np.random.default_rng(0)
    flat = encode_image(Image.new("RGB", (32, 32), (200, 40, 40)))
    noise = [encode_image(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))) for _ in range(6)]
    cols = [(flat, noise[0]), (noise[1], flat), (flat, noise[2]), (flat, noise[3]), (noise[4], flat), (flat, flat)]
    labels = [(1.0, 0.0), (0.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    folder.mkdir()
    pq.write_table(pa.table({
        "caption": [f"pair {i}" for i in range(6)], "jpg_0": [c[0] for c in cols], "jpg_1": [c[1] for c in cols],
        "label_0": [x[0] for x in labels], "label_1": [x[1] for x in labels],
        "model_0": ["sd"] * 6, "model_1": ["sdxl"] * 6,
    }), folder / "train-0.parquet")
    return cols, labels


def test_relabel_agreement_by_hand_and_resume(world, tmp_path):
    cols, labels = _make_pair_set(tmp_path / "pairs")
    relabel = ["relabel.pairs_per_shard=4", f"relabel.source={tmp_path / 'pairs'}"]
    summary = run(make_cfg(world, tmp_path / "out", *relabel))
    assert {k: getattr(summary, k) for k in ("pairs_written", "original_ties", "scorer_ties", "pairs_compared",
                                    "pairs_agreeing", "agreement", "shards")} == {
        "pairs_written": 6, "original_ties": 1, "scorer_ties": 1, "pairs_compared": 4, "pairs_agreeing": 3,
        "agreement": 0.75, "shards": 2}
    rows = read(tmp_path / "out")
    assert [(r["label_0"], r["label_1"]) for r in rows] == [(1, 0), (0, 1), (1, 0), (1, 0), (0, 1), (0.5, 0.5)]
    assert [(r["original_label_0"], r["original_label_1"]) for r in rows] == labels
    assert [(r["jpg_0"], r["jpg_1"]) for r in rows] == cols  # images kept byte for byte
    assert [r["source_index"] for r in rows] == list(range(6)) and rows[0]["model_1"] == "sdxl"
    for r in rows[:5]:
        assert (r["score_0"] > r["score_1"]) == (r["label_0"] == 1.0)

    # streamed and interrupted after the first shard, then resumed: the same dataset
    streamed = tmp_path / "streamed"
    cfg = make_cfg(world, streamed, *relabel, "relabel.streaming=true")

    def crash(index):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, on_shard=crash)
    assert run(cfg).agreement == 0.75
    assert read(streamed) == rows

    # a min_margin above every margin makes every pair a tie
    wide = run(make_cfg(world, tmp_path / "wide", *relabel, "min_margin=1000"))
    assert wide.scorer_ties == 6 and wide.pairs_compared == 0 and wide.agreement is None


@pytest.mark.slow
def test_two_processes_split_the_shards(world, baseline, tmp_path):
    """torchrun starts two CPU processes (``accelerate launch --cpu`` starts one without MPI); shard i is
    written by process i % 2, every prompt is generated once, and the rows are the single-process ones."""
    out = tmp_path / "two"
    args = [f"model.pretrained={world['pipe']}", f"prompts={world['prompts']}", "scorer.name=jpeg_compressibility",
            f"candidates_per_prompt={K}", "sampling.num_inference_steps=1", "prompts_per_shard=2",
            "batch_size=6", f"output_dir={out}"]
    run_on_two_processes("label", args)
    stats = {}
    for path in sorted(out.glob("*.parquet")):
        meta = json.loads(pq.read_schema(path).metadata[b"diffusion_dpo.shard"])
        stats[meta["shard"]] = meta["stats"]
    assert {i: s["process_index"] for i, s in stats.items()} == {0: 0, 1: 1}
    covered = sorted(p for s in stats.values() for p in range(s["first_prompt"], s["first_prompt"] + s["prompts"]))
    assert covered == list(range(N_PROMPTS))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("jpg_0", "jpg_1")} for r in rows]  # noqa: E731
    assert strip(read(out)) == strip(read(baseline[0]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"]["images"] == N_PROMPTS * K and summary["this_run"]["shards"] == 2
