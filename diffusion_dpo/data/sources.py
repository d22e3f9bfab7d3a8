"""Opening a preference-pair source: a hub dataset id, a parquet folder or file, or a JSONL file naming
images.

A source is one of

* a hub dataset id (``Rapidata/700k_Human_Preference_Dataset_FLUX_SD3_MJ_DALLE3``; ``streaming=True`` reads a
  large one without downloading it),
* a local folder of parquet shards (every ``*.parquet`` directly in it, sorted by name, or in its
  ``<split>/`` subfolder when that exists; other files are ignored),
* a single ``.parquet`` file,
* a ``.jsonl`` file whose rows name image files (paths relative to the JSONL file's folder)::

      {"caption": "a red dog", "image_0": "img/0a.png", "image_1": "img/0b.png", "label_0": 1, "label_1": 0}

  ``"label": 0`` (image_0 preferred), ``1`` (image_1 preferred) or ``0.5`` (tie) may replace the two
  label fields. The rows become the Pick-a-Pic columns, with ``jpg_0``/``jpg_1`` holding the files' bytes
  (a video's side may name an animated WebP/GIF or MP4 file, or a folder of frame images: see
  :mod:`~diffusion_dpo.data.videos`).

Rows carry ``caption`` (str), ``jpg_0``/``jpg_1`` (encoded image bytes) and ``label_0``/``label_1``
(1/0, 0/1 or 0.5/0.5 for a tie).

    ds = open_pairs("pairs/")                                    # raw rows, a datasets.Dataset
    image = decode_image(ds[0]["jpg_0"], "row 0 column jpg_0")   # PIL RGB
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any, Iterator, Optional

from diffusion_dpo.data.columns import ColumnMap, is_default, map_columns
from diffusion_dpo.data.images import keep_images_encoded
from diffusion_dpo.data.videos import FRAME_SUFFIXES, frame_folder_problem
from diffusion_dpo.errors import InputError
from diffusion_dpo.fileio import read_text

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
_JSONL_SHARD_ROWS = 1000
# owner/name as the hub spells dataset ids (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")


def open_pairs(source: str | Path, split: str = "train", streaming: bool = False, *,
               cache_dir: str | None = None, columns: Optional[ColumnMap] = None):
    """Open a preference-pair source and return its raw rows.

    Returns a ``datasets.Dataset`` (``streaming=False``) or ``datasets.IterableDataset`` whose rows are
    dicts with at least the columns in ``REQUIRED_COLUMNS``; images stay encoded (see :func:`decode_image`).
    ``cache_dir`` is where ``datasets`` keeps its arrow copy of a map-style hub or parquet source
    (None: its default, ``HF_DATASETS_CACHE``). ``columns`` maps a foreign schema to ours (see
    :mod:`diffusion_dpo.data.columns`; None or the default: the source is read as it is). Raises InputError
    for a missing path, an implausible id, a JSONL row that does not fit, or missing columns (naming them
    and listing the ones present).
    """
    source_str = str(source)
    mapped = not is_default(columns)
    ds, base_dir = _open_raw(source_str, split, streaming, cache_dir, jsonl_as_is=mapped)
    if mapped:
        return map_columns(ds, columns, source_str, base_dir, streaming)
    check_columns(ds, source_str)
    return keep_images_encoded(ds, IMAGE_COLUMNS)


def _open_raw(source_str: str, split: str, streaming: bool, cache_dir: str | None, jsonl_as_is: bool):
    """The source's rows as stored, and the folder its relative image paths start from."""
    import datasets

    path = Path(source_str).expanduser()
    base_dir = Path.cwd()
    if path.is_dir():
        ds, base_dir = _load_parquet(_parquet_files(path, split), source_str, streaming, cache_dir), path
    elif path.is_file() and path.suffix == ".parquet":
        ds, base_dir = _load_parquet([path], source_str, streaming, cache_dir), path.parent
    elif path.is_file() and path.suffix in (".jsonl", ".json"):
        ds = _load_jsonl_objects(path, streaming) if jsonl_as_is else _load_jsonl(path, streaming)
        base_dir = path.parent
    elif path.is_file():
        raise InputError(f"data source {source_str}: expected a folder of parquet shards, a .parquet file or "
                         f"a .jsonl file, got a {path.suffix or 'suffix-less'} file")
    elif _looks_like_hub_id(source_str):
        try:
            ds = datasets.load_dataset(source_str, split=split, streaming=streaming, cache_dir=cache_dir)
        except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as e:
            raise InputError(f"data source {source_str}: not a local path, and the hub has no such dataset "
                             f"(or split '{split}'): {e}") from None
        except ValueError as e:  # an unknown split is a ValueError in datasets
            raise InputError(f"data source {source_str}: {e}") from None
        except ConnectionError as e:
            raise InputError(f"data source {source_str}: not a local path, and the hub cannot be reached "
                             f"({e}); give a local parquet folder or JSONL file offline") from None
    elif source_str.startswith((".", "/", "~")) or source_str.endswith((".parquet", ".jsonl", ".json")):
        raise InputError(f"data source {source_str} does not exist")
    else:
        raise InputError(f"data source {source_str} is neither an existing file or folder nor a hub dataset "
                         "id of the form owner/name (e.g. ymhao/HPDv2)")
    return ds, base_dir


