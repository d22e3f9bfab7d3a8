"""Reading a foreign preference schema: the ``data.columns`` map from a source's columns to ours.

Whatever the source looks like, :func:`map_columns` turns it into rows of our (Pick-a-Pic) schema:
``caption``, ``jpg_0``, ``jpg_1``, ``label_0``, ``label_1`` (1/0, 0/1, 0.5/0.5), plus ``label_problem``
(None, or why the row's label cannot be read: such a row is a counted ``bad_label`` row) and
``source_row`` (the row of the source the pair came from). Images stay as stored (bytes, an image dict,
or a file path, made absolute against the source's folder, or a URL, both as ``{"bytes": None, "path": p}``)
and are decoded (URLs fetched) when a pair is used.

The label forms (``data.columns.labels``):

* ``pair``: two columns ``label_0``/``label_1`` holding 1/0, 0/1 or 0.5/0.5 (Pick-a-Pic);
* ``scores``: two numeric columns (scores, vote counts): the higher wins, equal values are a tie;
* ``winner``: one column naming the winner, its values listed in ``winner_0``/``winner_1``/``winner_tie``;
* ``implicit``: no label column, ``image_0`` is the winner (a chosen/rejected pair);
* ``ranks``: a list-of-images column and a list-of-ranks column of the same length K; each row becomes its
  C(K, 2) pairs (i, j), i < j, in that order, the better image winning (``rank_order``: lower rank better by
  default, as in a ranking where 1 is first); equal ranks make a tie, dropped and counted like any tie.

A map-style source becomes an index table (one row per pair: caption, labels, source row, list slots) whose
images are looked up in the source when a row is read, so no image is copied and the pair order (the rows'
order, then i < j) is deterministic: resume and per-process sharding index straight into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args

from diffusion_dpo.config import option
from diffusion_dpo.data.images import URL_PREFIXES, keep_images_encoded
from diffusion_dpo.errors import InputError

LabelForm = Literal["pair", "scores", "winner", "implicit", "ranks"]
RankOrder = Literal["lower_better", "higher_better"]
_PAIR_LABELS = {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}
MAPPED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "label_problem", "source_row")


@dataclass
class ColumnMap:
    """The ``data.columns`` section: which of the source's columns hold the caption, images and labels."""

    caption: str = option("caption", "column holding the prompt (a string)")
    image_0: str = option("jpg_0", "column holding the first image: encoded bytes, a datasets Image, a file "
                          "path (relative to the source's folder) or an http(s) URL")
    image_1: str = option("jpg_1", "column holding the second image (same forms as image_0)")
    labels: LabelForm = option("pair", "label form: pair (label_0/label_1 are 1/0, 0/1 or 0.5/0.5), scores "
                               "(label_0/label_1 are numbers, higher wins), winner (one column names the "
                               "winner), implicit (image_0 won), ranks (a list of images, a list of ranks)")
    label_0: str = option("label_0", "labels=pair or scores: the first image's label, score or vote count")
    label_1: str = option("label_1", "labels=pair or scores: the second image's label, score or vote count")
    winner: str = option("winner", "labels=winner: the column saying which image won")
    winner_0: list[Union[str, float]] = option(["0", "image_0"], "labels=winner: values meaning image_0 won "
                                               "(numbers match numerically: 0 = 0.0 = '0')")
    winner_1: list[Union[str, float]] = option(["1", "image_1"], "labels=winner: values meaning image_1 "
                                               "won")
    winner_tie: list[Union[str, float]] = option(["0.5", "tie"], "labels=winner: values meaning a tie")
    images: str = option("images", "labels=ranks: the column holding a list of K images")
    ranks: str = option("ranks", "labels=ranks: the column holding K ranks or scores, one per image")
    rank_order: RankOrder = option(
        "lower_better", "labels=ranks: lower_better (rank 1 is the best) or higher_better (scores, "
        "1-for-preferred flags)")


def is_default(columns: Optional[ColumnMap]) -> bool:
    """True when ``columns`` reads the Pick-a-Pic schema as it is (the source is used unchanged)."""
    return columns is None or columns == ColumnMap()


def _mapped_keys(columns: ColumnMap) -> list[str]:
    """The ``data.columns`` keys whose columns this map reads."""
    keys = ["caption"] + (["images", "ranks"] if columns.labels == "ranks" else ["image_0", "image_1"])
    return keys + {"pair": ["label_0", "label_1"], "scores": ["label_0", "label_1"], "winner": ["winner"],
                   "implicit": [], "ranks": []}[columns.labels]


def check_column_map(columns: ColumnMap) -> None:
    """Raise InputError naming the ``data.columns`` key whose value is not one the map knows."""
    for key, allowed in (("labels", get_args(LabelForm)), ("rank_order", get_args(RankOrder))):
        if getattr(columns, key) not in allowed:
            raise InputError(f"config key 'data.columns.{key}': expected one of {', '.join(allowed)}, got "
                             f"{getattr(columns, key)!r}")


