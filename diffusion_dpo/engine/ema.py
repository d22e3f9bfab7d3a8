"""An exponential moving average (EMA) of a module's trained weights, as every training command keeps it
when ``ema.decay`` > 0.

At optimizer step ``s`` (counted from 1, after the step's update; skipped non-finite steps do not update):

    s <  start_step                     ema = weights                                  (a copy)
    s >= start_step and s % every == 0  ema = decay * ema + (1 - decay) * weights      (Polyak averaging)

the exponential form of Polyak & Juditsky's iterate averaging (1992), as diffusers' ``EMAModel.step``
computes it without its optional warm-up of the decay (``min(decay, (1 + s) / (10 + s))``): ``decay`` is
used as given from the first update. The shadow weights are fp32 copies of the parameters that require
grad (the LoRA adapter, or the whole denoiser), made with ``p.detach().clone().float()`` so that under
FSDP2 they are DTensors sharded like the parameters; every update is an elementwise op on matching tensors.

The section's keys (``EMASection``) live in diffusion_dpo.config, which every training config embeds.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from diffusion_dpo.engine.sharding import copy_into, resharded
from diffusion_dpo.errors import InputError
from diffusion_dpo.run_options import EMASection

Tensor = torch.Tensor

__all__ = ["EMA", "EMASection", "ShadowWeights"]


def trained_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that require grad, by name (checkpointing.trainable_state_dict's names)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


class ShadowWeights:
    """An fp32 copy of ``module``'s trained parameters that can be blended towards them and swapped in: the
    storage of the EMA below, and of DiffusionNFT's sampling ("old") policy.

    The parameters are looked up by name at every use (not held), so a module whose parameters were
    replaced after this was built (sharding) is still followed, as long as the names stay."""

    def __init__(self, module: nn.Module):
        self.module = module
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {name: p.detach().clone().float()
                                              for name, p in trained_parameters(module).items()}

    def _params(self) -> dict[str, nn.Parameter]:
        resharded(self.module)  # the DTensors the shadow matches, not a forward's gathered parameters
        params = trained_parameters(self.module)
        if params.keys() != self.shadow.keys():
            raise RuntimeError("the module's trained parameters changed names since the shadow was built")
        return params

    @torch.no_grad()
    def blend(self, decay: float) -> None:
        """shadow = decay * shadow + (1 - decay) * weights (decay 0: a copy of the weights)."""
        for name, p in self._params().items():
            self.shadow[name].mul_(decay).add_(p.detach().float(), alpha=1 - decay)

    @torch.no_grad()
    def reset(self) -> None:
        """The shadow becomes the weights as they are now."""
        for name, p in self._params().items():
            self.shadow[name].copy_(p.detach())

    def state_dict(self) -> dict[str, Tensor]:
        """The fp32 shadow weights by parameter name (DTensors under FSDP2)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor], where: str) -> None:
        """Restore saved shadow weights, whole or sharded like the module's (a sharded shadow keeps its slice of
        a whole one); the names and shapes must be this module's (``where`` names the file)."""
        if state.keys() != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - state.keys()), sorted(state.keys() - self.shadow.keys())
            raise InputError(f"{where}: the EMA weights do not fit this run's trainable parameters (another "
                             f"model or model.lora_rank?): missing {missing[:3]}, unexpected {extra[:3]}")
        for name, value in state.items():
            if tuple(value.shape) != tuple(self.shadow[name].shape):
                raise InputError(f"{where}: EMA weight {name} has shape {tuple(value.shape)}, this run's "
                                 f"parameter has {tuple(self.shadow[name].shape)}")
            copy_into(self.shadow[name], value)

    @contextmanager
    def swapped_in(self) -> Iterator[nn.Module]:
        """The module with the shadow weights (cast to each parameter's dtype) in place of the trained ones until
        the block exits; then the trained weights come back bit for bit (evaluation, final/, or sampling with an older policy). Holds one
        extra copy of the trained parameters meanwhile."""
        params = self._params()
        with torch.no_grad():
            trained = {name: p.detach().clone() for name, p in params.items()}
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(trained[name])


class EMA(ShadowWeights):
    """The EMA of ``module``'s trained parameters, with ``section``'s decay, cadence and start step."""

    def __init__(self, module: nn.Module, section: EMASection):
        if not 0 < section.decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {section.decay}")
        super().__init__(module)
        self.section = section

    def update(self, step: int) -> None:
        """Fold the weights after optimizer step ``step`` (1-based) into the average (module docstring)."""
        s = self.section
        if step < s.start_step:
            self.reset()
        elif step % s.every == 0:
            self.blend(s.decay)
