"""The reference model of a preference loss, one abstraction for diffusion and language models.

    frozen copy    a full fine-tune: a frozen copy of the starting model (or another model) in the compute dtype
    adapter off    LoRA: the policy itself with its adapter disabled, so no second model is held in memory
    second adapter LoRA, a reference that moves (online DPO's refreshes): a frozen copy of the policy's adapter
                   on the same base, so the only second copy is of the adapter's weights
    precomputed    (LLM DPO) values computed once before training and read from the batch

``reference.model()`` is a context manager yielding the module to run the reference forward with (call it under
``torch.no_grad``); a precomputed reference has no model and its recipe reads the values from the batch.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from diffusion_dpo.errors import InputError


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


class SecondAdapter:
    """A frozen second LoRA adapter named ``reference`` on the policy's own base (a diffusers model with a peft
    adapter), holding a copy of the policy adapter's weights (made at set-up and by :meth:`refresh`). Its
    forward runs the policy with that adapter active instead of its own; it is never trained: it requires no
    grad outside the block (inside it, under ``torch.no_grad``, it is the active one) and is left out of
    checkpointing.trainable_state_dict and the optimizer. Memory: one adapter's weights, not a denoiser."""

    kind = "second_adapter"
    NAME = "reference"

    def __init__(self, policy: nn.Module, policy_adapter: str = "default"):
        self.policy, self.policy_adapter = policy, policy_adapter
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: it is meant
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            policy.add_adapter(copy.deepcopy(policy.peft_config[policy_adapter]), adapter_name=self.NAME)
        policy.set_adapter(policy_adapter)  # add_adapter made the new one active and trainable; undo that
        params = dict(policy.named_parameters())
        mark, ours = f".{policy_adapter}.", f".{self.NAME}."
        # the policy adapter's parameter name by the reference adapter's: the parameters themselves are looked
        # up at every use, so a policy sharded after this (FSDP2 replaces its parameters) is still followed
        self.names = {name.replace(mark, ours): name for name in params
                      if mark in name and name.replace(mark, ours) in params}
        if not self.names:
            raise ValueError(f"the policy has no weights of a LoRA adapter named {policy_adapter!r}")
        with torch.no_grad():
            for source, target in self.pairs.values():
                target.data = source.detach().clone()  # the policy adapter's dtype (fp32), not the base's
                target.requires_grad_(False)

    @property
    def pairs(self) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """(policy adapter weight, reference adapter weight) by the reference's parameter name; DTensors sharded
        alike when the policy is sharded."""
        params = dict(self.policy.named_parameters())
        return {ours: (params[theirs], params[ours]) for ours, theirs in self.names.items()}

    @torch.no_grad()
    def refresh(self) -> None:
        """The reference adapter becomes a copy of the policy adapter as it is now."""
        for source, target in self.pairs.values():
            target.copy_(source)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The reference adapter's weights by parameter name (CPU copies)."""
        return {name: target.detach().cpu().clone() for name, (_, target) in self.pairs.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.pairs.keys():
            raise InputError("resume: the checkpoint's reference adapter weights do not match this model's LoRA "
                             "layers (written with another model.lora_rank or model.lora_targets?)")
        for name, (_, target) in self.pairs.items():
            target.copy_(state[name])

    @contextmanager
    def model(self) -> Iterator[nn.Module]:
        self.policy.set_adapter(self.NAME)
        try:
            yield self.policy
        finally:
            self.policy.set_adapter(self.policy_adapter)  # the policy's trainable again, the reference frozen


class Precomputed:
    """Reference values that were computed before training and travel in the batch."""

    kind = "precomputed"

    @contextmanager
    def model(self) -> Iterator[None]:
        yield None