def check_mapped_columns(present: list[str], columns: ColumnMap, source: str) -> None:
    """Raise InputError naming ``source``, the config key and its column for every mapped column it lacks."""
    missing = [f"column '{getattr(columns, key)}' (config key 'data.columns.{key}')"
               for key in _mapped_keys(columns) if getattr(columns, key) not in present]
    if missing:
        raise InputError(f"data source {source} lacks {', '.join(missing)}; it has: "
                         f"{', '.join(present) or '(none)'} (data.columns.labels={columns.labels})")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _matches(value: Any, accepted: list[str | float]) -> bool:
    """``value`` equals one of ``accepted``: as text, or numerically when both read as numbers
    (0 = 0.0 = "0")."""
    if value is None or isinstance(value, bool):
        return False
    for item in accepted:
        if str(value) == str(item):
            return True
        try:
            if float(value) == float(item):
                return True
        except (TypeError, ValueError):
            continue
    return False


Pairing = tuple[int, int, Optional[float], Optional[float], Optional[str]]  # slot_0, slot_1, labels, problem


def row_pairings(row: dict[str, Any], columns: ColumnMap, num_images: Optional[int]) -> list[Pairing]:
    """The pairs one source row yields, as (slot_0, slot_1, label_0, label_1, problem). Slots index the
    images list (``ranks``) or are -1 (the ``image_0``/``image_1`` columns); a row whose label cannot be
    read yields one pair with labels None and ``problem`` saying why. ``num_images``: K, for ``ranks``."""
    c = columns
    if c.labels == "implicit":
        return [(-1, -1, 1.0, 0.0, None)]
    if c.labels == "winner":
        value = row[c.winner]
        for accepted, labels in ((c.winner_0, (1.0, 0.0)), (c.winner_1, (0.0, 1.0)),
                                 (c.winner_tie, (0.5, 0.5))):
            if _matches(value, accepted):
                return [(-1, -1, *labels, None)]
        return [(-1, -1, None, None, f"column {c.winner} is {value!r}; expected one of {c.winner_0} (image_0 "
                 f"won), {c.winner_1} (image_1 won) or {c.winner_tie} (tie)")]
    if c.labels in ("pair", "scores"):
        v0, v1 = row[c.label_0], row[c.label_1]
        numbers = _is_number(v0) and _is_number(v1)
        if c.labels == "pair" and numbers and (float(v0), float(v1)) in _PAIR_LABELS:
            return [(-1, -1, float(v0), float(v1), None)]
        if c.labels == "scores" and numbers:
            return [(-1, -1, *((1.0, 0.0) if v0 > v1 else (0.0, 1.0) if v1 > v0 else (0.5, 0.5)), None)]
        expected = "1/0, 0/1 or 0.5/0.5" if c.labels == "pair" else "two numbers (the higher wins)"
        return [(-1, -1, None, None,
                 f"columns {c.label_0}, {c.label_1} are {v0!r}, {v1!r}; expected {expected}")]
    ranks = row[c.ranks]
    if (not isinstance(ranks, (list, tuple)) or len(ranks) < 2 or len(ranks) != num_images
            or not all(_is_number(r) for r in ranks)):
        return [(-1, -1, None, None, f"column {c.ranks} is {ranks!r}; expected a list of numbers, one per "
                 f"image of column {c.images} ({num_images} images), at least 2")]
    out: list[Pairing] = []
    sign = 1 if c.rank_order == "lower_better" else -1
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            d = sign * (ranks[j] - ranks[i])  # > 0: image i is the better one
            out.append((i, j, *((1.0, 0.0) if d > 0 else (0.0, 1.0) if d < 0 else (0.5, 0.5)), None))
    return out


def _locate(value: Any, base_dir: Path) -> Any:
    """A stored image with a relative file path made absolute against the source's folder. A path or URL
    string becomes a ``{"bytes": None, "path": ...}`` dict, the form datasets gives an undecoded image, so
    code reading our rows handles files the same whether the source stored bytes or names."""
    def absolute(path: Any) -> Any:
        if not isinstance(path, str) or not path or path.startswith(URL_PREFIXES) or Path(path).is_absolute():
            return path
        return str(base_dir / path)

    if isinstance(value, str):
        return {"bytes": None, "path": absolute(value)}
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        return {**value, "path": absolute(value["path"])}
    return value


def _image(row_images: dict[str, Any], columns: ColumnMap, side: int, slot: int, base_dir: Path) -> Any:
    if slot < 0:
        return _locate(row_images[columns.image_0 if side == 0 else columns.image_1], base_dir)
    images = row_images[columns.images]
    present = isinstance(images, (list, tuple)) and slot < len(images)
    return _locate(images[slot] if present else None, base_dir)


