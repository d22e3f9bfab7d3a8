"""Every example of README.md and docs/*.md runs as written, in document order, and shows what its text says.

Each document gets a fresh folder holding an ``assets`` link to the package's assets (so the documented
paths work) and the package's tools on PATH, offline (HF_HUB_OFFLINE=1). Examples that need the hub or a GPU,
or that take minutes, or that sketch an API with ``...`` in it, are marked in the document by an HTML comment on the line before their fence:

    <!-- example: hub -->    <!-- example: gpu -->    <!-- example: long -->    <!-- example: sketch -->

and are only parsed: every ``diffusion-dpo <command> ... key=value`` key must be a key of that command's
config, every shipped ``--config`` file (under ``assets/``) must exist, and a python block must compile. The others run: a
command must exit 0, print the ``# lines`` written after it, and leave what its command makes (``final/``
of a training run, with a DPO loss that left ln 2 = 0.6931; ``report.md`` of an evaluation; the parquet
shards of a labelling run). See ``tests/doc_examples.py`` for how the blocks are read.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_dpo.config import _field_type, load_config
from tests.doc_examples import CONFIGS, DOCUMENTS, ROOT, examples, package_calls, split_call

pytestmark = pytest.mark.slow


def _config_class(name: tuple[str, ...], where: str):
    assert name in CONFIGS, f"{where}: unknown command diffusion-dpo {' '.join(name)}"
    module, cls = CONFIGS[name]
    return getattr(importlib.import_module(module), cls)


def check_call(words: list[str], where: str, folder: Path = ROOT):
    """The keys and config files of one documented call exist; returns (command words, its config) when
    the config loads as written (None for a parsed-only call whose values name hub ids or placeholders)."""
    if words in ([], ["--help"]) or words[-1:] == ["--help"]:
        return None
    name, files, overrides, _ = split_call(words)
    cls = _config_class(name, where)
    for item in overrides:
        _field_type(cls, item.split("=", 1)[0])  # raises, naming the key, when the command has no such key
    for path in files:  # the shipped ones; others (my_label.yaml) are files the text asks the reader to write
        if path.startswith("assets/"):
            assert (folder / path).is_file(), f"{where}: --config {path} does not exist"
    cwd = os.getcwd()
    try:
        os.chdir(folder)
        return name, load_config(cls, files, overrides)
    except Exception:
        return None
    finally:
        os.chdir(cwd)


def check_marked(example) -> None:
    if example.language == "python":
        compile(example.text, example.where, "exec")
        return
    for command in example.commands():
        for words in package_calls(command.text):
            check_call(words, f"{example.where} (line {command.line})")


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def check_made(name: tuple[str, ...], cfg, folder: Path, where: str) -> None:
    """What the command makes is there; a DPO training run's loss moved off ln 2."""
    if not hasattr(cfg, "output_dir"):  # score prints its result
        return
    out = folder / cfg.output_dir
    if name in (("train",), ("grpo",)) or name[0] == "llm":
        assert (out / "final").exists(), f"{where}: {out}/final was not made"
    if name == ("train",) and cfg.method == "dpo":
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert round(last["loss"], 4) != 0.6931, f"{where}: the loss stayed at ln 2 (nothing was learned)"
    if name == ("evaluate",):
        assert (out / "report.md").is_file(), f"{where}: {out}/report.md was not made"
    if name == ("label",):
        assert list(out.rglob("*.parquet")), f"{where}: {out} holds no parquet shard"


def run_example(example, folder: Path, env: dict[str, str]) -> None:
    if example.language == "python":
        script = folder / "example.py"
        script.write_text(example.text)
        commands = [(f"{sys.executable} example.py", example.line, [])]
    else:
        commands = [(c.text, c.line, c.output) for c in example.commands()]
    for text, line, output in commands:
        where = f"{example.where} (line {line})"
        done = subprocess.run(["bash", "-c", "set -eo pipefail\n" + text], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{where}: exit {done.returncode}\n{text}\n{done.stderr[-3000:]}"
        printed = [" ".join(x.split()) for x in done.stdout.splitlines()]
        for expected in output:
            assert " ".join(expected.split()) in printed, f"{where}: the text says it prints {expected!r}; " \
                                                          f"it printed:\n{done.stdout[-2000:]}"
        for words in package_calls(text) if example.language == "bash" else []:
            checked = check_call(words, where, folder)
            if checked:
                check_made(*checked, folder, where)
    if example.language == "python":
        for made in re.findall(r"output_dir=([\w./-]+)", example.text):
            assert (folder / made / "final").exists(), f"{example.where}: {made}/final was not made"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_documented_examples_run_as_written(document, tmp_path):
    (tmp_path / "assets").symlink_to(ROOT / "diffusion_dpo" / "assets")
    env = _environment()
    for example in examples(document):
        if example.mark:
            check_marked(example)
        else:
            run_example(example, tmp_path, env)


def test_score_doc_lists_every_registered_scorer():
    import scorers

    rows = [line for line in (ROOT / "docs" / "score.md").read_text().splitlines() if line.startswith("| `")]
    named = {name.strip("` ") for row in rows for name in row.split("|")[1].split(",")}
    assert named == set(scorers.REGISTRY), f"docs/score.md's table lists {sorted(named)}"
