"""Reward-hacking monitors on synthetic images worked out by hand."""

import io

import pytest
import torch
from PIL import Image

from diffusion_dpo.errors import InputError
from diffusion_dpo.online.monitors import batch_means, image_statistics


def four_pixels():
    # red, black, grey 51/255 = 0.2, dark grey 10/255 -> one image [1, 3, 2, 2]
    red, black, grey, dark = (1.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.2, 0.2, 0.2), (10 / 255,) * 3
    pixels = torch.tensor([[red, black], [grey, dark]])  # [H, W, 3]
    return pixels.permute(2, 0, 1).unsqueeze(0)


def test_statistics_by_hand():
    stats = image_statistics(four_pixels())
    # luma (0.299 + 0 + 0.2 + 10/255) / 4; saturation (1 + 0 + 0 + 0) / 4; black and dark grey are below 0.05
    assert stats["brightness"].item() == pytest.approx((0.299 + 0.2 + 10 / 255) / 4, abs=1e-9)
    assert stats["saturation"].item() == pytest.approx(0.25, abs=1e-12)
    assert stats["near_black"].item() == 0.5
    assert batch_means(stats)["near_black"] == 0.5


def test_tensor_and_pil_agree_and_jpeg_size_is_pil_quality_95():
    g = torch.Generator().manual_seed(0)
    images = torch.cat([torch.full((1, 3, 64, 64), 0.5), torch.rand(1, 3, 64, 64, generator=g)])
    from_tensor = image_statistics(images)
    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]
    from_pil = image_statistics(pil)
    for name in from_tensor:
        assert torch.equal(from_tensor[name], from_pil[name]), name
    buffer = io.BytesIO()
    pil[1].save(buffer, format="JPEG", quality=95)
    assert from_tensor["jpeg_kb"][1].item() == buffer.tell() / 1000
    # uniform noise compresses far worse than a flat grey
    assert from_tensor["jpeg_kb"][1] > 3 * from_tensor["jpeg_kb"][0]


def test_black_threshold_edges():
    # 12/255 = 0.047 is near black at the default 0.05, 13/255 = 0.051 is not; a threshold of 0.01 spares both
    images = torch.tensor([12 / 255, 13 / 255]).view(2, 1, 1, 1).expand(2, 3, 4, 4).contiguous()
    assert image_statistics(images)["near_black"].tolist() == [1.0, 0.0]
    assert image_statistics(images, black_threshold=0.01)["near_black"].tolist() == [0.0, 0.0]
    with pytest.raises(InputError, match="black_threshold"):
        image_statistics(images, black_threshold=0.0)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        image_statistics(images + 0.99)
