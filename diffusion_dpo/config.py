"""One dataclass per recipe, filled from YAML files and dotted ``key=value`` overrides.

Every field is declared with :func:`option`, which carries its help text, so ``--help`` can list each key
with its type, default and meaning. Unknown keys and values of the wrong type are errors that name the key;
nothing is silently coerced except an int given where a float is expected.

Values are read as YAML 1.1 (files and overrides alike), which turns ``no``/``on`` into booleans and ``0.5``
into a number. The declared type decides instead: a key typed ``str`` or a Literal of strings takes an
unquoted value's text as written (``mixed_precision: no`` is ``"no"``), every other key YAML's reading of it
(``flag: no`` is false).

    @dataclass
    class TrainConfig:
        model: ModelConfig = option(ModelConfig, "which checkpoint to tune")
        output_dir: str = option("runs/train", "where checkpoints, metrics and final weights go")

    cfg = parse_args(TrainConfig, ["--config", "cfg.yaml", "train.max_steps=10"], prog="diffusion-dpo train")
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, Union, get_args, get_origin

import yaml

from diffusion_dpo.config_files import resolve_config
from diffusion_dpo.config_yaml import Plain, load_yaml, resolved
from diffusion_dpo.errors import InputError
from diffusion_dpo.fileio import read_text

T = TypeVar("T")
_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(InputError):
    """A config file or override that does not fit the recipe's dataclass."""


def _mismatch(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"config key '{key}': expected {expected}, got {resolved(value)!r}")


def _wants_text(tp: Any) -> bool:
    return tp is str or (get_origin(tp) is Literal and all(isinstance(a, str) for a in get_args(tp)))




