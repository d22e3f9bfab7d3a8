"""``diffusion-dpo demo family=video``: the demo on the shipped Wan-layout video base of the moving-shapes world,
offline (label -> DPO on video pairs -> evaluate) and online (method=grpo), at reduced sizes."""

import json

import pytest

from diffusion_dpo.config import ConfigError, load_config
from diffusion_dpo.errors import InputError
from diffusion_dpo.families import detect
from diffusion_dpo.recipes import demo, demo_common, demo_online

VIDEO_BASE = demo_common.BASES["video"]
TINY = [
    "family=video", "world.train_prompts=3", "world.held_out_prompts=2", "eval_seeds=1",
    "sampling.num_inference_steps=2", "n_boot=20", "grid_prompts=2",
]
TINY_OFFLINE = ["candidates_per_prompt=2", "train.optim.max_steps=2", "train.optim.batch_size=2",
                "train.optim.warmup_steps=0", "sft=false"]
TINY_GRPO = ["method=grpo", "online.optim.max_steps=1", "online.prompts_per_step=2", "online.group_size=2",
             "online.sampling.num_inference_steps=2", "online.train_steps=1", "online.updates_per_epoch=1",
             "online.optim.batch_size=4"]


def test_shipped_video_base_is_a_small_wan_pipeline_that_makes_clips():
    import torch
    from diffusers import WanPipeline

    files = [p for p in VIDEO_BASE.rglob("*") if p.is_file()]
    assert detect(str(VIDEO_BASE)).name == "wan"
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    summary = json.loads((VIDEO_BASE / "train_summary.json").read_text())
    assert summary["family"] == "video" and summary["frames"] == 5
    pipe = WanPipeline.from_pretrained(str(VIDEO_BASE))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a red circle moving left on a blue background", num_frames=5, height=32, width=32,
               num_inference_steps=2, guidance_scale=4.0, max_sequence_length=pipe.tokenizer.model_max_length,
               generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert out.shape == (1, 5, 32, 32, 3)


def test_video_family_defaults_world_and_base_check(tmp_path):
    video = demo.resolve_defaults(load_config(demo.DemoConfig, [], ["family=video"]))
    assert video.train.loss.beta == demo.FAMILY_TRAIN_DEFAULTS["video"]["loss"]["beta"]
    assert demo_common.check_base(video) == str(VIDEO_BASE) and demo_common.num_frames(video) == 5
    train, held_out = demo_common.write_prompts(video, tmp_path / "prompts")
    assert len(train.read_text().splitlines()) == 378 and len(held_out.read_text().splitlines()) == 126
    assert "moving" in held_out.read_text()
    for keys in (["family=video", "sampling.num_frames=4"], ["sampling.num_frames=5"]):
        with pytest.raises(ConfigError, match="sampling.num_frames"):
            demo_common.check_base(load_config(demo.DemoConfig, [], keys))
    with pytest.raises(InputError, match="family=video but .* is a sd pipeline"):
        demo.run(load_config(demo.DemoConfig, [], ["family=video", f"base={demo_common.DEFAULT_BASE}",
                                                   f"output_dir={tmp_path / 'a'}"]))
    with pytest.raises(InputError, match="family=flow but .* is a wan pipeline"):
        demo.run(load_config(demo.DemoConfig, [], ["family=flow", f"base={VIDEO_BASE}",
                                                   f"output_dir={tmp_path / 'b'}"]))


def _check_report(saved: dict) -> None:
    assert 0 <= saved["win_rate_ci"][0] <= saved["win_rate"] <= saved["win_rate_ci"][1] <= 1
    assert 0 <= saved["base_mean"] <= 1 and 0 <= saved["tuned_mean"] <= 1
    assert set(saved["frame_consistency"]) == {"base", "tuned"}
    assert all(0 <= v <= 1 for v in saved["frame_consistency"].values())


def test_video_demo_runs_label_dpo_evaluate_on_clips(tmp_path):
    out = tmp_path / "demo"
    report = demo.run(load_config(demo.DemoConfig, [], [*TINY, *TINY_OFFLINE, f"output_dir={out}"]))
    saved = json.loads((out / "report.json").read_text())
    _check_report(saved)
    assert saved["win_rate"] == report.rounds[0].dpo.win_rate and saved["config"]["family"] == "video"
    assert list((out / "round-1" / "eval").rglob("*.webp"))  # the clips, beside their three-frame strips
    assert detect(str(out / "round-1" / "policy")).name == "wan" and (out / "grid.png").is_file()


def test_video_demo_grpo_tunes_online_on_clips(tmp_path):
    out = tmp_path / "grpo"
    report = demo_online.run_online(load_config(demo.DemoConfig, [], [*TINY, *TINY_GRPO, f"output_dir={out}"]))
    saved = json.loads((out / "report.json").read_text())
    _check_report(saved)
    assert saved["method"] == "grpo" and saved["family"] == "video" and report["images_generated"] == 4
