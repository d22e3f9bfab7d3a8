"""``diffusion-dpo evaluate`` end to end on tiny pipelines with the JPEG scorers (offline, CPU)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_dpo import sampling
from diffusion_dpo.cli import main as cli_main
from diffusion_dpo.config import load_config, parse_args
from diffusion_dpo.errors import InputError
from diffusion_dpo.evaluation.paired import SEED_STRIDE, EvaluateConfig, run, scorer_names
from diffusion_dpo.evaluation.prompts import load_prompts
from diffusion_dpo.evaluation.reports import (
    CAPTION_LINES,
    LINE_HEIGHT,
    _wrap,
    bar_chart,
    grid_size,
    pair_grid,
)
from diffusion_dpo.tiny import build_tiny_pipeline, write_tiny_pairs

FAST = ["sampling.num_inference_steps=2", "n_boot=200", "grid_cell=64", "batch_size=8"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Base and a second checkpoint (other random weights), a zero LoRA (B = 0: the base exactly), a UNet
    and a LoRA that do not fit the base, and held-out pairs with one tie."""
    from diffusers import UNet2DConditionModel

    from diffusion_dpo.models import attach_lora, save_lora

    root = tmp_path_factory.mktemp("world")
    base = build_tiny_pipeline(root / "base", seed=0)
    other = build_tiny_pipeline(root / "other", seed=1)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    attach_lora(unet, rank=2)
    save_lora(unet, root / "zero_lora", is_sdxl=False)
    misfit = UNet2DConditionModel.from_config({**unet.config, "block_out_channels": (32, 32)})
    misfit.save_pretrained(root / "misfit_unet")
    attach_lora(misfit, rank=2)
    save_lora(misfit, root / "misfit_lora", is_sdxl=False)
    write_tiny_pairs(root / "pairs", n_pairs=5, n_ties=1)
    return {"root": root, "base": str(base), "other": str(other), "zero_lora": str(root / "zero_lora"),
            "misfit_unet": str(root / "misfit_unet"), "misfit_lora": str(root / "misfit_lora"),
            "pairs": str(root / "pairs")}


def _cfg(world, out, *overrides):
    return load_config(EvaluateConfig, [], [f"model.pretrained={world['base']}", f"output_dir={out}", *FAST,
                                            *overrides])


def _jpeg_kb(path: Path) -> float:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.tell() / 1000.0


