"""Sharded training with torch FSDP2 (``fully_shard``): the pieces the engine composes under
``parallel.strategy=fsdp``.

    shard_model(module, blocks, dtype, cpu_offload)   fully_shard each block instance, then the root: every
                                                      parameter becomes a DTensor of which each process holds
                                                      1/N (dim-0 shards)
    clip_grad_norm(params, max_norm)                  the global L2 norm of sharded gradients (local sums of
                                                      squares all-reduced), and the clip
    full_state_dict(module)                           the trainable weights gathered whole (every process
                                                      gets them; for final/ and digests)
    local_shard_bytes(module)                         the bytes of trainable parameters this process holds
    resharded(*modules)                               the shards back in place after a forward without backward
    whole_tensors(state)                              a name -> tensor dict with every DTensor gathered whole
                                                      (collective; what a recipe's own checkpoint state holds)
    copy_into(target, value)                          copy a whole or sharded value into a whole or sharded
                                                      tensor (this process's slice where the target is sharded)

The blocks come from the model's family (``Family.shard_blocks``) or the transformers model's own
``_no_split_modules`` (:func:`no_split_blocks`); the engine never branches on the model type.

Mixed precision (FSDP2's ``MixedPrecisionPolicy``): the shards, the gradients' reduction and the optimizer
state stay fp32 (master weights); with bf16 the gathered parameters are cast to bf16 for the forward and
backward, and gradients are reduced in fp32. fp16 has no FSDP2 counterpart of the GradScaler and is refused.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from diffusion_dpo.config import ConfigError
from diffusion_dpo.run_options import ParallelSection

__all__ = ["ParallelSection", "check_parallel", "clip_grad_norm", "copy_into", "ensure_process_group",
           "full_state_dict", "is_sharded", "local_shard_bytes", "resharded", "whole_tensors", "gathered", "local",
           "modules_of_classes", "no_split_blocks", "shard_model", "unwrapped_optimizer"]

Tensor = torch.Tensor


def modules_of_classes(module: nn.Module, class_names: Iterable[str]) -> list[nn.Module]:
    """The outermost submodules of ``module`` whose class name is in ``class_names`` (a block nested in
    another chosen block is covered by it), in registration order."""
    names, found = set(class_names), []
    covered: set[str] = set()
    for path, sub in module.named_modules():
        if sub is module or any(path.startswith(prefix + ".") for prefix in covered):
            continue
        if type(sub).__name__ in names:
            found.append(sub)
            covered.add(path)
    return found


def no_split_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks the model itself says must not be split across devices (diffusers' and transformers'
    ``_no_split_modules``: transformer blocks, decoder layers), found through wrappers such as peft's."""
    for sub in module.modules():
        names = getattr(type(sub), "_no_split_modules", None)
        if names:
            return modules_of_classes(module, names)
    return []


def shard_model(module: nn.Module, blocks: list[nn.Module], dtype: torch.dtype = torch.float32,
                cpu_offload: bool = False) -> nn.Module:
    """``fully_shard`` each of ``blocks`` (submodules of ``module``), then ``module`` itself, over all
    processes; returns ``module`` (now an FSDPModule). ``dtype``: the compute dtype (bf16 casts the gathered
    parameters; fp32 keeps everything fp32); the shards themselves keep the parameters' dtype (fp32 master
    weights for trained ones). ``cpu_offload``: shards, gradients and optimizer state live on the CPU."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype if dtype != torch.float32 else None,
                                  reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for block in blocks:
        fully_shard(block, mp_policy=policy, offload_policy=offload)
    fully_shard(module, mp_policy=policy, offload_policy=offload)
    return module


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` (or a module inside it) was sharded by :func:`shard_model`."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def _collective_device() -> torch.device:
    """Where collectives run: the GPU under NCCL (also for shards offloaded to the CPU), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def whole(p: Tensor) -> Tensor:
    """A (sharded) parameter's whole value on the CPU; collective for a DTensor."""
    if not hasattr(p, "full_tensor"):
        return p.detach().cpu()
    return p.detach().to(_collective_device()).full_tensor().cpu()


def local(t: Tensor) -> Tensor:
    """This process's shard of a DTensor; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def resharded(*modules: nn.Module) -> None:
    """Put the sharded parameters back in place of any gathered ones in ``modules``. FSDP2 leaves the root
    unit gathered after a forward without backward (a rollout, a reference forward), its parameters plain
    tensors meanwhile: anything that reads or copies parameters as DTensors reshards first. A no-op for a
    module that is not sharded, or already resharded."""
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        for sub in module.modules():
            if isinstance(sub, FSDPModule):
                sub.reshard()


def whole_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with each tensor whole on the CPU (a DTensor gathered: collective, every process calls it
    with the same names in the same order; any other tensor copied)."""
    return {name: whole(value).clone() for name, value in state.items()}


