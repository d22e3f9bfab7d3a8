"""Video preference pairs for a video family (Wan): pairs of frame folders, animated WebP and GIF files read
as [3, F, R, R] pixels and encoded whole by the video VAE; label writing video pairs that train reads back;
the frame-consistency figure; the errors (frame count, sizes, unreadable files, movie files without imageio,
videos for an image family)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_dpo import models
from diffusion_dpo.config import load_config
from diffusion_dpo.data import DataConfig, PreferencePairs
from diffusion_dpo.data.videos import open_clip, pack_frames
from diffusion_dpo.errors import InputError
from diffusion_dpo.evaluation.video import frame_consistency
from diffusion_dpo.tiny import build_tiny_pipeline

LN2 = 0.6931471805599453


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("wan") / "wan", family="wan"))


def moving_square(frames: int, colour, step: int = 4, size: int = 32) -> list:
    """A square moving right by ``step`` px a frame on black."""
    out = []
    for t in range(frames):
        image = np.zeros((size, size, 3), np.uint8)
        image[12:20, 2 + step * t:10 + step * t] = colour
        out.append(Image.fromarray(image))
    return out


def write_pairs(root: Path, n: int = 4, frames: int = 5, loser_frames: int | None = None) -> Path:
    """JSONL pairs: the winner a folder of PNG frames, the loser an animated WebP file (label 0)."""
    lines = []
    for i in range(n):
        folder = root / f"win{i}"
        folder.mkdir(parents=True)
        for t, frame in enumerate(moving_square(frames, (220, 30, 30))):
            frame.save(folder / f"{t:03d}.png")
        (root / f"lose{i}.webp").write_bytes(pack_frames(moving_square(loser_frames or frames, (30, 30, 220))))
        lines.append(json.dumps({"caption": "a red square moving right", "image_0": f"win{i}",
                                 "image_1": f"lose{i}.webp", "label": 0}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def train_config(path, source, out, *overrides):
    from diffusion_dpo.recipes import train

    return load_config(train.TrainConfig, [], [
        f"model.pretrained={path}", f"data.source={source}", "data.resolution=32", f"output_dir={out}",
        "optim.learning_rate=1e-2", "optim.scale_lr=false", "optim.warmup_steps=0", "optim.batch_size=2",
        "log_every=1", "checkpoint_every=0", "optim.max_steps=2", "tensorboard=false", *overrides])


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def moved(base: str, final: str) -> bool:
    from diffusion_dpo.families import by_name

    family = by_name("wan")
    a = family.load_denoiser(str(Path(base) / "transformer")).state_dict()
    b = family.load_denoiser(final).state_dict()
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_frame_consistency_by_hand():
    """Two 1x1 frames 0.2 then 0.6: 1 - 0.4 = 0.6. Three frames 0, 0.5, 0.5: ((1 - 0.5) + (1 - 0)) / 2 =
    0.75. A still video 1; black/white flicker 0; PIL frames read as value / 255 give the same."""
    two = torch.tensor([0.2, 0.6]).view(1, 1, 2, 1, 1).expand(1, 3, 2, 1, 1)
    three = torch.tensor([0.0, 0.5, 0.5]).view(1, 1, 3, 1, 1).expand(1, 3, 3, 2, 2)
    flicker = torch.tensor([0.0, 1.0, 0.0]).view(1, 1, 3, 1, 1).expand(1, 3, 3, 4, 4)
    assert frame_consistency(two).tolist() == pytest.approx([0.6])
    assert frame_consistency(three).tolist() == pytest.approx([0.75])
    assert frame_consistency(flicker).tolist() == pytest.approx([0.0])
    assert frame_consistency(torch.full((2, 3, 4, 2, 2), 0.3)).tolist() == pytest.approx([1.0, 1.0])
    grey = [Image.new("RGB", (2, 2), (v, v, v)) for v in (0, 51, 51)]  # 0, 0.2, 0.2
    assert frame_consistency([grey]).tolist() == pytest.approx([(0.8 + 1.0) / 2])


def test_clips_read_from_folders_webp_and_gif(tmp_path):
    frames = moving_square(5, (200, 100, 0))
    (tmp_path / "f").mkdir()
    for t, frame in enumerate(frames):
        frame.save(tmp_path / "f" / f"{t}.png")
    gif = tmp_path / "v.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=60, loop=0)
    webp = pack_frames(frames)
    for value in (str(tmp_path / "f"), webp, {"bytes": None, "path": str(tmp_path / "f")}, str(gif)):
        clip = open_clip(value, "here")
        assert len(clip) == 5 and all(c.mode == "RGB" for c in clip)
    for got, want in zip(open_clip(webp, "here"), frames):  # lossless
        assert np.array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(InputError, match="imageio"):
        (tmp_path / "v.mp4").write_bytes(b"\0" * 16)
        open_clip(str(tmp_path / "v.mp4"), "row 0 column jpg_0")


def test_video_pairs_batch_as_five_d_pixels_and_train(wan, tmp_path):
    """Frame-folder winners against WebP losers: batches of pixels [B, 2, 3, 5, 32, 32], latents
    [B, 2, 2C, 2, 8, 8]; DPO starts at ln 2 and moves the weights; precompute caches the video latents and
    trains the same first loss."""
    source = write_pairs(tmp_path / "pairs")
    cfg = DataConfig(source=str(source), resolution=32, caption_dropout=0.0)
    batch = next(PreferencePairs(cfg, seed=0).batches(2))
    assert batch["pixel_values"].shape == (2, 2, 3, 5, 32, 32)
    assert batch["pixel_values"][0, 0, 0].max() > batch["pixel_values"][0, 1, 0].max()  # red winner first
    comps = models.load_components(wan)
    encoded = models.encode_pair_batch(comps, batch)
    assert encoded.moments.shape == (2, 2, 8, 2, 8, 8)
    from diffusion_dpo.recipes import train

    result = train.run(train_config(wan, source, tmp_path / "run", "data.random_flip=false"))
    first = losses(tmp_path / "run")
    assert abs(first[0] - LN2) < 1e-6 and moved(wan, result.final)
    train.run(train_config(wan, source, tmp_path / "cached", "data.random_flip=false", "precompute=true"))
    assert (tmp_path / "cached" / "latent_cache").is_dir()
    assert abs(losses(tmp_path / "cached")[0] - LN2) < 1e-6


def test_label_writes_video_pairs_that_train_reads(wan, tmp_path):
    """label at sampling.num_frames=5: each candidate a 5-frame video scored by its frames' mean, stored as
    lossless animated WebP bytes in jpg_0 / jpg_1; train runs DPO on them (ln 2 first, weights move);
    evaluate of the tuned model writes animated WebP videos and reports frame consistency."""
    import pyarrow.parquet as pq

    from diffusion_dpo.recipes import label, train
    from scorers import load_scorer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "pairs"
    label.run(load_config(label.LabelConfig, [], [
        f"model.pretrained={wan}", f"prompts={prompts}", "scorer.name=brightness", "sampling.num_frames=5",
        "sampling.num_inference_steps=2", "sampling.height=32", "sampling.width=32", "candidates_per_prompt=2",
        f"output_dir={out}"]))
    table = pq.read_table(sorted(out.glob("*.parquet"))[0]).to_pylist()
    assert len(table) == 2
    row = table[0]
    clip = open_clip(row["jpg_0"], "row 0")
    assert len(clip) == 5 and clip[0].size == (32, 32) and (row["height"], row["width"]) == (32, 32)
    want = float(load_scorer("brightness").score(clip, [row["caption"]] * 5).mean())
    assert row["score_0"] == pytest.approx(want, abs=1e-5)
    result = train.run(train_config(wan, out, tmp_path / "run"))
    assert abs(losses(tmp_path / "run")[0] - LN2) < 1e-6 and moved(wan, result.final)
    from diffusion_dpo.recipes import evaluate

    report = evaluate.run(load_config(evaluate.EvaluateConfig, [], [
        f"model.pretrained={wan}", f"model.denoiser={result.final}", f"prompts={prompts}", "seeds=1",
        "scorers=brightness", "sampling.num_inference_steps=2", "sampling.height=32", "sampling.width=32",
        "sampling.num_frames=5", "n_boot=50", "grid_cell=32", f"output_dir={tmp_path / 'eval'}"]))
    videos = sorted((tmp_path / "eval").rglob("*.webp"))
    assert len(videos) == 4
    with Image.open(videos[0]) as video:  # playable: an animated WebP of every frame
        assert video.is_animated and video.n_frames == 5
    assert set(report.scorers) == {"brightness", "frame_consistency"}


@pytest.mark.parametrize("case", ["frames", "sizes", "mixed", "unreadable"])
def test_video_pair_errors_name_the_row(wan, tmp_path, case):
    """4 frames (not 4 k + 1), frames of two sizes, a video against an image, and an undecodable file
    are errors naming the row (the last one a counted bad row, the run stopping at 0 usable pairs)."""
    from diffusion_dpo.recipes import train

    source = write_pairs(tmp_path / "p", n=2, frames=4 if case == "frames" else 5)
    if case == "sizes":
        Image.new("RGB", (40, 32)).save(tmp_path / "p" / "win0" / "002.png")
    if case == "mixed":
        for i in range(2):
            Image.new("RGB", (32, 32)).save(tmp_path / "p" / f"lose{i}.webp", format="WEBP")
    if case == "unreadable":
        for i in range(2):
            (tmp_path / "p" / f"lose{i}.webp").write_bytes(b"not a video")
    match = {"frames": r"4-frame videos; the VAE takes 4 k \+ 1", "sizes": "frame 2 is 40x32",
             "mixed": "5-frame video and column jpg_1 an image", "unreadable": "cannot decode"}[case]
    with pytest.raises(InputError, match=match) as error:
        train.run(train_config(wan, source, tmp_path / "run"))
    assert "row" in str(error.value)


def test_videos_for_an_image_family_are_refused(tmp_path):
    from diffusion_dpo.recipes import train

    tiny = build_tiny_pipeline(tmp_path / "sd")
    source = write_pairs(tmp_path / "p", n=2)
    with pytest.raises(InputError, match="5-frame videos, but the sd family trains on images"):
        train.run(train_config(str(tiny), source, tmp_path / "run", "optim.learning_rate=1e-5"))