def _looks_like_hub_id(source: str) -> bool:
    """owner/name, not a file name, and not a path whose first folder exists here (a typo, not an id)."""
    if not _HUB_ID.match(source) or source.endswith((".parquet", ".jsonl", ".json")):
        return False
    return not Path(source.split("/")[0]).is_dir()


def _parquet_files(folder: Path, split: str) -> list[Path]:
    """``folder/<split>/*.parquet`` if that folder exists, else ``folder/*.parquet``, sorted by name."""
    where = folder / split if (folder / split).is_dir() else folder
    files = sorted(p for p in where.glob("*.parquet") if p.is_file())
    if not files:
        raise InputError(f"data source {folder}: no *.parquet files in {where}")
    return files


def _load_parquet(files: list[Path], source: str, streaming: bool, cache_dir: str | None):
    import datasets
    import pyarrow
    import pyarrow.parquet as pq

    for file in files:  # a footer per file, read now: datasets would fail on one without naming it
        try:
            pq.read_metadata(file)
        except (pyarrow.ArrowException, OSError) as e:
            raise InputError(f"data source {source}: {file} is not a readable parquet file ({e}); expected a "
                             "whole parquet file (one cut short lacks its footer)") from None
    try:
        return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train",
                                     streaming=streaming, cache_dir=cache_dir)
    except datasets.exceptions.DatasetGenerationError as e:
        raise InputError(f"data source {source}: cannot read its parquet files: {e.__cause__ or e}") from None


def check_columns(ds, source: str) -> None:
    """Raise InputError naming ``source`` and the missing required columns, listing those it has."""
    columns = ds.column_names
    if columns is None:  # a streaming source without declared features: look at its first row
        columns = list(next(iter(ds), {}).keys())
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise InputError(f"data source {source} lacks column(s) {', '.join(missing)}; it has: "
                         f"{', '.join(columns) or '(none)'}; expected the Pick-a-Pic columns "
                         f"{', '.join(REQUIRED_COLUMNS)}")


# ------------------------------------------------------------------------------------------------- JSONL

