"""The reference model of a preference loss, one abstraction for diffusion and language models.

    frozen copy    a full fine-tune: a frozen copy of the starting model (or another model) in the compute dtype
    adapter off    LoRA: the policy itself with its adapter disabled, so no second model is held in memory
    precomputed    (LLM DPO) values computed once before training and read from the batch

``reference.model()`` is a context manager yielding the module to run the reference forward with (call it under
``torch.no_grad``); a precomputed reference has no model and its recipe reads the values from the batch.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class FrozenCopy:
    """A frozen module; with ``offload_to`` it lives in CPU memory and moves to that device only for the
    block of :meth:`model` (parallel.frozen=offload)."""

    kind = "copy"

    def __init__(self, module: nn.Module, offload_to: torch.device | str | None = None):
        self.module = module.eval().requires_grad_(False)
        self.offload_to = offload_to
        if offload_to is not None:
            self.module.to("cpu")

    @classmethod
    def of(cls, policy: nn.Module, dtype: torch.dtype | None = None) -> "FrozenCopy":
        """A copy of ``policy`` as it is now (the starting weights), cast to ``dtype`` if given."""
        module = copy.deepcopy(policy)
        if dtype is not None:
            module = module.to(dtype)
        return cls(module)

    @contextmanager
    def model(self) -> Iterator[nn.Module]:
        if self.offload_to is None:
            yield self.module
            return
        self.module.to(self.offload_to)
        try:
            yield self.module
        finally:
            self.module.to("cpu")


class AdapterOff:
    """The policy (unwrapped, not a DDP wrapper) with its LoRA adapters disabled until the block exits.
    Works for diffusers models (``disable_adapters``) and peft models (``disable_adapter()`` context)."""

    kind = "adapter"

    def __init__(self, policy: nn.Module):
        self.policy = policy

    @contextmanager
    def model(self) -> Iterator[nn.Module]:
        if hasattr(self.policy, "disable_adapter"):  # a peft PeftModel
            with self.policy.disable_adapter():
                yield self.policy
            return
        self.policy.disable_adapters()
        try:
            yield self.policy
        finally:
            self.policy.enable_adapters()  # also turns requires_grad back on for the adapter weights


class Precomputed:
    """Reference values that were computed before training and travel in the batch."""

    kind = "precomputed"

    @contextmanager
    def model(self) -> Iterator[None]:
        yield None