def test_report_matches_the_stored_scores_and_resumes_exactly(world, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    cfg = _cfg(world, out, f"tuned.pretrained={world['other']}", "prompts=hpsv2-offline",
               "max_prompts_per_style=2", "seeds=2", "scorers=jpeg_compressibility,jpeg_incompressibility")
    summary = run(cfg)
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]

    # 4 styles x 2 prompts x 2 seeds = 16 items; x 2 models x 2 scorers = 64 rows.
    assert len(rows) == 64 and summary.n_images == 32
    assert report["n_prompts"] == 8 and report["n_seeds"] == 2
    assert report["styles"] == ["anime", "concept-art", "paintings", "photo"]
    # Seeds: image j of the prompt at position i uses seed + 100000 j + i (seed 0 here).
    assert {(r["index"], r["seed"]) for r in rows} == {(i, i + SEED_STRIDE * j) for i in (0, 1) for j in (0, 1)}

    for name in ("jpeg_compressibility", "jpeg_incompressibility"):
        result = report["scorers"][name]
        mine = [r for r in rows if r["scorer"] == name]
        for style, block in [(None, result)] + list(result["styles"].items()):
            sel = [r for r in mine if style is None or r["style"] == style]
            key = lambda r: (r["style"], r["index"], r["seed"])  # noqa: E731
            base = {key(r): r["score"] for r in sel if r["model"] == "base"}
            tuned = {key(r): r["score"] for r in sel if r["model"] == "tuned"}
            keys = sorted(base)
            b, t = np.array([base[k] for k in keys]), np.array([tuned[k] for k in keys])
            assert block["base_mean"] == pytest.approx(b.mean(), abs=1e-9)
            assert block["tuned_mean"] == pytest.approx(t.mean(), abs=1e-9)
            assert block["base_median"] == pytest.approx(np.median(b), abs=1e-9)
            wins = sum(1.0 if t_ > b_ else 0.5 if t_ == b_ else 0.0 for b_, t_ in zip(b, t))
            assert block["win_rate"] == wins / len(keys)
            lo, hi = block["win_rate_ci"]
            assert 0.0 <= lo <= block["win_rate"] <= hi <= 1.0
            assert block["base_mean_ci"][0] <= block["base_mean"] <= block["base_mean_ci"][1]
            assert block["n_prompts"] == (8 if style is None else 2) and block["n_seeds"] == 2
    # The two scorers are negatives of each other: tuned wins one exactly where it loses the other.
    compress, incompress = report["scorers"]["jpeg_compressibility"], report["scorers"]["jpeg_incompressibility"]
    assert compress["win_rate"] + incompress["win_rate"] == pytest.approx(1.0)
    assert compress["base_mean"] == pytest.approx(-incompress["base_mean"])

    # Every stored score is the scorer's value of the image saved on disk.
    for r in rows[:8]:
        sign = -1.0 if r["scorer"] == "jpeg_compressibility" else 1.0
        assert r["score"] == pytest.approx(sign * _jpeg_kb(out / r["image"]), abs=1e-6)
    assert Path(out / "images/base/photo/1-100001.png").is_file()

    # Pictures: a grid per style of 2 pairs (64 px cells): 8 + 2 * (2*64 + 4 + 8) = 288 wide,
    # 24 + 64 + 3*14 + 8 = 138 high; the chart is 2 panels of 5 x 4 inches at 100 dpi.
    for style, path in summary.grids.items():
        with Image.open(path) as grid:
            assert grid.format == "PNG" and grid.size == (288, 138)
    with Image.open(summary.chart) as chart:
        assert chart.format == "PNG" and chart.size == (1000, 400)
    markdown = (out / "report.md").read_text()
    assert "## jpeg_compressibility" in markdown and f"{100 * compress['win_rate']:.1f}%" in markdown

    # Resume: a rerun generates nothing and reproduces scores and report; a deleted image is regenerated
    # bit for bit, with the rest of its batch (batch_size=8: the anime and concept-art items of the first
    # seed order), as an uninterrupted run generates it, since batched kernels round by batch.
    before_scores, before_report = (out / "scores.jsonl").read_text(), (out / "report.json").read_text()
    victim = out / "images/tuned/anime/1-100001.png"
    victim_bytes = victim.read_bytes()
    victim.unlink()
    real_generate, generated = sampling.generate, []

    def counting_generate(pipe, prompts, seeds, **kwargs):
        generated.extend(seeds)
        return real_generate(pipe, prompts, seeds, **kwargs)

    monkeypatch.setattr(sampling, "generate", counting_generate)
    run(cfg)
    assert generated == [0, 100000, 1, 100001] * 2
    assert victim.read_bytes() == victim_bytes
    assert (out / "scores.jsonl").read_text() == before_scores
    assert (out / "report.json").read_text() == before_report

    # Other sampler settings in the same folder would mix images: refused before anything is made.
    with pytest.raises(InputError, match="other settings.*sampling"):
        run(_cfg(world, out, f"tuned.pretrained={world['other']}", "prompts=hpsv2-offline",
                 "max_prompts_per_style=2", "seeds=2", "scorers=jpeg_compressibility",
                 "sampling.guidance_scale=3.0"))


