"""Property-based fuzzing of what a user hands the package: every command's config keys (through the real CLI
entry, in process) and the rows of the pair readers (JSONL and parquet).

The property: a run either works or ends with exit 2 and a message naming the key or the row; never a
traceback (an exception other than InputError escaping fails the test, as hypothesis shows it), never a
success with a wrong result (a value other than the one given, a non-finite number, a config that does not
reload as it was saved, a pair that differs from its row, a bad row that is not counted).

Config runs stop where the heavy work would start: each command's ``parse_args`` (the config's parsing and
its checks) runs for real, then its result is handed back instead of running the command, and the checks a
command makes before it writes anything (``train``'s inputs, the demo's base) run on it.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import math
import types
import typing
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffusion_dpo import cli
from diffusion_dpo.config import load_config, save_config, validate
from diffusion_dpo.errors import InputError

settings.register_profile("fuzz", max_examples=60, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ = settings.get_profile("fuzz")


# ------------------------------------------------------------------------------------------ config keys

class _Parsed(Exception):
    """Raised by the patched ``parse_args`` to hand the parsed config back instead of running the command."""

    def __init__(self, cfg: Any):
        super().__init__("parsed")
        self.cfg = cfg


def _commands() -> dict[str, str]:
    """Every command by its argv prefix ("train", "llm dpo") -> its recipe module."""
    out = {}
    for name, (module, _) in cli.COMMANDS.items():
        if isinstance(module, dict):
            out.update({f"{name} {m}": mod for m, (mod, _) in module.items()})
        else:
            out[name] = module
    return out


COMMANDS = _commands()
# Keys a command cannot do without (its checks refuse the config otherwise).
REQUIRED = {"llm ppo": ["reward.function=my_rewards:length", "model.lora.enabled=true"],
            "llm dpo": ["model.lora.enabled=true"], "train": ["data.source=tiny"]}


def _prechecks(command: str, cfg: Any) -> None:
    """The checks a command makes on its config before it writes anything or loads a model."""
    if command == "train":
        from diffusion_dpo.recipes import train

        train.check_inputs(cfg)
    elif command == "demo":
        _demo_stages_accept(cfg)


def _demo_stages_accept(cfg: Any) -> None:
    """The demo's own checks stand for those of the commands it runs: a demo config it accepts must give
    every stage (label, train, evaluate, grpo) a config that stage accepts, and prompts on both sides of the
    world's split; else the demo would fail minutes in, after writing, naming a key the user did not type."""
    from diffusion_dpo.config import ConfigError
    from diffusion_dpo.recipes import demo, demo_common, demo_online
    from scorers.shapes.world import split_prompts

    base, where = demo_common.check_base(cfg), Path("unused")
    online = cfg.method in demo.ONLINE_METHODS
    cfg = demo_online.resolve_online_defaults(cfg) if online else demo.resolve_defaults(cfg)
    stages = {"evaluate": demo_common.evaluate_config(cfg, base, base, where, where, None)}
    if online:
        stages["grpo"] = demo_online.grpo_config(cfg, base, where, where, None)
    else:
        stages |= {"label": demo.label_config(cfg, base, where, where, 1, None),
                   "train dpo": demo.train_config(cfg, "dpo", base, where, where, 1, None),
                   "train sft": demo.train_config(cfg, "sft", base, where, where, 1, None)}
    for name, stage in stages.items():
        try:
            validate(stage)
        except ConfigError as e:
            raise AssertionError(f"the demo accepted a config its {name} stage refuses: {e}") from None
    assert all(split_prompts(cfg.world.held_out_fraction, cfg.world.split_seed)), "a side of the split is empty"