@torch.no_grad()
def copy_into(target: Tensor, value: Tensor) -> None:
    """``target`` takes ``value``'s values (same global shape). A sharded target keeps its own slice of a whole
    value (every process holds the whole value, so nothing is sent), or copies a value sharded like it shard
    for shard; a whole target takes a sharded value gathered (collective)."""
    from torch.distributed.tensor import DTensor

    if isinstance(target, DTensor) and isinstance(value, DTensor):
        target.copy_(value)
    elif isinstance(target, DTensor):
        local(target).copy_(_distribute_whole(value.to(local(target).device, local(target).dtype), target))
    else:
        target.copy_(whole(value) if isinstance(value, DTensor) else value)


def _distribute_whole(value: Tensor, like) -> Tensor:
    """This process's slice of ``value`` (whole, the same on every process) as ``like`` (a DTensor) shards it."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None).to_local()


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """Scale the gradients of ``params`` so their global L2 norm is at most ``max_norm`` (inf: no clip);
    return the norm before clipping (fp32 scalar, the same on every process). A sharded gradient adds the
    squares of this process's shard, summed over the processes; a gradient that is not a DTensor is whole
    on every process and counts once (rank 0's)."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    distributed = dist.is_available() and dist.is_initialized()
    first = not distributed or dist.get_rank() == 0
    device = _collective_device()
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        from torch.distributed.tensor import DTensor

        if isinstance(g, DTensor) or first:
            squares += local(g).detach().float().pow(2).sum().to(device)
    if distributed:
        dist.all_reduce(squares, op=dist.ReduceOp.SUM)
    total = squares.sqrt()
    if max_norm < float("inf") and grads:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            local(g).mul_(scale.to(local(g).device, local(g).dtype))
    return total


def full_state_dict(module: nn.Module, trainable_only: bool = True) -> dict[str, Tensor]:
    """The weights of a sharded ``module`` gathered whole onto the CPU on every process (collective: every
    process must call it), by the same names as the unsharded module's ``named_parameters``; only those
    that require grad when ``trainable_only``."""
    resharded(module)
    wanted = {name for name, p in module.named_parameters() if p.requires_grad or not trainable_only}
    out = {}
    for name, p in module.named_parameters():
        if name in wanted:
            out[name] = whole(p)
    return out


def local_shard_bytes(module: nn.Module, trainable_only: bool = True) -> tuple[int, int]:
    """(bytes this process holds, bytes of the whole parameters) over ``module``'s parameters (those that
    require grad when ``trainable_only``), measured from the DTensors' local shards."""
    held = whole = 0
    for p in module.parameters():
        if p.requires_grad or not trainable_only:
            held += local(p).numel() * p.element_size()
            whole += p.numel() * p.element_size()
    return held, whole


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[nn.Module | None]:
    """Collective: the sharded ``module`` with its whole parameters (fp32, CPU) in place of the shards on
    process 0 for the duration of the block (to write final/ with the family's own save), ``None`` on the
    others; the shards are put back on leaving. Gathered one parameter at a time, so the accelerator never
    holds more than one whole parameter beyond the shards."""
    import torch.distributed as dist

    first = not dist.is_initialized() or dist.get_rank() == 0
    resharded(module)
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    wholes: dict[int, nn.Parameter | None] = {}  # by the shard's id: a tied parameter stays one parameter
    for owner in module.modules():
        for leaf, p in list(owner.named_parameters(recurse=False)):
            if id(p) not in wholes:
                value = whole(p)
                wholes[id(p)] = nn.Parameter(value, requires_grad=p.requires_grad) if first else None
            if first:
                swapped.append((owner, leaf, p))
                owner._parameters[leaf] = wholes[id(p)]
    try:
        yield module if first else None
    finally:
        for owner, leaf, p in swapped:
            owner._parameters[leaf] = p


def check_parallel(parallel, mixed_precision: str) -> None:
    """The parallel.* combinations this engine cannot run, refused before anything is made."""
    if parallel.strategy != "fsdp":
        return
    if mixed_precision == "fp16":
        raise ConfigError("config key 'parallel.strategy': fsdp runs with mixed_precision=bf16 or no (fp32); "
                          "fp16 needs a gradient scaler FSDP2 shards do not have: use mixed_precision=bf16, or "
                          "parallel.strategy=ddp with fp16")
    if parallel.cpu_offload and not torch.cuda.is_available():
        raise ConfigError("config key 'parallel.cpu_offload': expected false without a CUDA GPU (the weights "
                          "are in CPU memory already), got true")


def ensure_process_group() -> None:
    """FSDP2 needs a process group even on one process: launched without torchrun or accelerate launch,
    form one of this process alone."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def unwrapped_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper (what torch.distributed.checkpoint reads)."""
    return getattr(optimizer, "optimizer", optimizer)
