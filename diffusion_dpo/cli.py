"""``diffusion-dpo <command> [args]`` and ``diffusion-dpo llm <method> [args]``: the one dispatcher.

Each command is a recipe module with ``main(argv) -> int`` that reads
``[--config FILE.yaml]... [key=value]...``.
Modules are imported only when their command runs, so ``diffusion-dpo --help`` stays fast and a command's
heavy dependencies load only for that command.
"""

from __future__ import annotations

import importlib
import sys
from typing import Union

from diffusion_dpo.errors import InputError, RunError

# name -> (recipe module, or a table of sub-commands, and a one-line description)
Table = dict[str, tuple[Union[str, "Table"], str]]

LLM_METHODS: Table = {
    "sft": ("diffusion_dpo.recipes.llm_sft",
            "supervised fine-tuning on demonstrations (completion-only loss)"),
    "reward": ("diffusion_dpo.recipes.llm_reward", "reward model from pairs or rankings (Bradley-Terry)"),
    "dpo": ("diffusion_dpo.recipes.llm_dpo", "Direct Preference Optimization (sigmoid, hinge, IPO, cDPO)"),
    "ppo": ("diffusion_dpo.recipes.llm_ppo", "RLHF with PPO against a reward model or a rule"),
}

COMMANDS: Table = {
    "train": ("diffusion_dpo.recipes.train", "Diffusion-DPO (or SFT) fine-tuning of a Stable Diffusion UNet"),
    "score": ("diffusion_dpo.recipes.score", "score images, or a pairs dataset, with a preference scorer"),
    "label": ("diffusion_dpo.recipes.label", "AI-feedback labeling: generate candidates, score, write pairs"),
    "evaluate": ("diffusion_dpo.recipes.evaluate", "tuned vs base on HPSv2-style prompts, per style"),
    "demo": ("diffusion_dpo.recipes.demo", "the whole loop offline on a tiny world: label, train, evaluate"),
    "llm": (LLM_METHODS, "language-model paths: sft, reward, dpo, ppo"),
}


def _usage(prog: str, table: Table, noun: str) -> str:
    width = max(map(len, table))
    lines = [f"usage: {prog} <{noun}> [--config FILE.yaml] [key=value ...]", "", f"{noun}s:"]
    lines += [f"  {name:<{width}}  {doc}" for name, (_, doc) in table.items()]
    lines += ["", f"{prog} <{noun}> --help lists every key of that {noun}."]
    return "\n".join(lines)


def _dispatch(prog: str, table: Table, noun: str, argv: list[str]) -> int:
    """Run the entry of ``table`` that ``argv[0]`` names with the rest of ``argv``; a table entry (``llm``)
    dispatches again on its methods. Bad input is printed as ``<prog> <name>: message`` (exit 2)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(prog, table, noun))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in table:
        print(f"{prog}: unknown {noun} {name!r}\n\n{_usage(prog, table, noun)}", file=sys.stderr)
        return 2
    target = table[name][0]
    if isinstance(target, dict):
        return _dispatch(f"{prog} {name}", target, "method", rest)
    module = importlib.import_module(target)
    try:
        return module.main(rest) or 0
    except InputError as e:
        print(f"{prog} {name}: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"{prog} {name}: stopped: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    return _dispatch("diffusion-dpo", COMMANDS, "command", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