def _run_cli(command: str, args: list[str]) -> tuple[Any, int, str]:
    """``diffusion-dpo <command> <args>`` up to its parsed config: (config or None, exit code, stderr)."""
    module = importlib.import_module(COMMANDS[command])
    real = module.parse_args

    def capture(cls, argv, **kwargs):
        cfg = real(cls, argv, **kwargs)
        _prechecks(command, cfg)
        raise _Parsed(cfg)

    err = io.StringIO()
    with mock.patch.object(module, "parse_args", capture), redirect_stderr(err):
        try:
            code = cli.main([*command.split(), *REQUIRED.get(command, []), *args])
        except _Parsed as parsed:
            return parsed.cfg, 0, ""
    return None, code, err.getvalue()


def _leaf_keys(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, declared type) of every key of a config class, sections walked, sections included."""
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        if name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        out.append((prefix + name, tp))
        if dataclasses.is_dataclass(tp):
            out += _leaf_keys(tp, f"{prefix}{name}.")
    return out


def _config_class(command: str) -> type:
    cfg, code, err = _run_cli(command, [])
    assert cfg is not None, f"{command} with its defaults: exit {code}: {err}"
    return type(cfg)


KEYS = {command: _leaf_keys(_config_class(command)) for command in COMMANDS}

EDGE_VALUES = [
    "", "null", "~", "0", "-1", "-0", "1", "2", "0.5", "-1e-8", "1e-4", "1e999", "-1e999", ".nan", ".inf", "-.inf",
    "nan", "inf", "99999999999999999999999", "-99999999999999999999999", "true", "false", "no", "on", "[]",
    "[1, 2]", "[a, b, c]", "[.nan]", "{}", "{a: 1}", "{1: 2}", "'quoted'", '"dq"', "ü✓中文", "x" * 5000,
    "a=b", " spaced ", "[", "{", ": x", "- a", "!!python/object/apply:os.system [echo]", "&a [*a]", "*a", "%",
    "@x", "`", "#c", "\t", "a\nb", "\x00", "🙂" * 300, "/nonexistent/dir", "owner/name", "tiny", "auto",
]
VALUES = st.one_of(st.sampled_from(EDGE_VALUES), st.text(max_size=40), st.integers().map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(str))
# Values a YAML file can hold: scalars of every type, lists, mappings.
YAML_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(),
              st.text(max_size=30), st.sampled_from(["", "x" * 3000, "1e999", ".nan", "auto", "no"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)


# The edges of numbers: where most checks live, and where YAML reads surprising things.
INT_EDGES = ["0", "-0", "-1", "1", "99999999999999999999999", "0.5", "1e3", "null", "true", "[1]", "x"]
FLOAT_EDGES = [".nan", ".inf", "-.inf", "1e999", "-1e999", str(10 ** 400), "0", "-1", "-1e-8", "1e-4", "null"]


def _holds(tp: Any, kind: type) -> bool:
    """Whether a declared type holds ``kind`` (in a union or a list too)."""
    return tp is kind or any(_holds(arm, kind) for arm in get_args(tp))


def _values_for(command: str, key: str):
    """Values for ``key``: mostly the edges of its type (hypothesis picks an arm of one_of evenly), or
    anything."""
    tp = dict(KEYS[command]).get(key)
    edges = st.sampled_from(FLOAT_EDGES if _holds(tp, float) else INT_EDGES if _holds(tp, int) else EDGE_VALUES)
    return st.one_of(edges, edges, VALUES)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def _fits(value: Any, tp: Any) -> bool:
    """Whether a parsed value has its key's declared type (floats finite)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_fits(value, arm) for arm in get_args(tp))
    if tp is Any:
        return True
    if origin is Literal:
        return value in get_args(tp)
    if tp is type(None):
        return value is None
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp)
    if origin in (list, tuple) or tp is list:
        return isinstance(value, list) and all(_fits(v, (get_args(tp) or (Any,))[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, float) and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _check_outcome(command: str, key: str, cfg: Any, code: int, err: str, tmp: Path) -> None:
    """Works with the value taken as given, or exit 2 naming the key (or the part of it that is wrong). A
    command-line key is read stripped, and one that is only blanks has no name to give."""
    if cfg is None:
        assert code == 2, f"{command} {key}: exit {code}: {err}"
        if not key.strip() and "has no key" in err:
            return
        parts = key.split(".")
        named = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] + [parts[-1]]
        named = [f"'{n}'" for n in named + [n.strip() for n in named]] + [n for n in named if n.strip()]
        assert any(n in err for n in named), f"{command} {key}: the message names no key: {err}"
        assert "Traceback" not in err
        return
    tp = dict(KEYS[command]).get(key)
    if tp is not None:
        assert _fits(_get(cfg, key), tp), f"{command} {key}: parsed as {_get(cfg, key)!r}, declared {tp}"
    validate(cfg)
    save_config(cfg, tmp / "config.yaml")  # what a run writes, and a resume reads back
    assert load_config(type(cfg), [str(tmp / "config.yaml")]) == cfg, f"{command} {key}: config.yaml differs"


def _keys_and_junk(command: str):
    """A declared key, or one that cannot be: unknown, dotted into a non-section, empty parts, unicode."""
    keys = [k for k, _ in KEYS[command]]
    junk = st.one_of(st.sampled_from(keys).map(lambda k: k + ".x"), st.sampled_from(keys).map(lambda k: k + "_"),
                     st.sampled_from(["", ".", "..", "ü", "a.b.c", " ", "optim..lr"]),
                     st.text(min_size=1, max_size=10).filter(lambda k: "=" not in k))
    return st.one_of(st.sampled_from(keys), st.sampled_from(keys), junk)


def _output_dir(command: str, tmp_path: Path) -> list[str]:
    """A run folder in the test's own folder (that must stay unmade), for the commands that have one."""
    return [f"output_dir={tmp_path / 'run'}"] if "output_dir" in dict(KEYS[command]) else []


@pytest.mark.parametrize("command", sorted(COMMANDS))
@FUZZ
@given(data=st.data())
def test_fuzz_command_line_values(command, tmp_path, data):
    key = data.draw(_keys_and_junk(command), label="key")
    value = data.draw(_values_for(command, key), label="value")
    cfg, code, err = _run_cli(command, [*_output_dir(command, tmp_path), f"{key}={value}"])
    _check_outcome(command, key, cfg, code, err, tmp_path)
    if cfg is not None and dict(KEYS[command]).get(key) is str:
        assert _get(cfg, key) == value  # a string key keeps exactly what was typed
    assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_key_meets_the_values_every_check_must_stop(command, tmp_path):
    """The sweep beside the random draws: every key once with a value that holds itself, every number key
    with the non-finite numbers (a random draw meets each of these only now and then)."""
    for key, tp in KEYS[command]:
        for value in ["&a [*a]", *([".nan", "-.inf", "1e999"] if _holds(tp, float) else [])]:
            cfg, code, err = _run_cli(command, [*_output_dir(command, tmp_path), f"{key}={value}"])
            _check_outcome(command, key, cfg, code, err, tmp_path)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@FUZZ
@given(data=st.data())
def test_fuzz_config_file_values(command, tmp_path, data):
    key = data.draw(_keys_and_junk(command), label="key")
    value = data.draw(YAML_VALUES, label="value")
    assume(all(yaml.safe_load(yaml.safe_dump({p: 1}, allow_unicode=True)) == {p: 1} for p in key.split(".")))
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(nested, allow_unicode=True))
    cfg, code, err = _run_cli(command, ["--config", str(path), *_output_dir(command, tmp_path)])
    _check_outcome(command, key, cfg, code, err, tmp_path)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- pair rows