def test_one_folder_rule_continue_refuse_replace(world, tmp_path, monkeypatch):
    """resume=auto (the default) continues from the images there, resume=null refuses a folder holding a run
    (naming both ways out), overwrite=true replaces it."""
    out = tmp_path / "eval"
    args = [f"tuned.pretrained={world['other']}", "prompts=hpsv2-offline:photo", "max_prompts_per_style=2",
            "scorers=jpeg_compressibility", "grid_prompts=0"]
    first = run(_cfg(world, out, *args))
    stray = out / "images" / "tuned" / "photo" / "9-9.png"
    stray.write_bytes(b"an image of an earlier run")
    real_generate, generated = sampling.generate, []

    def counting_generate(pipe, prompts, seeds, **kwargs):
        generated.extend(seeds)
        return real_generate(pipe, prompts, seeds, **kwargs)

    monkeypatch.setattr(sampling, "generate", counting_generate)
    with pytest.raises(InputError, match="already holds a run.*resume=auto.*overwrite=true"):
        run(_cfg(world, out, *args, "resume=null"))
    assert stray.is_file() and generated == []
    again = run(_cfg(world, out, *args))
    assert generated == [] and again.rows == first.rows
    replaced = run(_cfg(world, out, *args, "overwrite=true"))
    assert not stray.exists() and sorted(generated) == [0, 0, 1, 1]  # 2 prompts x (base, tuned), seed 0 + i
    assert [r["score"] for r in replaced.rows] == pytest.approx([r["score"] for r in first.rows], abs=0.05)


