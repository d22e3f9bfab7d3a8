"""The package layout the design promises: ``scorers`` is a library that imports nothing of the trainer,
and both packages raise and catch one and the same ``InputError``."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import scorers
from diffusion_dpo.errors import InputError
from scorers.errors import InputError as ScorersInputError

REPO = Path(__file__).resolve().parents[1]


def scorer_modules() -> list[str]:
    """Every module of the scorers package, found on disk (so a new scorer file is checked too)."""
    root = REPO / "scorers"
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_scorers_import_nothing_of_diffusion_dpo():
    modules = scorer_modules()
    assert {"scorers", "scorers.shapes", "scorers.shapes.world", "scorers.jpeg"} <= set(modules)
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print([m for m in sys.modules if m.split('.')[0] == 'diffusion_dpo'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_one_input_error_class():
    assert InputError is ScorersInputError
    with pytest.raises(InputError, match="no-such-scorer"):  # raised by scorers, caught as the trainer's
        scorers.load_scorer("no-such-scorer")


def test_one_dispatcher_whose_commands_are_recipes(capsys):
    from diffusion_dpo import cli

    targets = [t for t, _ in [*cli.COMMANDS.values(), *cli.LLM_METHODS.values()] if not isinstance(t, dict)]
    assert len(targets) == len(cli.COMMANDS) - 1 + len(cli.LLM_METHODS)  # llm is the one group
    for target in targets:
        assert target.startswith("diffusion_dpo.recipes."), target
        assert callable(importlib.import_module(target).main), target
    assert cli.main(["llm", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: diffusion-dpo llm <method>" in out and all(f"\n  {m} " in out for m in cli.LLM_METHODS)
    assert cli.main(["llm", "nope"]) == 2
    assert "diffusion-dpo llm: unknown method 'nope'" in capsys.readouterr().err