READERS = settings(FUZZ, max_examples=25)
# What can be in a row, and what the reader must make of it: a pair (winner first), a counted bad row (its
# reason), a dropped tie, or, for a JSONL field that does not fit the file's schema, the file refused naming
# its line.
GOOD = ("first", "second", "first_by_label", "second_by_label")
COUNTED = {"null_caption": "missing_caption", "label_2_0": "bad_label", "label_minus": "bad_label",
           "label_03": "bad_label", "label_11": "bad_label", "label_00": "bad_label", "label_nan": "bad_label",
           "label_null": "bad_label", "not_an_image": "bad_image", "empty_image": "bad_image"}
JSONL_REFUSED = ("no_caption", "no_image", "no_labels", "image_null", "image_int", "label_text", "label_bool",
                 "label_list", "caption_int", "image_missing_file", "image_is_folder")
KINDS = st.sampled_from([*GOOD, *GOOD, "tie", *COUNTED, *JSONL_REFUSED])
CAPTIONS = st.one_of(st.text(max_size=30), st.sampled_from(["", "ü✓中文 🙂", "x" * 3000, "\x00", "a\nb"]))
LABELS = {"first": (1, 0), "second": (0, 1), "tie": (0.5, 0.5), "label_2_0": (2, 0), "label_minus": (-1, 1),
          "label_03": (0.3, 0.7), "label_11": (1, 1), "label_00": (0, 0), "label_nan": (math.nan, 1)}


