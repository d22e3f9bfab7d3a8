"""A feed of in-memory examples whose position can be saved and restored, for exact resume.

Each epoch visits the examples in a permutation seeded by (seed, epoch). With P processes, the permutation is
cut into global batches of ``batch_size x P`` examples and process r takes the r-th ``batch_size`` of each, so
one step of P processes sees the same examples as one process with a P times larger batch. A last, incomplete
global batch is dropped; when the examples do not fill even one, each epoch is a single smaller batch (every
process its share) rather than nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from accelerate.utils import send_to_device

from diffusion_dpo.errors import InputError


class ExampleFeed:
    """Batches of ``collate(list of examples)`` (its tensors moved to ``device``), forever, epoch after epoch;
    see the module docstring."""

    def __init__(self, examples: Sequence[Any], collate: Callable[[list[Any]], Any], *, seed: int,
                 rank: int = 0, world: int = 1, device: torch.device | str = "cpu",
                 name: str = "training examples"):
        if len(examples) < world:
            raise InputError(f"{name}: {len(examples)} examples cannot be shared by {world} processes "
                             "(expected at least one per process)")
        self.examples, self.collate = examples, collate
        self.seed, self.rank, self.world, self.device = seed, rank, world, device
        self.epoch = 0  # epochs completed
        self.position = 0  # batches of the current epoch already handed out

    def batches_per_epoch(self, batch_size: int) -> int:
        """Batches each process takes per epoch (at least 1)."""
        return max(1, len(self.examples) // (batch_size * self.world))

    def _epoch_batches(self, batch_size: int) -> list[list[int]]:
        """This process's batches of example indices in the current epoch."""
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.epoch)).tolist()
        span = batch_size * self.world
        if len(order) < span:  # fewer examples than one global batch: one batch, each process its share
            return [order[self.rank::self.world]]
        starts = range(0, len(order) - span + 1, span)
        return [order[s + self.rank * batch_size: s + (self.rank + 1) * batch_size] for s in starts]

    def batches(self, batch_size: int) -> Iterator[Any]:
        """Collated batches from the saved position on. The position advances before a batch is handed out,
        so a checkpoint taken after a step resumes at the next batch."""
        while True:
            epoch = self._epoch_batches(batch_size)
            while self.position < len(epoch):
                indices = epoch[self.position]
                self.position += 1
                yield send_to_device(self.collate([self.examples[i] for i in indices]), self.device)
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def regroup(self, states: list[dict[str, int]]) -> dict[str, int]:
        """This process's position from every process's of a run with another number of processes and the
        same examples per micro-batch over all of them: each global batch is the same span of the epoch's
        permutation, so the count of batches handed out carries over as it is."""
        return dict(states[0])

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class Feed(Protocol):
    """A data feed with an exact position: batches continue where ``load_state_dict`` left them."""

    def batches(self, batch_size: int) -> Iterator[Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def data_position(feed: Feed, state: dict[str, Any], world: int) -> dict[str, Any]:
    """This process's data position: its own, or, when the checkpoint was written by another number of
    processes (same examples per micro-batch over all processes), the feed's mapping of every old
    process's position onto this process (``regroup``)."""
    if state["world_size"] == world:
        return state["rank_state"]["data"]
    regroup = getattr(feed, "regroup", None)
    if regroup is None:
        raise InputError(f"resume: checkpoint written by {state['world_size']} processes, this run has {world}, "
                         f"and its data feed ({type(feed).__name__}) cannot map its position onto another number "
                         "of processes; resume with the same number of processes")
    return regroup([s["data"] for s in state["rank_states"]])