def _jsonl_objects(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for each non-empty line; a line that is not a JSON object is an InputError."""
    # Lines as a file object splits them (at \n, \r\n or \r), not at the other breaks str.splitlines knows.
    for lineno, line in enumerate(io.StringIO(read_text(path, "data source"), newline=None), start=1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj


def read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """Parse a pairs JSONL file into rows with ``caption``, absolute ``image_0``/``image_1`` paths and
    ``label_0``/``label_1``; every problem is an InputError naming the line and field."""
    rows = [_jsonl_row(obj, path.parent, where) for where, obj in _jsonl_objects(path)]
    if not rows:
        raise InputError(f"data source {path}: the JSONL file has no rows")
    return rows


def _load_jsonl_objects(path: Path, streaming: bool):
    """A JSONL file's objects as they are (for a column map to read): a Dataset, or a stream sharded by
    ``_JSONL_SHARD_ROWS`` rows. Fields keep the types ``datasets`` infers from all rows."""
    import datasets

    objects = [obj for _, obj in _jsonl_objects(path)]
    if not objects:
        raise InputError(f"data source {path}: the JSONL file has no rows")
    try:
        ds = datasets.Dataset.from_list(objects)
    except (ValueError, TypeError, ArithmeticError) as e:  # pyarrow: one field with values of several types
        raise InputError(f"data source {path}: its rows do not share one type per field: {e}") from None
    return ds.to_iterable_dataset(num_shards=-(-len(objects) // _JSONL_SHARD_ROWS)) if streaming else ds


def _jsonl_row(obj: dict[str, Any], base: Path, where: str) -> dict[str, Any]:
    """One JSONL object as a Pick-a-Pic row whose ``jpg_0``/``jpg_1`` still hold absolute file paths."""
    missing = [k for k in ("caption", "image_0", "image_1") if k not in obj]
    if "label" not in obj and not ("label_0" in obj and "label_1" in obj):
        missing.append("label (or label_0 and label_1)")
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}; it has: "
                         f"{', '.join(obj) or '(none)'}")
    if "label" in obj:
        # label = probability that image_1 is preferred: 0 -> image_0 wins, 1 -> image_1 wins, 0.5 -> tie.
        label_1 = _number(obj["label"], "label", where)
        label_0 = 1.0 - label_1
    else:
        label_0 = _number(obj["label_0"], "label_0", where)
        label_1 = _number(obj["label_1"], "label_1", where)
    caption = obj["caption"]
    if caption is not None and not isinstance(caption, str):
        raise InputError(f"{where}: caption must be a string, got {caption!r}")
    row = {"caption": caption}
    for i in (0, 1):
        name = obj[f"image_{i}"]
        if not isinstance(name, str):
            raise InputError(f"{where}: image_{i} must be a path string, got {name!r}")
        file = (base / name).resolve()
        if not file.is_file() and not file.is_dir():  # a folder: a video's frame images (data.videos)
            raise InputError(f"{where}: image_{i} file {name} does not exist (looked for {file})")
        if file.is_dir() and (problem := frame_folder_problem(file)):
            raise InputError(f"{where}: image_{i} {name} is a folder but not a video's frames: {problem} (a frame "
                             f"folder holds only image files, {', '.join(FRAME_SUFFIXES)}, in frame order by name)")
        row[f"jpg_{i}"] = str(file)
    return row | {"label_0": label_0, "label_1": label_1}


def _number(value: Any, field: str, where: str) -> float:
    """A JSON number as float. Whether it is a valid label (0, 0.5, 1) is checked later with every source."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: {field} must be a number (0, 0.5 or 1), got {value!r}")
    return float(value)


def _read_image_files(batch: dict[str, list]) -> dict[str, list]:
    """A ``with_transform`` function: JSONL path strings in ``jpg_0``/``jpg_1`` become the files' bytes."""
    out = dict(batch)
    for column in IMAGE_COLUMNS:
        if column in out:
            out[column] = [_file_value(p) for p in out[column]]
    return out


def _file_value(path: str) -> bytes | str:
    """A JSONL row's image file as its bytes; a folder (a video's frames) as its path, read by data.videos."""
    return path if Path(path).is_dir() else Path(path).read_bytes()


def _streamed_file(path: str, where: str) -> bytes:
    if Path(path).is_dir():
        raise InputError(f"{where}: {path} is a folder of frames, which a streamed JSONL source cannot carry; "
                         "set data.streaming=false, or store the video as an animated WebP file")
    return Path(path).read_bytes()


def _jsonl_shards(shards: list[list[dict[str, Any]]]):
    """Generator for a streaming JSONL source: rows of the given shards, image paths read as bytes."""
    for shard in shards:
        for row in shard:
            yield {k: (_streamed_file(v, f"column {k}") if k in IMAGE_COLUMNS else v) for k, v in row.items()}


def _load_jsonl(path: Path, streaming: bool):
    """A JSONL source as Pick-a-Pic rows. The rows keep their image paths (each file checked to exist up
    front) and read the bytes on access, so a large JSONL set is not held in memory."""
    import datasets

    rows = read_jsonl_rows(path)
    if streaming:
        features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Value("binary"),
                                      "jpg_1": datasets.Value("binary"), "label_0": datasets.Value("float64"),
                                      "label_1": datasets.Value("float64")})
        # A list in gen_kwargs is how datasets shards a generator (for workers and split_dataset_by_node).
        shards = [rows[i:i + _JSONL_SHARD_ROWS] for i in range(0, len(rows), _JSONL_SHARD_ROWS)]
        return datasets.IterableDataset.from_generator(_jsonl_shards, features=features,
                                                       gen_kwargs={"shards": shards})
    return datasets.Dataset.from_list(rows).with_transform(_read_image_files)