def _colour(row: int, slot: int) -> tuple[int, int, int]:
    return (20 + 30 * (row % 7), 200 - 20 * (row % 9), 60 + 150 * slot)


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _expected(kinds: list[str]) -> dict[str, Any]:
    """What the reader must report for these rows (JSONL's refused fields aside)."""
    return {"pairs": {i for i, k in enumerate(kinds) if k in GOOD},
            "counted": {i: COUNTED[k] for i, k in enumerate(kinds) if k in COUNTED},
            "ties": sum(k == "tie" for k in kinds)}


def _check_pairs(source: Path, kinds: list[str], captions: list[str], tmp: Path, label_type: str = "number"):
    """Read ``source`` through PreferencePairs: good rows come out unchanged (caption, winner first), bad ones
    are counted naming their row, ties dropped; with no pair to train on, an InputError naming the source."""
    from diffusion_dpo.data import DataConfig, PreferencePairs

    expect = _expected(kinds)
    if label_type != "number":  # text or true/false labels are not the numbers 1/0: every row is a bad label
        expect = {"pairs": set(), "ties": 0,
                  "counted": {i: "missing_caption" if k == "null_caption" else "bad_label" for i, k in enumerate(kinds)}}
    cfg = DataConfig(source=str(source), resolution=8, caption_dropout=0.0, random_flip=False,
                     max_bad_fraction=1.0, cache_dir=str(tmp / "hf-cache"))
    usable = expect["pairs"] | {i for i, r in expect["counted"].items() if r == "bad_image"}
    if not usable:
        with pytest.raises(InputError, match="0 usable pairs"):
            PreferencePairs(cfg, seed=0)
        return
    data = PreferencePairs(cfg, seed=0)
    stats = data.stats()
    row_reasons = {r: n for r, n in stats["bad_rows"].items() if r in ("bad_label", "missing_caption")}
    expected_rows = {}
    for r in expect["counted"].values():
        if r != "bad_image":
            expected_rows[r] = expected_rows.get(r, 0) + 1
    assert row_reasons == expected_rows and stats["ties_dropped"] == expect["ties"]
    if expected_rows:
        first = min(i for i, r in expect["counted"].items() if r != "bad_image")
        assert stats["first_bad"].startswith(f"row {first} of {source}")
    if not expect["pairs"]:
        with pytest.raises(InputError, match="0 usable pairs"):
            next(data.batches(1))
        return
    batches = data.batches(1)
    seen = set()
    for _ in expect["pairs"]:
        batch = next(batches)
        (row,) = batch["row_indices"].tolist()
        seen.add(row)
        winner = 1 if kinds[row] in ("second", "second_by_label") else 0
        assert batch["captions"] == [captions[row]]
        pixels = (batch["pixel_values"][0] + 1) * 127.5  # [2, 3, 8, 8], winner first
        for position, slot in enumerate((winner, 1 - winner)):
            got = pixels[position].mean(dim=(1, 2)).round().tolist()
            assert got == list(_colour(row, slot)), f"row {row} ({kinds[row]}) image {position}"
    assert seen == expect["pairs"]
    bad_images = data.stats()["bad_rows"].get("bad_image", 0)
    assert bad_images <= sum(r == "bad_image" for r in expect["counted"].values())


