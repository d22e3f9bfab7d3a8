"""Where a training step's encoded pairs come from: encoded as they arrive, or from a pre-computed cache.

Both yield :class:`~diffusion_dpo.models.PairBatch` (VAE posterior moments, text and per-image conditioning)
and resume exactly through ``state_dict()`` / ``load_state_dict()``.

* :class:`OnlinePairs` runs the frozen VAE and text encoder(s) on each batch of ``PreferencePairs``.
* ``precompute``: :func:`build_latent_cache` encodes every pair once (each process its epoch-0 share
  of the rows, all processes in parallel) into ``<output_dir>/latent_cache/``; :class:`CachedPairs` then
  trains from it without the VAE or text encoders (T5 included) in memory. The cache holds the VAE posterior (mean and
  log-variance), not one sample, so every step still draws a fresh latent; with ``data.random_flip`` it
  holds both orientations of each pair. It visits the rows in the same per-epoch order and applies the same
  per-pair flip and caption-dropout draws as ``PreferencePairs`` (``data.pair_draws``), so a cached run sees
  what an online run sees. A random crop (``data.center_crop=false``) cannot be cached and is refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from diffusion_dpo.data import DataConfig, PreferencePairs, pair_draws
from diffusion_dpo.errors import InputError
from diffusion_dpo.models import Components, PairBatch, encode_pair_batch, encode_prompts

META_FILE = "meta.json"


class OnlinePairs:
    """Encoded batches of ``data`` (a PreferencePairs), encoded on ``device`` as they arrive."""

    def __init__(self, data: PreferencePairs, components: Components, device: torch.device):
        self.data, self.components, self.device = data, components, device

    def batches(self, batch_size: int) -> Iterator[PairBatch]:
        for batch in self.data.batches(batch_size):
            yield encode_pair_batch(self.components, batch).to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.load_state_dict(state)

    def regroup(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        return self.data.regroup(states)

    def stats(self) -> dict[str, Any]:
        return self.data.stats()


# ---------------------------------------------------------------------------------------------- build

def cache_data_config(cfg: DataConfig) -> DataConfig:
    """The data settings of the caching pass: no caption dropout and no flip (both applied at train time)."""
    if cfg.streaming:
        raise InputError("precompute needs a map-style source (data.streaming=false): a stream has no "
                         "end at which the cache would be complete")
    if not cfg.center_crop:
        raise InputError("precompute caches one crop per image; it cannot reproduce a random crop "
                         "(data.center_crop=false). Use data.center_crop=true or precompute=false")
    return dataclasses.replace(cfg, caption_dropout=0.0, random_flip=False)


def cache_is_valid(folder: Path, fingerprint: dict[str, Any]) -> bool:
    meta = folder / META_FILE
    return meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fingerprint


@torch.no_grad()
def build_latent_cache(components: Components, data_cfg: DataConfig, folder: str | Path, *, seed: int,
                       fingerprint: dict[str, Any], rank: int = 0, world_size: int = 1,
                       barrier: Callable[[], None] = lambda: None, chunk: int = 32,
                       progress: bool = True) -> dict[str, Any]:
    """Encode every usable pair into ``folder`` (collectively: every process calls it and encodes its own
    share of epoch 0). Reuses a complete cache with the same ``fingerprint`` (the settings the encodings
    depend on). Written into ``folder.tmp`` and renamed when complete. Returns the caching pass's stats.

    Layout: ``rank-R-K.safetensors`` shards with row_ids [n], moments [n, 2, F, 2C, h, w] (F = 2 with
    random_flip: unflipped, flipped), is_tie [n], the family's text conditioning as ``text.<name>`` [n, ...]
    and its per-image conditioning as ``image.<name>`` [n, 2, ...] (SDXL: text.hidden, text.pooled,
    image.time_ids); ``empty.safetensors`` with the text conditioning of the empty caption; ``meta.json``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if cache_is_valid(folder, fingerprint):
        return json.loads((folder / META_FILE).read_text())["stats"][rank]
    tmp = folder.with_name(folder.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    data = PreferencePairs(cache_data_config(data_cfg), seed=seed, process_index=rank, num_processes=world_size)
    n_share = len(data.epoch_share(0))
    flips = (False, True) if data_cfg.random_flip else (False,)
    seen: set[int] = set()
    pending: list[dict[str, Any]] = []
    bar = tqdm(total=n_share, desc="caching latents", unit="pair", disable=not progress)

    def flush(k: int) -> None:
        batch = {key: (torch.cat([b[key] for b in pending]) if torch.is_tensor(pending[0][key])
                       else sum((b[key] for b in pending), [])) for key in pending[0]}
        per_flip = [encode_pair_batch(components, {**batch, "pixel_values": batch["pixel_values"].flip(-1) if f
                                                   else batch["pixel_values"]}) for f in flips]
        first = per_flip[0]
        shard = {"row_ids": batch["row_indices"], "is_tie": batch["is_tie"],
                 "moments": torch.stack([p.moments for p in per_flip], dim=2).cpu()}
        shard |= {f"text.{k}": v.cpu() for k, v in first.text.items()}
        shard |= {f"image.{k}": v.cpu() for k, v in first.image.items()}
        save_file({key: v.contiguous() for key, v in shard.items()}, tmp / f"rank-{rank}-{k:05d}.safetensors")
        bar.update(len(batch["captions"]))
        pending.clear()

    shards = 0
    batches = data.batches(1)
    for _ in range(data.batches_per_epoch(1)):
        batch = next(batches)
        row = int(batch["row_indices"][0])
        if row in seen:  # the share wrapped around past a bad image: already cached
            continue
        seen.add(row)
        pending.append(batch)
        if len(pending) == chunk:
            flush(shards)
            shards += 1
    batches.close()
    if pending:
        flush(shards)
    bar.close()
    stats = data.stats()
    (tmp / f"stats-{rank}.json").write_text(json.dumps(stats))
    if rank == 0:
        empty = encode_prompts(components, [""])
        save_file({f"text.{k}": v[0].cpu().contiguous() for k, v in empty.items()}, tmp / "empty.safetensors")
    barrier()
    if rank == 0:
        all_stats = [json.loads((tmp / f"stats-{r}.json").read_text()) for r in range(world_size)]
        (tmp / META_FILE).write_text(json.dumps({"fingerprint": fingerprint, "flips": len(flips),
                                                 "stats": all_stats}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    barrier()
    return stats


# ---------------------------------------------------------------------------------------------- train

class CachedPairs:
    """Encoded batches read from a latent cache, in ``PreferencePairs``' per-epoch row order.

    ``data``: this process's PreferencePairs over the same source (only its row order, ``epoch_share``, is
    used; no image is decoded). Each epoch visits this process's share of the rows that are in the cache,
    in B-sized batches, the tail that does not fill one dropped.
    """

    def __init__(self, folder: str | Path, data: PreferencePairs, *, seed: int, caption_dropout: float,
                 random_flip: bool, device: torch.device):
        from safetensors import safe_open

        folder = Path(folder)
        self.seed, self.caption_dropout, self.random_flip, self.device = seed, caption_dropout, random_flip, device
        self.data = data
        meta = json.loads((folder / META_FILE).read_text())
        self._caching_stats = meta["stats"]
        self._files = [safe_open(str(p), framework="pt") for p in sorted(folder.glob("rank-*.safetensors"))]
        self._where: dict[int, tuple[int, int]] = {}
        for f, handle in enumerate(self._files):
            for i, row in enumerate(handle.get_tensor("row_ids").tolist()):
                self._where[row] = (f, i)
        with safe_open(str(folder / "empty.safetensors"), framework="pt") as handle:
            self._empty = {key: handle.get_tensor(key) for key in handle.keys()}
        self._epoch, self._position, self._batches_done = 0, 0, 0

    def __len__(self) -> int:
        return len(self._where)

    def _rows(self, epoch: int) -> list[int]:
        return [int(r) for r in self.data.epoch_share(epoch) if int(r) in self._where]

    def _pair(self, row: int, epoch: int) -> dict[str, torch.Tensor]:
        f, i = self._where[row]
        handle = self._files[f]
        u_flip, _, _, u_caption = pair_draws(self.seed, epoch, row)
        pair = {key: handle.get_slice(key)[i:i + 1][0] for key in handle.keys() if key != "row_ids"}
        pair["moments"] = pair["moments"][:, int(self.random_flip and u_flip < 0.5)]
        if u_caption < self.caption_dropout:
            pair |= self._empty
        return pair

    def batches(self, batch_size: int) -> Iterator[PairBatch]:
        while True:
            epoch, rows = self._epoch, self._rows(self._epoch)
            per_epoch = len(rows) // batch_size
            if per_epoch == 0:
                raise InputError(f"the latent cache holds {len(rows)} pairs for this process in epoch {epoch}, "
                                 f"fewer than one batch of {batch_size}")
            while self._batches_done < per_epoch:
                chosen = rows[self._position:self._position + batch_size]
                pairs = [self._pair(r, epoch) for r in chosen]
                stack = {key: torch.stack([p[key] for p in pairs]) for key in pairs[0]}
                self._position += batch_size
                self._batches_done += 1
                yield PairBatch(stack["moments"], _prefixed(stack, "text."), _prefixed(stack, "image."),
                                stack["is_tie"].bool(), torch.tensor(chosen, dtype=torch.long)).to(self.device)
            self._epoch, self._position, self._batches_done = epoch + 1, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"mode": "cache", "epoch": self._epoch, "position": self._position,
                "batches_done": self._batches_done, "cached_pairs": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != "cache" or state.get("cached_pairs") != len(self):
            raise InputError(f"cannot resume from a latent cache of {len(self)} pairs with a data position "
                             f"saved for {state.get('mode')} ({state.get('cached_pairs')} pairs)")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._batches_done = int(state["batches_done"])

    def regroup(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """This process's position from every process's of a run with another number of processes (the
        same pairs per micro-batch over all of them): the cached pairs they consumed, shared out again."""
        return {**states[0], "position": sum(int(st["position"]) for st in states) // self.data.num_processes}

    def stats(self) -> dict[str, Any]:
        return {"cached_pairs": len(self), "epoch": self._epoch, "caching_pass": self._caching_stats}


def _prefixed(values: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}
