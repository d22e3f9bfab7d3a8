"""The published transformer configs scripts/bench_train.py counts FLOPs on (FLUX.2 [klein] 4B, Z-Image,
Wan 2.1 T2V 1.3B, and Qwen-Image from the shipped architecture folder): each builds on the meta device with
its published size, and a whole Diffusion-DPO step through it is counted there (at a small resolution, so
the test is quick; docs/BENCHMARKS.md gives the native-resolution numbers)."""

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"
spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
bench_train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_train)

# Billions of parameters as the models are named or published: FLUX.2 [klein] "4B", Z-Image "6B" (6.15B),
# Wan 2.1 "1.3B", Qwen-Image "20B".
SIZES = {"flux2-klein-4b": (3.8, 4.0), "z-image": (6.1, 6.2), "wan21-t2v-1.3b": (1.3, 1.5),
         "qwen-image": (20.0, 20.5)}


def _args(model: str, resolution: int) -> argparse.Namespace:
    return argparse.Namespace(model=model, unet_channels="", batch_size=1, resolution=resolution)


@pytest.mark.parametrize("model", sorted(SIZES))
def test_the_denoiser_has_its_published_size(model):
    with torch.device("meta"):
        denoiser = bench_train.build_denoiser(_args(model, 0))
    low, high = SIZES[model]
    assert low <= sum(p.numel() for p in denoiser.parameters()) / 1e9 <= high


@pytest.mark.parametrize("model", sorted(SIZES))
def test_a_dpo_step_is_counted_on_meta_tensors(model):
    small = bench_train.count_step_flops(_args(model, 128))
    larger = bench_train.count_step_flops(_args(model, 256))
    assert 0 < small < larger  # more image tokens, more FLOPs


def test_wan_latents_are_its_pipelines_81_frames_at_480_by_832():
    assert bench_train.latent_shape("wan21-t2v-1.3b", 480) == (16, 21, 60, 104)
    assert bench_train.latent_shape("flux2-klein-4b", 1024) == (128, 64, 64)
