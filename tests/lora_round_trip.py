"""A family's LoRA written by ``save_lora`` and read back by its own pipeline's ``load_lora_weights``."""

import torch

from diffusion_dpo import models


def lora_round_trip(family, pipeline: str, folder) -> dict[str, torch.Tensor]:
    """Attach a rank-2 adapter on ``family.lora_targets`` of ``pipeline``'s transformer with random lora_B (so
    every adapter weight differs from its initialisation), save it into ``folder``, load it into the
    pipeline, and check each adapter weight came back bit for bit. Returns the adapted weights by name."""
    transformer = family.load_denoiser(pipeline + "/transformer")
    models.attach_lora(transformer, rank=2, targets=list(family.lora_targets))
    with torch.no_grad():
        for key, p in transformer.named_parameters():
            if "lora_B" in key:
                p.normal_()
    family.save_lora(transformer, folder)
    loaded = dict(family.load_pipeline(pipeline, lora=str(folder)).transformer.named_parameters())
    adapted = {k: p for k, p in transformer.named_parameters() if "lora_" in k}
    for key, p in adapted.items():
        assert torch.equal(loaded[key.replace(".default.", ".default_0.")], p), key
    return adapted