def _image_columns(columns: ColumnMap) -> list[str]:
    return [columns.images] if columns.labels == "ranks" else [columns.image_0, columns.image_1]


def _label_columns(columns: ColumnMap) -> list[str]:
    return [getattr(columns, key) for key in _mapped_keys(columns)
            if key not in ("caption", "image_0", "image_1", "images")]


def map_columns(ds, columns: ColumnMap, source: str, base_dir: Path, streaming: bool):
    """``ds`` (a datasets Dataset or IterableDataset in a foreign schema) as rows of our schema (see the
    module docstring). Raises InputError when a mapped column is missing."""
    check_column_map(columns)
    present = ds.column_names
    if present is None:  # a stream without declared features: look at its first row
        present = list(next(iter(ds), {}).keys())
    check_mapped_columns(present, columns, source)
    ds = keep_images_encoded(ds, _image_columns(columns))
    if streaming:
        return ds.map(_StreamExpander(columns, base_dir), batched=True, batch_size=1, remove_columns=present)
    return _index_table(ds, columns, base_dir)


class _StreamExpander:
    """``IterableDataset.map`` function (batched, one source row per call): the row's pairs in our schema."""

    def __init__(self, columns: ColumnMap, base_dir: Path):
        self.columns, self.base_dir = columns, base_dir

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in MAPPED_COLUMNS}
        c = self.columns
        for n in range(len(batch[c.caption])):
            row = {key: values[n] for key, values in batch.items()}
            images = row.get(c.images) if c.labels == "ranks" else None
            count = len(images) if isinstance(images, (list, tuple)) else None
            for slot_0, slot_1, label_0, label_1, problem in row_pairings(row, c, count):
                out["caption"].append(row[c.caption])
                out["jpg_0"].append(_image(row, c, 0, slot_0, self.base_dir))
                out["jpg_1"].append(_image(row, c, 1, slot_1, self.base_dir))
                out["label_0"].append(label_0)
                out["label_1"].append(label_1)
                out["label_problem"].append(problem)
                out["source_row"].append(None)  # a stream has no stable row number
        return out


def _index_table(ds, columns: ColumnMap, base_dir: Path):
    """One row per pair (caption, labels, problem, source row, list slots), reading no image; the images
    are looked up in ``ds`` when rows are read (``with_transform``)."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    c = columns
    read = [c.caption] + _label_columns(c) + ([c.images] if c.labels == "ranks" else [])
    table = ds.select_columns(list(dict.fromkeys(read))).with_format("arrow")[:]
    values = {name: table.column(name).to_pylist() for name in [c.caption] + _label_columns(c)}
    counts = [None] * table.num_rows
    if c.labels == "ranks":
        kind = table.column(c.images).type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
            raise InputError(f"config key 'data.columns.images' names column '{c.images}', which holds "
                             f"{kind}, not a list of images")
        counts = pc.list_value_length(table.column(c.images)).to_pylist()
    names = ("caption", "label_0", "label_1", "label_problem", "source_row", "slot_0", "slot_1")
    index: dict[str, list] = {name: [] for name in names}
    for r in range(table.num_rows):
        row = {name: column[r] for name, column in values.items()}
        for slot_0, slot_1, label_0, label_1, problem in row_pairings(row, c, counts[r]):
            for name, value in zip(index, (row[c.caption], label_0, label_1, problem, r, slot_0, slot_1)):
                index[name].append(value)
    features = datasets.Features({
        "caption": datasets.Value("string"), "label_0": datasets.Value("float64"),
        "label_1": datasets.Value("float64"), "label_problem": datasets.Value("string"),
        "source_row": datasets.Value("int64"), "slot_0": datasets.Value("int64"),
        "slot_1": datasets.Value("int64"),
    })
    pairs = datasets.Dataset.from_dict(index, features=features)
    return pairs.with_transform(_ImageLookup(ds.select_columns(_image_columns(c)), c, base_dir))


class _ImageLookup:
    """``with_transform`` function of an index table: adds ``jpg_0``/``jpg_1`` from the source's rows."""

    def __init__(self, images, columns: ColumnMap, base_dir: Path):
        self.images, self.columns, self.base_dir = images, columns, base_dir

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out = {name: batch[name] for name in MAPPED_COLUMNS if name in batch}
        if "source_row" not in batch or "slot_0" not in batch:
            return out
        stored = self.images[list(batch["source_row"])]
        rows = [{name: values[n] for name, values in stored.items()} for n in range(len(batch["source_row"]))]
        for side in (0, 1):
            out[f"jpg_{side}"] = [_image(row, self.columns, side, slot, self.base_dir)
                                  for row, slot in zip(rows, batch[f"slot_{side}"])]
        return {name: out[name] for name in MAPPED_COLUMNS if name in out}
