"""PreferencePairs: winner/loser batches from a source, exactly resumable and split across processes."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from diffusion_dpo.data.columns import is_default
from diffusion_dpo.data.rows import (
    _MIN_SEEN_FOR_ABORT,
    IMAGE_REASONS,
    ROW_REASONS,
    BadPair,
    DataConfig,
    Pair,
    _check_config,
    collate,
    content_id,
    load_pair,
    row_verdict,
)
from diffusion_dpo.data.sources import open_pairs
from diffusion_dpo.errors import InputError


@dataclass
class DataStats:
    """Counts of what the loader saw. ``rows_seen`` are rows whose labels and caption were checked (a
    map-style source checks every row up front; a stream counts as it reads); ``pairs_decoded`` are usable
    rows whose images were decoded; ``bad_rows`` maps a reason (bad_label, missing_caption, bad_image,
    non_rgb_image, unreachable_image) to its count; ``first_bad`` is the first bad row's message. With
    ``data.columns.labels=ranks`` a "row" is one of the pairs a ranked row expands into."""

    rows_seen: int = 0
    pairs_decoded: int = 0
    pairs_used: int = 0
    ties_dropped: int = 0
    ties_kept: int = 0
    converted_images: int = 0
    bad_rows: dict = field(default_factory=dict)
    first_bad: Optional[str] = None

    def count_bad(self, reason: str, message: str) -> None:
        self.bad_rows[reason] = self.bad_rows.get(reason, 0) + 1
        self.first_bad = self.first_bad or message

    def bad(self, reasons: tuple[str, ...]) -> int:
        return sum(self.bad_rows.get(r, 0) for r in reasons)

    def summary(self) -> str:
        bad = ", ".join(f"{n} {r}" for r, n in sorted(self.bad_rows.items())) or "none"
        return f"{self.ties_dropped} ties dropped, {self.bad(ROW_REASONS + IMAGE_REASONS)} bad rows ({bad})"


class _Inline:
    """An executor that runs each job at submit time in the calling thread (``num_workers=0``)."""

    def submit(self, fn, *args):
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _ordered(executor, jobs: Iterator[tuple[Any, Any, tuple]], depth: int) -> Iterator[tuple[Any, Any]]:
    """Run ``(meta, fn, args)`` jobs up to ``depth`` ahead on ``executor``; yield ``(meta, result)`` in job
    order. Closing the iterator cancels the jobs still queued."""
    queue: deque = deque()
    try:
        for meta, fn, args in jobs:
            queue.append((meta, executor.submit(fn, *args)))
            if len(queue) >= depth:
                meta, future = queue.popleft()
                yield meta, future.result()
        while queue:
            meta, future = queue.popleft()
            yield meta, future.result()
    finally:
        for _, future in queue:
            future.cancel()
        if hasattr(jobs, "close"):
            jobs.close()  # let a stream release its files now rather than at interpreter exit


def _skip(_row: Any = None) -> None:
    """The job of a row that is not decoded (a dropped tie or a bad row)."""
    return None


class PreferencePairs:
    """Winner/loser batches from a preference-pair source, resumable exactly and split across processes.

        pairs = PreferencePairs(cfg.data, seed=0, process_index=rank, num_processes=world_size)
        for batch in pairs.batches(batch_size):      # infinite, epoch after epoch
            ...
            checkpoint["data"] = pairs.state_dict()   # small, JSON-able

    Map-style source: labels and captions of every row are checked once up front (no image decoding);
    epoch ``e`` visits the usable rows in a permutation seeded by (seed, e), truncated to a multiple of
    ``num_processes``; process ``k`` takes every ``num_processes``-th entry from ``k``, so the shares are
    disjoint and equal, and each process yields the same number of batches per epoch (the tail that does
    not fill a batch is dropped). A pair whose image turns out bad is skipped and counted, and the share
    wraps around to fill the epoch's last batch. The position is (epoch, pairs consumed from the share,
    batches yielded), so a resume indexes straight into the permutation without decoding the skipped rows.

    Streaming source: ``datasets``' ``shuffle(seed, buffer_size)`` with ``set_epoch`` and
    ``split_dataset_by_node`` (whole shards per process when the shard count divides evenly, otherwise
    every ``num_processes``-th row). Ties and bad rows are filtered as rows arrive; batches run on across
    epoch ends, so every process yields batches forever and none waits on another. The position is the
    stream's own ``state_dict()`` after the last row used; a resume continues from there, except that the
    rows sitting in the shuffle buffer at checkpoint time are skipped (a limit of ``datasets``;
    ``shuffle_buffer=0`` makes a streaming resume exact).

    Every per-pair random choice (flip, crop offset, caption dropout) comes from :func:`pair_draws` seeded
    by (seed, epoch, row id), so a batch is the same whether or not the run was interrupted. All processes
    must use the same ``seed``.
    """

    def __init__(self, cfg: DataConfig, *, seed: int, process_index: int = 0, num_processes: int = 1):
        _check_config(cfg)
        if num_processes < 1 or not 0 <= process_index < num_processes:
            raise InputError(f"process_index {process_index} must lie in [0, num_processes={num_processes})")
        self.cfg, self.seed = cfg, int(seed)
        self.process_index, self.num_processes = process_index, num_processes
        self.source = cfg.source
        self._stats = DataStats()
        self._epoch, self._position, self._batches_done = 0, 0, 0
        self._stream_state: Optional[dict] = None
        self._batch_size: Optional[int] = None
        self._dataset = open_pairs(cfg.source, cfg.split, cfg.streaming, cache_dir=cfg.cache_dir,
                                   columns=cfg.columns)
        if cfg.streaming:
            if cfg.max_rows is not None:
                self._dataset = self._dataset.take(cfg.max_rows)
        else:
            self._usable, self._verdicts = self._scan()

    # ------------------------------------------------------------------------------------------ public
    @property
    def num_pairs(self) -> Optional[int]:
        """Usable pairs of a map-style source (after dropping ties and bad rows); None for a stream."""
        return None if self.cfg.streaming else len(self._usable)

    def batches_per_epoch(self, batch_size: int) -> Optional[int]:
        """Batches each process yields per epoch (map-style); None for a stream."""
        if self.cfg.streaming:
            return None
        return len(self._usable) // self.num_processes // batch_size

    def batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        """Training batches (see :func:`collate`), forever, from the current position. Use one at a time."""
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        # A map-style position counts batches of the epoch; a stream's position does not depend on them.
        if not self.cfg.streaming and self._batch_size not in (None, batch_size) and self._position:
            raise InputError(f"cannot resume a data position saved with batch size {self._batch_size} at "
                             f"batch size {batch_size}")
        self._batch_size = batch_size
        workers = self.cfg.num_workers
        executor = ThreadPoolExecutor(workers, thread_name_prefix="pairs") if workers else _Inline()
        depth = max(2 * batch_size, 4 * workers) if workers else 1  # inline: no decoding ahead
        try:
            if self.cfg.streaming:
                yield from self._stream_batches(batch_size, executor, depth)
            else:
                yield from self._map_batches(batch_size, executor, depth)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        """Counts so far (see :class:`DataStats`), as a plain dict."""
        return asdict(self._stats)

    def _order_settings(self) -> dict[str, Any]:
        """What the row order depends on: a position is only meaningful with the same values."""
        cfg = self.cfg
        return {"mode": "stream" if cfg.streaming else "map", "split": cfg.split,
                "max_rows": cfg.max_rows, "keep_ties": cfg.keep_ties, "seed": self.seed,
                "shuffle_buffer": cfg.shuffle_buffer if cfg.streaming else None,
                "process_index": self.process_index, "num_processes": self.num_processes,
                "num_pairs": self.num_pairs} | self._columns_setting()

    def _columns_setting(self) -> dict[str, Any]:
        """The column map, when not the default (so positions saved before it existed still load)."""
        return {} if is_default(self.cfg.columns) else {"columns": asdict(self.cfg.columns)}

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded, the settings it depends on, and the counts (JSON)."""
        return self._order_settings() | {
            "batch_size": self._batch_size, "epoch": self._epoch, "position": self._position,
            "batches_done": self._batches_done, "stream": self._stream_state, "stats": self.stats(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where :meth:`state_dict` was taken (streaming: see the class docstring)."""
        settings = self._order_settings()
        for key in [*settings, "columns"]:
            value = settings.get(key)
            if state.get(key) != value:
                raise InputError(f"cannot resume the data position: it was saved with "
                                 f"{key}={state.get(key)!r}, this run has {key}={value!r}")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._batches_done, self._batch_size = int(state["batches_done"]), state["batch_size"]
        self._stream_state = state["stream"]
        self._stats = DataStats(**state["stats"])

    def regroup(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """This process's position from ``states``, the positions of every process of a run with another
        number of processes and the same examples per micro-batch over all of them (map-style only): the
        pairs the old processes consumed in the epoch, shared out again (exact unless a bad image made the
        shares advance unevenly). The share's counts (pairs decoded and used, bad images) of the old
        processes that map onto this one (old rank modulo this run's count) are added up."""
        if self.cfg.streaming:
            raise InputError("resume on another number of processes: a streaming source's position belongs to "
                             "its split of the stream; resume with the same number of processes")
        old_world = len(states)
        group = [st for r, st in enumerate(states) if r % self.num_processes == self.process_index]
        stats = dict(group[0]["stats"]) if group else dict(states[0]["stats"])
        for count in ("pairs_decoded", "pairs_used", "converted_images"):
            stats[count] = sum(st["stats"][count] for st in group)
        stats["bad_rows"] = {**{r: n for r, n in states[0]["stats"]["bad_rows"].items() if r in ROW_REASONS},
                             **{r: sum(st["stats"]["bad_rows"].get(r, 0) for st in group) for r in IMAGE_REASONS
                                if any(st["stats"]["bad_rows"].get(r) for st in group)}}
        batch_size = states[0]["batch_size"]
        return {**states[0], **self._order_settings(), "stats": stats,
                "batch_size": None if batch_size is None else batch_size * old_world // self.num_processes,
                "position": sum(int(st["position"]) for st in states) // self.num_processes}

    # -------------------------------------------------------------------------------- bad-row accounting
    def _count_bad(self, reason: str, message: str) -> None:
        self._stats.count_bad(reason, message)
        self._check_bad_fraction()

    def _check_bad_fraction(self) -> None:
        """Abort when bad rows exceed ``max_bad_fraction`` of the rows seen (bad labels and captions) or of
        the pairs decoded (bad images), once 20 were seen, or the whole set if smaller."""
        s, limit = self._stats, self.cfg.max_bad_fraction
        whole = None if self.cfg.streaming else len(self._verdicts)
        for reasons, seen, what in ((ROW_REASONS, s.rows_seen, "rows checked"),
                                    (IMAGE_REASONS, s.pairs_decoded, "pairs decoded")):
            bad = s.bad(reasons)
            if bad and seen >= min(_MIN_SEEN_FOR_ABORT, whole or _MIN_SEEN_FOR_ABORT) and bad > limit * seen:
                raise InputError(f"{bad} of {seen} {what} in {self.source} are bad, more than "
                                 f"data.max_bad_fraction={limit} ({s.summary()}); first: {s.first_bad}")

    def _empty_error(self) -> InputError:
        return InputError(f"0 usable pairs in {self.source}: {self._stats.summary()}"
                          + (f"; first bad row: {self._stats.first_bad}" if self._stats.first_bad else ""))

    # -------------------------------------------------------------------------------------- map-style
    def _scan(self) -> tuple[np.ndarray, list[str]]:
        """Check labels and captions of every row (no images): the usable row indices and each row's
        verdict. Counts ties and bad rows into the stats; raises if too many are bad or none is usable."""
        ds = self._dataset
        n = len(ds) if self.cfg.max_rows is None else min(len(ds), self.cfg.max_rows)
        # A mapped source says why a label could not be read (see data.columns).
        problems = ["label_problem"] if "label_problem" in ds.column_names else []
        names = ["caption", "label_0", "label_1"] + problems
        table = ds.select_columns(names).with_format("arrow")[:n]
        columns = [table.column(c).to_pylist() for c in names]
        verdicts, usable = [], []
        for index, (caption, label_0, label_1, *problem) in enumerate(zip(*columns)):
            verdict, detail = row_verdict(caption, label_0, label_1, *problem)
            verdicts.append(verdict)
            if verdict == "tie" and not self.cfg.keep_ties:
                self._stats.ties_dropped += 1
            elif verdict in ROW_REASONS:
                self._stats.count_bad(verdict, f"row {index} of {self.source}: {detail}")
            else:
                self._stats.ties_kept += verdict == "tie"
                usable.append(index)
        self._stats.rows_seen = n
        self._verdicts = verdicts  # the bad-fraction check needs the set size
        self._check_bad_fraction()
        if not usable:
            raise self._empty_error()
        return np.asarray(usable, dtype=np.int64), verdicts

    def epoch_share(self, epoch: int) -> np.ndarray:
        """Source row indices this process visits in ``epoch`` (map-style), in order."""
        order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self._usable))
        per_process = len(order) // self.num_processes
        return self._usable[order[: per_process * self.num_processes]][self.process_index::self.num_processes]

    def _load_row(self, index: int, epoch: int) -> Pair | BadPair:
        row = self._dataset[index]
        return load_pair(row, self._verdicts[index], index, epoch, self.seed, self.cfg,
                         f"{index} of {self.source}")

    def _map_batches(self, batch_size: int, executor, depth: int) -> Iterator[dict[str, Any]]:
        per_epoch = self.batches_per_epoch(batch_size)
        if per_epoch == 0:
            raise InputError(f"{len(self._usable)} usable pairs in {self.source} ({self._stats.summary()}) "
                             f"do not fill one batch of {batch_size} on each of {self.num_processes} "
                             "process(es)")
        while True:
            epoch, share = self._epoch, self.epoch_share(self._epoch)
            jobs = (((p, int(share[p % len(share)])), self._load_row, (int(share[p % len(share)]), epoch))
                    for p in itertools.count(self._position))
            stream = _ordered(executor, jobs, depth)
            pending: list[Pair] = []
            bad_in_a_row = 0
            # The state changes only when a batch is yielded: while the caller holds a batch, the position
            # and counts describe exactly the rows consumed up to that batch's last pair.
            for (position, _index), result in stream:
                if isinstance(result, BadPair):
                    self._stats.pairs_decoded += 1
                    self._count_bad(result.reason, result.message)
                    bad_in_a_row += 1
                    if bad_in_a_row >= len(share):
                        raise self._empty_error()
                    continue
                bad_in_a_row = 0
                self._note_decoded(result)
                pending.append(result)
                if len(pending) == batch_size:
                    self._batches_done += 1
                    self._position = position + 1
                    if self._batches_done == per_epoch:
                        self._epoch, self._position, self._batches_done = epoch + 1, 0, 0
                    self._stats.pairs_used += batch_size
                    batch, pending = collate(pending), []
                    yield batch
                    if self._epoch != epoch:
                        break
            stream.close()

    def _note_decoded(self, pair: Pair) -> None:
        self._stats.pairs_decoded += 1
        self._stats.converted_images += pair.converted

    # -------------------------------------------------------------------------------------- streaming
    def _epoch_stream(self, epoch: int):
        """This process's stream for ``epoch``: shuffled by (seed, epoch), split by node."""
        from datasets.distributed import split_dataset_by_node

        ds = self._dataset
        if self.cfg.shuffle_buffer > 0:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.cfg.shuffle_buffer)
        ds = split_dataset_by_node(ds, rank=self.process_index, world_size=self.num_processes)
        ds.set_epoch(epoch)
        return ds

    def _stream_jobs(self) -> Iterator[tuple[Any, Any, tuple]]:
        """One job per streamed row, epoch after epoch, from the saved position. The meta carries the
        epoch, the stream's state after the row, and the row's verdict; only usable rows are decoded."""
        epoch, start = self._epoch, self._stream_state
        while True:
            ds = self._epoch_stream(epoch)
            if start is not None:
                ds.load_state_dict(start)
            usable = 0
            for row in ds:
                verdict, detail = row_verdict(row.get("caption"), row.get("label_0"), row.get("label_1"),
                                              row.get("label_problem"))
                meta = (epoch, ds.state_dict(), verdict, detail)
                if verdict in ROW_REASONS or (verdict == "tie" and not self.cfg.keep_ties):
                    yield meta, _skip, ()
                else:
                    usable += 1
                    yield meta, self._load_streamed, (row, verdict, epoch)
            if start is None and usable == 0:
                raise self._empty_error()  # a whole epoch without a usable pair: stop rather than spin
            epoch, start = epoch + 1, None

    def _load_streamed(self, row: dict[str, Any], verdict: str, epoch: int) -> Pair | BadPair:
        row_id = content_id(row)
        return load_pair(row, verdict, row_id, epoch, self.seed, self.cfg, f"{row_id:x} of {self.source}")

    def _stream_batches(self, batch_size: int, executor, depth: int) -> Iterator[dict[str, Any]]:
        pending: list[Pair] = []
        for (epoch, state, verdict, detail), result in _ordered(executor, self._stream_jobs(), depth):
            self._stats.rows_seen += 1
            if verdict == "tie" and not self.cfg.keep_ties:
                self._stats.ties_dropped += 1
            elif verdict in ROW_REASONS:
                self._count_bad(verdict,
                                f"streamed row {self._stats.rows_seen - 1} of {self.source}: {detail}")
            elif isinstance(result, BadPair):
                self._stats.pairs_decoded += 1
                self._count_bad(result.reason, result.message)
            else:
                self._stats.ties_kept += verdict == "tie"
                self._note_decoded(result)
                pending.append(result)
            if len(pending) == batch_size:
                # As for map-style sources, the state moves only at a yield (see _map_batches).
                self._epoch, self._stream_state = epoch, state
                self._stats.pairs_used += batch_size
                batch, pending = collate(pending), []
                yield batch
