"""Values the help text documents are accepted as written, on the command line and in YAML files.

YAML 1.1 reads ``no``/``off``/``yes``/``on`` as booleans and ``0.5`` as a number; a key declared as a string
(or a Literal of strings) must still get the text the user typed, while a bool key keeps reading ``no`` as
false.
"""

import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional, get_args, get_origin

import pytest

from diffusion_dpo import cli
from diffusion_dpo.config import ConfigError, load_config, option, save_config


@dataclass
class Section:
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = option("auto", "compute dtype")
    switch: Literal["on", "off"] = option("off", "a documented on/off value")
    name: str = option("x", "a name")
    resume: Optional[str] = option(None, "checkpoint or null")
    flag: bool = option(True, "a switch")
    lr: float = option(1e-5, "learning rate")
    targets: list[str] = option(["to_q"], "module names")
    options: dict[str, Any] = option({}, "free-form options")


@dataclass
class Top:
    train: Section = option(Section, "the section")


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` to hand the parsed config back without running the command."""

    def __init__(self, cfg: Any):
        super().__init__("parsed")
        self.cfg = cfg


def _command_modules() -> dict[str, str]:
    """Every command that reads its config through ``diffusion_dpo.config.parse_args``, by its argv prefix."""
    modules = {}
    for name, (module, _) in cli.COMMANDS.items():
        if name == "llm":
            modules.update({f"llm {m}": mod for m, (mod, _) in cli.LLM_METHODS.items()})
        elif hasattr(importlib.import_module(module), "parse_args"):
            modules[name] = module
    return modules


def _literal_keys(cls: type, prefix: str = "") -> list[tuple[str, tuple[Any, ...]]]:
    """(dotted key, allowed values) of every Literal key, in nested sections too (Optional[Literal] included)."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _literal_keys(tp, f"{prefix}{f.name}.")
            continue
        arms = get_args(tp) if get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        for arm in arms:
            if get_origin(arm) is Literal:
                out.append((f"{prefix}{f.name}", get_args(arm)))
    return out


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _parse_through_cli(monkeypatch, command: str, module: str, overrides: list[str]) -> Any:
    """Run ``diffusion-dpo <command> <overrides>`` up to the parsed config, which is returned."""
    mod = importlib.import_module(module)
    real = mod.parse_args

    def capture(cls, argv, **kwargs):
        raise _Parsed(real(cls, argv, **kwargs))

    monkeypatch.setattr(mod, "parse_args", capture)
    with pytest.raises(_Parsed) as parsed:
        cli.main(command.split() + REQUIRED.get(command, []) + overrides)
    return parsed.value.cfg


# Keys a command cannot do without (its checks run when the config is read).
REQUIRED = {"llm ppo": ["reward.function=my_rewards:length", "model.lora.enabled=true"],
            "llm dpo": ["model.lora.enabled=true"], "plan": ["model.lora_rank=4"]}  # plan: reference=adapter


def _config_class(monkeypatch, command: str, module: str) -> type:
    return type(_parse_through_cli(monkeypatch, command, module, []))


def test_every_command_is_walked(monkeypatch):
    commands = _command_modules()
    # The walk finds the diffusion recipes and every LLM method; a command dropped from the walk fails here.
    assert {"train", "label", "evaluate", "demo", "llm sft", "llm reward", "llm dpo", "llm ppo"} <= set(commands)
    keys = {c: [k for k, _ in _literal_keys(_config_class(monkeypatch, c, m))] for c, m in commands.items()}
    assert "mixed_precision" in keys["train"] and "mixed_precision" in keys["llm dpo"]


@pytest.mark.parametrize("command", sorted(_command_modules()))
def test_every_documented_literal_value_is_accepted_on_the_command_line(monkeypatch, command):
    module = _command_modules()[command]
    cls = _config_class(monkeypatch, command, module)
    for key, values in _literal_keys(cls):  # demo and evaluate have none today; the walk still covers them
        for value in values:
            text = "null" if value is None else str(value)
            cfg = _parse_through_cli(monkeypatch, command, module, [f"{key}={text}"])
            assert _get(cfg, key) == value, f"{command} {key}={text}"


def test_yaml_1_1_words_stay_text_for_string_keys_on_the_command_line():
    cfg = load_config(Top, [], ["train.mixed_precision=no", "train.switch=on", "train.name=yes",
                                "train.resume=off", "train.targets=[to_q, on, 0.5]", "train.flag=no"])
    t = cfg.train
    assert t.mixed_precision == "no" and t.switch == "on" and t.name == "yes" and t.resume == "off"
    assert t.targets == ["to_q", "on", "0.5"]
    assert t.flag is False  # the type decides: the same text means false for a bool key
    assert load_config(Top, [], ["train.switch=off"]).train.switch == "off"
    assert load_config(Top, [], ["train.resume=null"]).train.resume is None
    assert load_config(Top, [], ["train.name=null"]).train.name == "null"  # null is not allowed: it is text
    assert load_config(Top, [], ["train.name=1e-4"]).train.name == "1e-4"
    assert load_config(Top, [], ["train.resume=0.5"]).train.resume == "0.5"


def test_yaml_1_1_words_stay_text_for_string_keys_in_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "train:\n"
        "  mixed_precision: no\n"
        "  switch: on\n"
        "  name: 1e-4\n"
        "  resume: 0.5\n"
        "  flag: off\n"
        "  lr: 1e-3\n"
        "  targets: [to_q, yes, 007]\n"
        "  options: {batch_size: 16, half: no, nested: [on, 2]}\n"
    )
    t = load_config(Top, [str(path)]).train
    assert (t.mixed_precision, t.switch, t.name, t.resume) == ("no", "on", "1e-4", "0.5")
    assert t.flag is False and t.lr == 1e-3
    assert t.targets == ["to_q", "yes", "007"]
    # Free-form values (Any) have no declared type to decide, so they keep YAML's reading.
    assert t.options == {"batch_size": 16, "half": False, "nested": [True, 2]}
    path.write_text("train:\n  resume: null\n  name: ~\n  mixed_precision: 'no'\n")
    t = load_config(Top, [str(path)]).train
    assert t.resume is None and t.name == "~" and t.mixed_precision == "no"


def test_saved_config_with_text_values_round_trips(tmp_path):
    cfg = load_config(Top, [], ["train.mixed_precision=no", "train.switch=on", "train.targets=[off]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(Top, [str(tmp_path / "config.yaml")]) == cfg


def test_wrong_values_name_the_key_and_the_text_as_written(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.mixed_precision'.*got 'No'"):
        load_config(Top, [], ["train.mixed_precision=No"])
    with pytest.raises(ConfigError, match=r"'train.flag'.*got 'maybe'"):
        load_config(Top, [], ["train.flag=maybe"])
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  switch: yes\n")
    with pytest.raises(ConfigError, match=r"'train.switch'.*got 'yes'"):
        load_config(Top, [str(path)])
    path.write_text("no\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(Top, [str(path)])


def test_demo_keys_are_the_names_of_the_keys_they_set_and_old_names_say_the_new_one(tmp_path, capsys):
    """The demo's train.* and online.* keys are the train and grpo commands' names (train.optim.learning_rate
    sets train's optim.learning_rate); an old name, on the command line or in a file, is refused with its new
    name. The settings the demo hands to train are the ones it always did."""
    from diffusion_dpo.recipes import demo, demo_common

    cases = [("train.beta_dpo=100", "'train.loss.beta'"), ("train.learning_rate=1e-4", "'train.optim.learning_rate'"),
             ("train.lora_rank=4", "'train.model.lora_rank'"), ("train.max_steps=3", "'train.optim.max_steps'"),
             ("train.batch_size=2", "'train.optim.batch_size'"), ("train.lr_warmup_steps=0", "'train.optim.warmup_steps'"),
             ("train.caption_dropout=0.1", "'train.data.caption_dropout'"),
             ("train.sft_learning_rate=1e-4", "'train.sft_optim.learning_rate'"),
             ("train.sft_max_steps=3", "'train.sft_optim.max_steps'"), ("online.steps=2", "'online.optim.max_steps'"),
             ("online.learning_rate=1e-3", "'online.optim.learning_rate'"), ("online.lora_rank=4", "'online.model.lora_rank'"),
             ("online.batch_size=4", "'online.optim.batch_size'"),
             ("online.num_inference_steps=2", "'online.sampling.num_inference_steps'"),
             ("online.noise_level=0.5", "'online.sampling.noise_level'")]
    for override, new in cases:
        assert cli.main(["demo", override, f"output_dir={tmp_path / 'd'}"]) == 2
        assert f"is now called {new}" in capsys.readouterr().err, override
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  beta_dpo: 100\n")
    with pytest.raises(ConfigError, match="'train.beta_dpo' is now called 'train.loss.beta'"):
        load_config(demo.DemoConfig, [str(path)])
    assert not (tmp_path / "d").exists()

    cfg = demo.resolve_defaults(load_config(demo.DemoConfig, [], ["train.optim.learning_rate=1e-4"]))
    dpo = demo.train_config(cfg, "dpo", str(demo_common.BASES["sd"]), tmp_path / "p", tmp_path / "o", 1, None)
    sft = demo.train_config(cfg, "sft", str(demo_common.BASES["sd"]), tmp_path / "p", tmp_path / "o", 1, None)
    assert (dpo.model.lora_rank, dpo.loss.beta, dpo.optim.learning_rate, dpo.optim.max_steps) == (8, 5000.0, 1e-4, 200)
    assert (dpo.optim.batch_size, dpo.optim.warmup_steps, dpo.data.caption_dropout) == (16, 20, 0.0)
    assert (sft.optim.learning_rate, sft.optim.max_steps, sft.optim.batch_size) == (3e-4, 200, 16)