def test_identical_models_win_exactly_half_and_implicit_accuracy_is_half(world, tmp_path, capsys):
    """A LoRA whose B matrices are zero leaves the base unchanged: every image is identical, every pair a
    tie (win rate exactly 0.5 with a [0.5, 0.5] interval), and every implicit reward is exactly 0 because
    both UNets see the same noise and timestep (accuracy 0.5; the tie row of the pairs is skipped). One of
    the evaluated prompts is a caption of the training pairs given: one warning line says so."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    photo = load_prompts("hpsv2-offline:photo")
    (tmp_path / "trained_on").mkdir()
    pq.write_table(pa.table({"caption": [photo[1].text, "a red dog"]}), tmp_path / "trained_on" / "a.parquet")
    out = tmp_path / "same"
    summary = run(_cfg(world, out, f"model.lora={world['zero_lora']}", "prompts=hpsv2-offline:photo",
                       "max_prompts_per_style=3", "seeds=2", "scorers=jpeg_compressibility",
                       f"implicit_reward.source={world['pairs']}", "implicit_reward.noise_draws=1",
                       f"training_pairs={tmp_path / 'trained_on'}"))
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warned == [f"warning: 1 of 3 evaluation prompts are captions of the 2 distinct training captions in "
                      f"{tmp_path / 'trained_on'} (e.g. {photo[1].text[:60]!r}): scores on them are not held out"]
    report = json.loads((out / "report.json").read_text())
    result = report["scorers"]["jpeg_compressibility"]
    assert result["win_rate"] == 0.5 and result["win_rate_ci"] == [0.5, 0.5]
    assert result["styles"]["photo"]["win_rate"] == 0.5
    assert result["base_mean"] == result["tuned_mean"]
    assert report["models"]["tuned"].endswith(f"model.lora={world['zero_lora']}")

    implicit = report["implicit_reward"]
    assert summary.implicit_reward.accuracy == 0.5
    assert implicit["n_pairs"] == 4 and implicit["n_ties_skipped"] == 1 and implicit["accuracy_ci"] == [0.5, 0.5]
    rows = [json.loads(line) for line in (out / "implicit_reward.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert r["policy_mse_w"] == r["ref_mse_w"] and r["policy_mse_l"] == r["ref_mse_l"]
        assert r["reward_w"] == r["reward_l"] == 0.0 and r["correct"] == 0.5
    assert "Implicit-reward accuracy" in (out / "report.md").read_text()


def test_implicit_rewards_follow_the_dpo_formula_and_ignore_batching(world):
    """reward = 0.5 * beta_dpo * (ref_mse - policy_mse) per image; a pair is right when the winner's reward
    is higher; the noise of a pair depends on its row, not on its batch."""
    from diffusion_dpo.data import open_pairs
    from diffusion_dpo.evaluation.implicit_reward import labelled_pairs, score_pairs

    base = sampling.load_pipeline(world["base"], device="cpu")
    tuned = sampling.load_pipeline(world["other"], device="cpu")
    pairs, counts = labelled_pairs(open_pairs(world["pairs"], streaming=True), 3, "pairs", resolution=32)
    assert [p.row_id for p in pairs] == [0, 1, 2] and counts["ties"] == 0
    one = score_pairs(tuned, base, pairs, beta_dpo=100.0, noise_draws=1, batch_size=1)
    three = score_pairs(tuned, base, pairs, beta_dpo=100.0, noise_draws=1, batch_size=3)
    for a, b in zip(one, three):
        assert a.policy_mse_w == pytest.approx(b.policy_mse_w, rel=1e-5)
        assert a.ref_mse_l == pytest.approx(b.ref_mse_l, rel=1e-5)
        assert a.reward_w == pytest.approx(50.0 * (a.ref_mse_w - a.policy_mse_w), rel=1e-4, abs=1e-6)
        assert a.reward_l == pytest.approx(50.0 * (a.ref_mse_l - a.policy_mse_l), rel=1e-4, abs=1e-6)
        assert a.correct == (1.0 if a.reward_w > a.reward_l else 0.0 if a.reward_w < a.reward_l else 0.5)
    # Sharded over two processes, the pairs split without overlap and keep their rows.
    mine, _ = labelled_pairs(open_pairs(world["pairs"], streaming=True), 0, "pairs", resolution=32, rank=1,
                             world_size=2)
    assert [p.row_id for p in mine] == [1, 3]


@pytest.mark.parametrize("overrides, message", [
    (["tuned.pretrained={other}", "prompts=hpsv2-offline:sketch"], "no style 'sketch'"),
    (["tuned.pretrained={other}", "prompts={empty}"], "empty"),
    (["model.denoiser={misfit_unet}"], "does not fit the base"),
    (["model.lora={misfit_lora}"], "do not fit the base"),
    (["tuned.pretrained={other}", "scorers=pickascore"], "unknown scorer 'pickascore'"),
    (["tuned.pretrained={other}", "scorer_options.jpeg_compressibility.quality=500"], "quality=500"),
    ([], "exactly one of model.denoiser, model.lora"),
    (["tuned.pretrained={other}", "model.lora={zero_lora}"], "exactly one of"),
    (["tuned.pretrained={other}", "implicit_reward.source={root}/nowhere"], "does not exist"),
    (["tuned.pretrained={other}", "sampling.scheduler=UNet2DConditionModel"], "sampling.scheduler"),
])
def test_bad_input_fails_before_any_image(world, tmp_path, monkeypatch, overrides, message):
    def no_images(*args, **kwargs):
        raise AssertionError("an image was generated before the input was checked")

    monkeypatch.setattr(sampling, "generate", no_images)
    (tmp_path / "empty.txt").write_text("\n \n")
    paths = {**world, "empty": tmp_path / "empty.txt"}
    out = tmp_path / "out"
    cfg = _cfg(world, out, "prompts=hpsv2-offline:photo", "max_prompts_per_style=1", "scorers=jpeg_compressibility",
               *[o.format(**paths) for o in overrides])
    with pytest.raises(InputError, match=message):
        run(cfg)
    assert not (out / "images").exists()


def test_both_models_sample_with_the_scheduler_sampling_names(world, tmp_path, monkeypatch):
    """sampling.scheduler replaces the checkpoint's own (the tiny base's DDIM) in the base and the tuned model."""
    seen = set()

    def record(pipe, prompts, *args, **kwargs):  # blank images: only the pipelines are under test
        seen.add((id(pipe), type(pipe.scheduler).__name__))
        return [Image.new("RGB", (32, 32)) for _ in prompts]

    monkeypatch.setattr(sampling, "generate", record)
    common = [f"tuned.pretrained={world['other']}", "prompts=hpsv2-offline:photo", "max_prompts_per_style=1",
              "scorers=jpeg_compressibility"]
    run(_cfg(world, tmp_path / "euler", *common, "sampling.scheduler=EulerDiscreteScheduler"))
    assert len(seen) == 2 and {name for _, name in seen} == {"EulerDiscreteScheduler"}
    seen.clear()
    run(_cfg(world, tmp_path / "own", *common))
    assert len(seen) == 2 and "EulerDiscreteScheduler" not in {name for _, name in seen}


def test_command_line(world, tmp_path, capsys):
    cfg = parse_args(EvaluateConfig, ["scorers=pickscore,hpsv2", "scorer_options.pickscore.batch_size=16"],
                     prog="diffusion-dpo evaluate")
    assert scorer_names(cfg.scorers) == ["pickscore", "hpsv2"]
    assert cfg.scorer_options == {"pickscore": {"batch_size": 16}}
    assert scorer_names(["clip", " aesthetic "]) == ["clip", "aesthetic"]
    code = cli_main(["evaluate", f"model.pretrained={world['base']}", f"tuned.pretrained={world['other']}",
                     "prompts=hpsv2-offline:sketch", f"output_dir={tmp_path / 'x'}"])
    assert code == 2 and "no style 'sketch'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    assert "implicit_reward.beta_dpo" in capsys.readouterr().out


def test_grid_and_chart_geometry(tmp_path):
    """3 pairs of 40 x 20 images at cell 50 (height 25), 2 per row: 2 rows;
    width 8 + 2 * (2*50 + 4 + 8) = 232, height 24 + 2 * (25 + 3*14 + 8) = 174."""
    assert grid_size(3, 50, 25, 2) == (232, 174)
    image = Image.new("RGB", (40, 20), "red")
    grid = pair_grid([(image, image, "a red dog")] * 3, title="t", cell=50, columns=2)
    assert grid.size == (232, 174)
    assert grid.getpixel((8, 24)) == (255, 0, 0)  # first base image at the first tile's corner
    assert grid.getpixel((8 + 50 + 4, 24)) == (255, 0, 0)  # its tuned image after the gap

    from PIL import ImageFont

    font = ImageFont.load_default(size=11)
    lines = _wrap("word " * 200, font, 100, CAPTION_LINES)
    assert len(lines) == CAPTION_LINES and lines[-1].endswith("...")
    assert all(font.getlength(line) <= 100 for line in lines)
    assert _wrap("short", font, 100, CAPTION_LINES) == ["short"]
    assert LINE_HEIGHT * CAPTION_LINES == 42

    block = {"base_mean": 1.0, "base_mean_ci": [0.9, 1.1], "tuned_mean": 1.2, "tuned_mean_ci": [1.1, 1.3]}
    report = {"scorers": {"a": {"styles": {"x": block, "y": block}}, "b": {"styles": {"x": block}},
                          "c": {"styles": {"x": block}, "display_scale": 100.0}}}
    with Image.open(bar_chart(report, tmp_path / "chart.png", dpi=50)) as chart:
        assert chart.format == "PNG" and chart.size == (3 * 5 * 50, 4 * 50)


def test_build_report_by_hand():
    """Two prompts of style s, one seed, HPS-like raw scores: base (0.20, 0.30), tuned (0.25, 0.25).
    Shown x100: base mean 25, tuned mean 25, medians 25; tuned wins prompt 0 and loses prompt 1: win rate
    (1 + 0) / 2 = 0.5. The win rate is not scaled; scores.jsonl keeps the raw values."""
    from diffusion_dpo.evaluation.reports import build_report

    rows = [{"style": "s", "index": i, "seed": i, "model": m, "scorer": "hpsv2", "score": v}
            for i, (b, t) in enumerate([(0.20, 0.25), (0.30, 0.25)]) for m, v in (("base", b), ("tuned", t))]
    report = build_report(rows, n_seeds=1, scales={"hpsv2": 100.0}, n_boot=500)
    result = report.scorers["hpsv2"]
    assert result.display_scale == 100.0
    assert result.base_mean == pytest.approx(25.0) and result.tuned_mean == pytest.approx(25.0)
    assert result.base_median == pytest.approx(25.0) and result.tuned_median == pytest.approx(25.0)
    assert result.win_rate == 0.5 and result.win_rate_ci == [0.0, 1.0]
    assert result.base_mean_ci == pytest.approx([20.0, 30.0])  # resamples of 2 prompts: 20, 25 or 30
    assert result.styles["s"].n_prompts == 2 and report.n_prompts == 2
    with pytest.raises(ValueError, match="lacks a base or tuned score"):
        build_report(rows[:-1], n_seeds=1)