def option(default: Any, help: str, check: Callable[[Any], bool] | None = None, expected: str = "") -> Any:
    """A dataclass field with a help string and, optionally, its check.

    ``default`` may be a dataclass type, a dataclass instance (a section with recipe-specific defaults), a
    list or a dict. ``check(value) -> bool`` is applied by :func:`validate`; a failure raises ConfigError
    naming the key, ``expected`` and the value.
    """
    metadata = {"help": help, "check": check, "expected": expected}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=metadata)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def validate(cfg: Any, prefix: str = "") -> None:
    """Apply every field's declared check, then each section's ``check()`` method (for rules that join two
    keys), depth first; raise ConfigError naming the first key whose value cannot work."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")
        check = f.metadata.get("check")
        if check is not None and not check(value):
            raise ConfigError(f"config key '{prefix}{f.name}': expected {f.metadata['expected']}, got {value!r}")
    joint = getattr(cfg, "check", None)
    if callable(joint):
        try:
            joint()
        except ConfigError as e:
            raise ConfigError(str(e).replace("config key '", f"config key '{prefix}", 1)) from None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` if it fits type ``tp`` (int is accepted for float), else raise naming ``key``.

    An unquoted scalar (:class:`Plain`) is taken as its text where ``tp`` wants a string, else as YAML's
    reading of it; in a union, YAML's reading is tried on every arm first, so ``null`` for ``Optional[str]``
    is None while ``no`` is ``"no"``.
    """
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        readings = [value.value, value] if isinstance(value, Plain) else [value]
        for reading in readings:
            for arg in get_args(tp):
                try:
                    return _check(reading, arg, key)
                except ConfigError:
                    pass
        read = value.value if isinstance(value, Plain) else value
        if float in get_args(tp) and isinstance(read, float) and not math.isfinite(read):
            raise _mismatch(key, "a finite number", value.text if isinstance(value, Plain) else value)
        raise _mismatch(key, _type_name(tp), value.text if isinstance(value, Plain) else value)
    if isinstance(value, Plain):
        # An error below then quotes what the user wrote (`No`, `maybe`), not YAML's reading of it.
        value = value.text if _wants_text(tp) else value.value
    if tp is Any:
        return resolved(value)
    if origin is Literal:
        if value not in get_args(tp):
            raise _mismatch(key, f"one of {_type_name(tp)}", value)
        return value
    if tp in (dict, list):
        return _check(value, dict[str, Any] if tp is dict else list[Any], key)
    if tp is type(None):
        if value is not None:
            raise _mismatch(key, "null", value)
        return None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _mismatch(key, "a list", value)
        (item_tp,) = get_args(tp)[:1] or (Any,)
        return [_check(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _mismatch(key, "a mapping", value)
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_check(k, key_tp, key): _check(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _mismatch(key, f"a mapping of {tp.__name__} keys", value)
        return _build(tp, value, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.match(value):
            value = float(value)  # YAML 1.1 reads 1e-8 (no dot) as a string; it is the number the user meant
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _mismatch(key, "a number", value)
        number = float(value) if isinstance(value, float) or abs(value) < 2**1000 else math.inf
        if not math.isfinite(number):  # .nan, .inf, 1e999, 10**400: no setting means them
            raise _mismatch(key, "a finite number", value)
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _mismatch(key, "an integer", value)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _mismatch(key, "true or false", value)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _mismatch(key, "a string", value)
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp!r}")


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise _unknown_key(cls, prefix, unknown[0])
    kwargs = {name: _check(v, hints[name], f"{prefix}{name}") for name, v in values.items()}
    return cls(**kwargs)


def _unknown_key(cls: type, prefix: str, name: str, typed: str = "") -> ConfigError:
    """The error for key ``name`` of section ``cls`` (at ``prefix``; ``typed``: the whole key as given): its
    new name when the section lists it in a ``RENAMED_KEYS`` class mapping (old name -> new dotted name under
    the same section), else the section's keys."""
    renamed = getattr(cls, "RENAMED_KEYS", {}).get(name)
    if renamed:
        return ConfigError(f"config key '{prefix}{name}' is now called '{prefix}{renamed}'")
    known = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
    return ConfigError(f"unknown config key '{typed or prefix + name}'; known keys under "
                       f"'{prefix.rstrip('.') or '(top)'}': {known}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def fill_nulls(section: Any, defaults: dict[str, Any]) -> Any:
    """A copy of the dataclass ``section`` whose fields left null take ``defaults``' values (given ones win);
    a mapping in ``defaults`` fills the sub-section of that name the same way."""
    filled = {k: fill_nulls(getattr(section, k), v) if isinstance(v, dict) else v for k, v in defaults.items()
              if isinstance(v, dict) or getattr(section, k) is None}
    return dataclasses.replace(section, **filled)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _field_type(cls: type, dotted: str) -> Any:
    """The declared type of a dotted key, or a ConfigError naming it."""
    tp: Any = cls
    walked = []
    for part in dotted.split("."):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            # Mappings (dict fields) accept any sub-key; their value type checks the value.
            if get_origin(tp) is dict or tp is dict or tp is Any:
                tp = get_args(tp)[1] if get_args(tp) else Any
                walked.append(part)
                continue
            raise ConfigError(f"unknown config key '{dotted}': '{'.'.join(walked)}' has no sub-keys")
        hints = _hints(tp)
        if part not in {f.name for f in dataclasses.fields(tp)}:  # not a ClassVar such as RENAMED_KEYS
            raise _unknown_key(tp, "".join(w + "." for w in walked), part, dotted)
        tp = hints[part]
        walked.append(part)
    return tp


def _parse_override(cls: type, item: str) -> dict[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has no key before '=' (expected key=value)")
    tp = _field_type(cls, key)
    if tp is str or (get_origin(tp) in (Union, types.UnionType) and str in get_args(tp) and raw != "null"):
        value: Any = raw  # a path or prompt stays exactly what the user typed
    else:
        try:
            value = load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"config key '{key}': cannot parse value {raw!r}: {e}") from None
    nested: dict[str, Any] = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def load_config(cls: type[T], config_files: list[str] | tuple[str, ...] = (), overrides: list[str] = ()) -> T:
    """Defaults <- each YAML file in order <- each ``key=value`` override in order, validated."""
    cfg = _read_config(cls, config_files, overrides)
    validate(cfg)
    return cfg


def _read_config(cls: type[T], config_files: list[str] | tuple[str, ...], overrides: list[str]) -> T:
    """:func:`load_config` before its checks."""
    values: dict[str, Any] = {}
    for path in config_files:
        try:
            p = resolve_config(str(path))  # a file path, or a packaged config's name (sd15_train)
        except InputError as e:
            raise ConfigError(str(e)) from None
        try:
            loaded = load_yaml(read_text(p, "config file", ConfigError))
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        loaded = {} if loaded is None else loaded  # an empty file sets nothing
        if not isinstance(loaded, dict):
            found = type(resolved(loaded)).__name__
            raise ConfigError(f"config file {path}: expected a mapping at the top level, got {found}")
        values = _merge(values, loaded)
    for item in overrides:
        values = _merge(values, _parse_override(cls, item))
    # Merge onto the defaults so a partial sub-mapping keeps the other defaults of that section.
    return _build(cls, _merge(to_dict(cls()), values))


def flat_scalars(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config as flat scalars for tensorboard's hparams (lists and None as strings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flat_scalars(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """One line per key: ``name (type, default X): help``. Sub-dataclasses are listed with dotted names, with
    the defaults the recipe gives that section (``option(OptimSection(learning_rate=...))``)."""
    lines = []
    hints = _hints(cls)
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = prefix + f.name
        help_text = f.metadata.get("help", "")
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            lines.append(f"  {name}.*: {help_text}")
            lines.extend(describe(tp, prefix=name + ".", defaults=getattr(defaults, f.name)))
        else:
            default = getattr(defaults, f.name)
            lines.append(f"  {name} ({_type_name(tp)}, default {default!r}): {help_text}")
    return lines


def parse_args(cls: type[T], argv: list[str], prog: str, description: str = "", positional: str = "") -> T:
    """``[--config FILE]... [key=value]...`` into a config; ``--help`` prints every key and exits.

    With ``positional`` (the name of a top-level ``list[str]`` key), every argument without ``=`` is appended
    to that key after the files and overrides are read (so a shell glob of image paths works); a value
    holding ``=`` still needs the key.
    """
    files: list[str] = []
    overrides: list[str] = []
    extra: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            usage = f" [{positional.upper()}]..." if positional else ""
            print(f"usage: {prog} [--config FILE.yaml|NAME]... [key=value]...{usage}\n")
            if description:
                print(description.strip() + "\n")
            print("keys:")
            print("\n".join(describe(cls)))
            sys.exit(0)
        elif arg == "--config":
            try:
                files.append(next(it))
            except StopIteration:
                raise ConfigError("--config needs a file path or a packaged config name") from None
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg}; use key=value overrides (see {prog} --help)")
        elif positional and "=" not in arg:
            extra.append(arg)
        else:
            overrides.append(arg)
    cfg = _read_config(cls, files, overrides)
    if extra:
        cfg = dataclasses.replace(cfg, **{positional: [*getattr(cfg, positional), *extra]})
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------------- shared sections
# Every command's config starts from RunOptions (training commands: TrainingRunOptions), so the run-folder
# keys are the same top-level keys everywhere; optimiser and preference-loss keys are sections that the
# recipes that need them embed, with their own defaults given as an instance (option(OptimSection(...))).

def positive(v: Any) -> bool:
    return v > 0


def at_least_one(v: Any) -> bool:
    return v >= 1


def non_negative(v: Any) -> bool:
    return v >= 0
