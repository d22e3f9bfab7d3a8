"""Resumable, multi-process output as self-describing parquet shards.

A job that writes a dataset in pieces (labeling, relabeling, scoring) splits its work into numbered shards.
Each shard is written atomically (``NAME.parquet.tmp``, fsync, ``os.replace``) and carries, in its parquet
schema metadata, the fingerprint of the configuration that produced it and the statistics the job wants to
summarise. The shards on disk are the truth; ``manifest.json`` is rebuilt from them by the main process.
So a rerun after a crash or Ctrl-C writes only the missing shards, a summary is the same whether a run was
interrupted or not, and an output folder written under another configuration is refused instead of mixed.

    shards = ShardSet("out/", config={"model": "...", "seed": 0})
    shards.check()                                   # InputError if out/ holds another config's shards
    todo = shards.missing(owned_by(range(n), rank, world))
    shards.write(i, table, stats={"rows": len(table)})
    shards.write_manifest(num_shards=n)

Shard ``i`` is ``{prefix}-{i:05d}.parquet``; readers that take every ``*.parquet`` of a folder sorted by
name (``datasets``, ``diffusion_dpo.data``) see the shards in order and ignore the manifest and ``.tmp``
files.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from diffusion_dpo.errors import InputError
from diffusion_dpo.fileio import atomic_write, atomic_write_bytes

MANIFEST = "manifest.json"
META_KEY = b"diffusion_dpo.shard"


def fingerprint(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable mapping (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def owned_by(indices: Iterable[int], rank: int, world_size: int) -> list[int]:
    """The shards process ``rank`` of ``world_size`` handles: shard i belongs to process i % world_size."""
    return [i for i in indices if i % world_size == rank]


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


class ShardSet:
    """The shards of one job in ``folder``, all written under one configuration (``config``)."""

    def __init__(self, folder: str | Path, config: dict[str, Any], *, prefix: str = "train"):
        self.folder = Path(folder)
        self.config = json.loads(json.dumps(config, default=str))  # as it will read back from JSON
        self.fingerprint = fingerprint(self.config)
        self.prefix = prefix
        self._pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{5,}})\.parquet$")

    def path(self, index: int) -> Path:
        return self.folder / f"{self.prefix}-{index:05d}.parquet"

    def _read_meta(self, path: Path) -> dict | None:
        try:
            metadata = pq.read_schema(path).metadata or {}
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"output folder {self.folder}: {path.name} is not a readable parquet file ({e}); "
                             "move it away or choose another output_dir") from None
        raw = metadata.get(META_KEY)
        return json.loads(raw) if raw else None

    def check(self) -> None:
        """Refuse an output folder that holds shards from another configuration, or foreign parquet files.

        A manifest from another configuration with no shard beside it is replaced (nothing would be lost).
        """
        if not self.folder.exists():
            return
        if not self.folder.is_dir():
            raise InputError(f"output_dir {self.folder} exists and is not a folder")
        split_folder = self.folder / self.prefix
        if split_folder.is_dir() and any(split_folder.glob("*.parquet")):
            # Readers take a folder's split subfolder over its own files: ours would be shadowed.
            raise InputError(f"output folder {self.folder} has a subfolder {self.prefix}/ with parquet files, "
                             "which readers would take instead of this job's shards: choose an empty output_dir")
        parquet = sorted(self.folder.glob("*.parquet"))
        for path in parquet:
            meta = self._read_meta(path)
            if meta is None or not self._pattern.match(path.name):
                raise InputError(
                    f"output folder {self.folder} holds {path.name}, which this job did not write; refusing "
                    "to mix datasets: choose an empty output_dir")
            if meta["fingerprint"] != self.fingerprint:
                raise InputError(self._mismatch_message(path.name, meta.get("config")))
        manifest = self.folder / MANIFEST
        if parquet and manifest.is_file():
            old = json.loads(manifest.read_text())
            if old.get("fingerprint") != self.fingerprint:
                raise InputError(self._mismatch_message(MANIFEST, old.get("config")))

    def _mismatch_message(self, name: str, old_config: dict | None) -> str:
        changes = _diff(old_config, self.config) if old_config is not None else ["(unknown configuration)"]
        return (f"output folder {self.folder} holds shards written with a different configuration "
                f"({name}); refusing to mix them. Changed: {'; '.join(changes)}. Use another output_dir, "
                "or delete the folder to start over.")

    def completed(self) -> dict[int, dict]:
        """Shard index -> the stats stored with it, for every finished shard of this configuration."""
        done = {}
        for path in sorted(self.folder.glob(f"{self.prefix}-*.parquet")):
            m = self._pattern.match(path.name)
            meta = self._read_meta(path) if m else None
            if meta is not None and meta["fingerprint"] == self.fingerprint:
                done[int(m.group(1))] = meta["stats"]
        return done

    def missing(self, indices: Iterable[int]) -> list[int]:
        done = self.completed()
        return [i for i in indices if i not in done]

    def clean_tmp(self) -> None:
        """Remove ``.tmp`` files an interrupted run left behind (call before any process starts writing)."""
        for tmp in self.folder.glob("*.tmp"):
            tmp.unlink()

    def write(self, index: int, table: pa.Table, stats: dict[str, Any]) -> Path:
        """Write shard ``index`` atomically, its fingerprint, config and ``stats`` in the schema metadata."""
        meta = {"fingerprint": self.fingerprint, "shard": index, "stats": stats, "config": self.config}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta)})
        self.folder.mkdir(parents=True, exist_ok=True)
        # Flushed before the rename: a shard that exists is whole, even after a power cut.
        return atomic_write(self.path(index), lambda tmp: pq.write_table(table, tmp))

    def write_manifest(self, num_shards: int | None = None, extra: dict[str, Any] | None = None) -> dict:
        """Rebuild ``manifest.json`` from the shards on disk; ``num_shards`` None means not yet known.

        ``complete`` is true when shards 0..num_shards-1 all exist.
        """
        done = self.completed()
        manifest = {
            "fingerprint": self.fingerprint,
            "config": self.config,
            "num_shards": num_shards,
            "completed": [self.path(i).name for i in sorted(done)],
            "complete": num_shards is not None and all(i in done for i in range(num_shards)),
            **(extra or {}),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        return manifest

    def read_manifest(self) -> dict | None:
        path = self.folder / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else None
