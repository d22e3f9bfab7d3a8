"""``diffusion-dpo <command> [args]``: each command is a module with ``main(argv) -> int``.

Modules are imported only when their command runs, so ``diffusion-dpo --help`` stays fast and a
command's heavy dependencies load only for that command.
"""

from __future__ import annotations

import importlib
import sys

from diffusion_dpo.errors import InputError, RunError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("diffusion_dpo.recipes.train", "Diffusion-DPO (or SFT) fine-tuning of a Stable Diffusion UNet"),
    "score": ("scorers.cli", "score images, or a pairs dataset, with a preference scorer"),
    "label": ("diffusion_dpo.recipes.label", "AI-feedback labeling: generate candidates, score, write pairs"),
    "evaluate": ("diffusion_dpo.recipes.evaluate", "tuned vs base on HPSv2-style prompts, per style"),
    "grpo": ("diffusion_dpo.recipes.grpo", "online reward tuning against a scorer: GRPO or online DPO"),
    "demo": ("diffusion_dpo.recipes.demo", "the whole loop offline on a tiny world: label, train, evaluate"),
    "llm": ("diffusion_dpo.llm.cli", "language-model paths: sft, reward, dpo, ppo"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: diffusion-dpo <command> [--config FILE.yaml] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()]
    lines += ["", "diffusion-dpo <command> --help lists every key of that command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"diffusion-dpo: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return module.main(rest) or 0
    except InputError as e:
        print(f"diffusion-dpo {name}: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"diffusion-dpo {name}: stopped: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