def _jsonl_object(i: int, kind: str, caption: str, folder: Path) -> dict[str, Any]:
    for slot in (0, 1):
        (folder / f"{i}-{slot}.png").write_bytes(_png(_colour(i, slot)))
    obj: dict[str, Any] = {"caption": caption, "image_0": f"{i}-0.png", "image_1": f"{i}-1.png"}
    label_0, label_1 = LABELS.get(kind, LABELS["first"])
    if kind in ("first_by_label", "second_by_label"):
        obj["label"] = 0 if kind == "first_by_label" else 1
    else:
        obj |= {"label_0": label_0, "label_1": label_1}
    broken = {"null_caption": {"caption": None}, "label_null": {"label_0": None}, "image_null": {"image_0": None},
              "image_int": {"image_1": 7}, "label_text": {"label_0": "1"}, "label_bool": {"label_1": False},
              "label_list": {"label_0": [1]}, "caption_int": {"caption": 3},
              "image_missing_file": {"image_0": "nowhere/x.png"}, "image_is_folder": {"image_1": "."}}
    obj |= broken.get(kind, {})
    if kind in ("not_an_image", "empty_image"):
        (folder / f"{i}-1.png").write_bytes(b"not an image at all" if kind == "not_an_image" else b"")
    for gone, field in (("no_caption", "caption"), ("no_image", "image_0"), ("no_labels", "label_0")):
        if kind == gone:
            del obj[field]
    return obj


@READERS
@given(rows=st.lists(st.tuples(KINDS, CAPTIONS), min_size=1, max_size=6))
def test_fuzz_jsonl_pair_rows(tmp_path_factory, rows):
    tmp = tmp_path_factory.mktemp("jsonl")
    kinds, captions = [k for k, _ in rows], [c for _, c in rows]
    objects = [_jsonl_object(i, k, c, tmp) for i, (k, c) in enumerate(rows)]
    source = tmp / "pairs.jsonl"
    source.write_text("".join(json.dumps(o) + "\n" for o in objects))
    # A JSONL label must be a number: a null one refuses the file (naming its line), as a text one does.
    refused = [i for i, k in enumerate(kinds) if k in JSONL_REFUSED or k == "label_null"]
    if refused:
        from diffusion_dpo.data import DataConfig, PreferencePairs

        with pytest.raises(InputError) as error:
            PreferencePairs(DataConfig(source=str(source), cache_dir=str(tmp / "hf-cache")), seed=0)
        assert f"{source} line {refused[0] + 1}:" in str(error.value)
        return
    _check_pairs(source, kinds, captions, tmp)


PARQUET_KINDS = st.sampled_from([*GOOD, *GOOD, "tie", *COUNTED, "image_null", "image_garbage"])


@READERS
@given(rows=st.lists(st.tuples(PARQUET_KINDS, CAPTIONS), min_size=1, max_size=6),
       label_type=st.sampled_from(["float64", "float64", "int64", "string", "bool"]))
