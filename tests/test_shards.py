import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffusion_dpo.errors import InputError
from diffusion_dpo.labeling.shards import MANIFEST, ShardSet, fingerprint, owned_by

CONFIG = {"model": "m", "seed": 0, "sampling": {"steps": 4}}


def _table(n, start=0):
    return pa.table({"caption": [f"p{i}" for i in range(start, start + n)]})


def test_fingerprint_ignores_key_order_and_sees_values():
    assert fingerprint({"a": 1, "b": {"c": 2}}) == fingerprint({"b": {"c": 2}, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_owned_by_splits_without_overlap():
    """Shard i -> process i % 3: 0,3,6 / 1,4 / 2,5."""
    parts = [owned_by(range(7), r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(parts, [])) == list(range(7))


def test_write_is_atomic_and_self_describing(tmp_path):
    shards = ShardSet(tmp_path, CONFIG)
    path = shards.write(2, _table(3), {"rows": 3})
    assert path.name == "train-00002.parquet"
    assert not list(tmp_path.glob("*.tmp"))
    assert pq.read_table(path).column("caption").to_pylist() == ["p0", "p1", "p2"]
    assert shards.completed() == {2: {"rows": 3}}
    assert shards.missing(range(4)) == [0, 1, 3]
    # a fresh ShardSet (a rerun) sees the same from the files alone
    assert ShardSet(tmp_path, dict(CONFIG)).completed() == {2: {"rows": 3}}


def test_manifest_is_rebuilt_from_shards(tmp_path):
    shards = ShardSet(tmp_path, CONFIG)
    shards.write(0, _table(2), {"rows": 2})
    m = shards.write_manifest(num_shards=2)
    assert m["completed"] == ["train-00000.parquet"] and m["complete"] is False
    shards.write(1, _table(1, 2), {"rows": 1})
    m = shards.write_manifest(num_shards=2)
    assert m["complete"] is True
    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    assert on_disk["fingerprint"] == shards.fingerprint and on_disk["config"] == CONFIG
    assert on_disk["completed"] == ["train-00000.parquet", "train-00001.parquet"]


def test_stale_tmp_is_ignored_then_cleaned(tmp_path):
    shards = ShardSet(tmp_path, CONFIG)
    (tmp_path / "train-00000.parquet.tmp").write_bytes(b"half a file")  # a crash mid-write
    shards.check()
    assert shards.completed() == {}
    shards.clean_tmp()
    assert not list(tmp_path.glob("*.tmp"))


def test_other_configuration_is_refused_naming_the_change(tmp_path):
    ShardSet(tmp_path, CONFIG).write(0, _table(1), {"rows": 1})
    other = ShardSet(tmp_path, {**CONFIG, "sampling": {"steps": 8}})
    with pytest.raises(InputError, match=r"sampling.steps: 4 -> 8"):
        other.check()
    assert other.completed() == {}  # never counts another configuration's shards as its own


def test_foreign_parquet_and_split_subfolder_refused(tmp_path):
    pq.write_table(_table(1), tmp_path / "data.parquet")
    with pytest.raises(InputError, match="data.parquet"):
        ShardSet(tmp_path, CONFIG).check()
    sub = tmp_path / "b"
    (sub / "train").mkdir(parents=True)
    pq.write_table(_table(1), sub / "train" / "x.parquet")
    with pytest.raises(InputError, match="subfolder train/"):
        ShardSet(sub, CONFIG).check()


def test_manifest_alone_from_another_config_is_replaced(tmp_path):
    """A run that stopped before its first shard left only a manifest: nothing to lose, so no refusal."""
    ShardSet(tmp_path, {"x": 1}).write_manifest(num_shards=3)
    shards = ShardSet(tmp_path, CONFIG)
    shards.check()
    assert shards.write_manifest(num_shards=1)["fingerprint"] == shards.fingerprint
    shards.write(0, _table(1), {"rows": 1})
    (tmp_path / MANIFEST).write_text(json.dumps({"fingerprint": "0" * 16, "config": {"seed": 5}}))
    with pytest.raises(InputError, match="different configuration"):
        shards.check()