def test_fuzz_parquet_pair_rows(tmp_path_factory, rows, label_type):
    tmp = tmp_path_factory.mktemp("parquet")
    kinds = [k.replace("image_null", "empty_image").replace("image_garbage", "not_an_image") for k, _ in rows]
    captions = [None if k == "null_caption" else c for k, c in zip(kinds, (c for _, c in rows))]
    columns: dict[str, list] = {"caption": captions, "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i, (kind, (given_kind, _)) in enumerate(zip(kinds, rows)):
        labels = LABELS.get(kind.replace("_by_label", ""), LABELS["first"])
        labels = (None, labels[1]) if kind == "label_null" else labels
        columns["jpg_0"].append(_png(_colour(i, 0)))
        broken_image = {"image_null": None, "image_garbage": b"\x89PNG broken", "not_an_image": b"text",
                        "empty_image": b""}
        columns["jpg_1"].append(broken_image.get(given_kind, _png(_colour(i, 1))))
        columns["label_0"].append(labels[0])
        columns["label_1"].append(labels[1])
    if label_type != "float64":
        integral = all(v is None or float(v).is_integer() for c in ("label_0", "label_1") for v in columns[c])
        convert = {"int64": int, "string": str, "bool": bool}[label_type]
        if label_type == "int64" and not integral:
            label_type = "float64"
        else:
            for c in ("label_0", "label_1"):
                columns[c] = [None if v is None else convert(v) for v in columns[c]]
    table = pa.table({**columns, "label_0": pa.array(columns["label_0"]), "label_1": pa.array(columns["label_1"])})
    (tmp / "pairs").mkdir()
    pq.write_table(table, tmp / "pairs" / "train-00000.parquet")
    number = label_type in ("float64", "int64")
    _check_pairs(tmp / "pairs", kinds, [c if c is not None else "" for c in captions], tmp,
                 "number" if number else label_type)


# ------------------------------------------------------------------------------ what the fuzzing found

@pytest.mark.parametrize("command, override, message", [
    ("train", "optim.learning_rate=.inf", "'optim.learning_rate': expected a finite number, got inf"),
    ("train", "optim.learning_rate=1e999", "'optim.learning_rate': expected a finite number, got inf"),
    ("grpo", "online.clip_range=.inf", "'online.clip_range': expected a finite number"),
    ("grpo", "sampling.guidance_scale=.nan", "'sampling.guidance_scale': expected a finite number"),
    ("train", f"optim.eps={10 ** 400}", "'optim.eps': expected a finite number"),
    ("train", "overwrite=&a [*a]", "alias *a refers to the value that holds it"),
    ("train", "\xa0=1", "has no key before '='"),
    ("demo", "train.loss.beta=0", "'train.loss.beta': expected null or a positive number"),
    ("demo", "train.optim.batch_size=0", "'train.optim.batch_size': expected at least 1"),
    ("demo", "world.held_out_fraction=1e-4", "'world.held_out_fraction'"),
    ("demo", "sampling.num_inference_steps=0", "'sampling.num_inference_steps': expected at least 1"),
    ("demo", "online.optim.learning_rate=-1", "'online.optim.learning_rate': expected null or a positive number"),
])
def test_what_fuzzing_found_is_refused_naming_the_key(tmp_path, command, override, message):
    cfg, code, err = _run_cli(command, [f"output_dir={tmp_path / 'run'}", override])
    assert cfg is None and code == 2 and message in err, err
    assert not (tmp_path / "run").exists()


def test_a_yaml_value_holding_itself_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("optim: &a {learning_rate: 1, nested: *a}\n")
    cfg, code, err = _run_cli("train", ["--config", str(path), f"output_dir={tmp_path / 'run'}"])
    assert code == 2 and f"config file {path} is not valid YAML" in err and "refers to the value that holds it" in err


def test_labels_are_numbers_not_text_or_booleans():
    """An unmapped source's labels are read as a mapped one's: the text "1" or true is not the label 1."""
    from diffusion_dpo.data import row_verdict

    assert row_verdict("c", 1, 0) == ("first", "") and row_verdict("c", 0.0, 1.0) == ("second", "")
    assert row_verdict("c", np.float64(0.5), np.int64(0) + 0.5)[0] == "tie"
    for labels in (("1", "0"), (True, False), ("0.5", "0.5"), (None, 1)):
        reason, detail = row_verdict("c", *labels)
        assert reason == "bad_label" and repr(labels[0]) in detail
