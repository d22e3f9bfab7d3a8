"""``diffusion-dpo <command> [args]`` and ``diffusion-dpo llm <method> [args]``: the one dispatcher.

Each command is a recipe module with ``main(argv) -> int`` that reads
``[--config FILE.yaml]... [key=value]...``.
Modules are imported only when their command runs, so ``diffusion-dpo --help`` stays fast and a command's
heavy dependencies load only for that command.

One handler turns the package's errors into a message and an exit code: InputError (bad input) 2, RunError
(a run that had to stop) 1, Ctrl-C 130 with a line saying how to continue; any other exception is a bug and
keeps its traceback. ``DIFFUSION_DPO_TRACEBACK=1`` prints the traceback of the first three as well.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Callable, Union

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
    "grpo": ("diffusion_dpo.recipes.grpo", "online reward tuning against a scorer: GRPO or online DPO"),
    "serve": ("diffusion_dpo.recipes.serve", "a scorer behind HTTP, for scorer.name=remote elsewhere"),
    "plan": ("diffusion_dpo.recipes.plan", "per-process memory of a training run before it runs, and whether it fits"),
    "demo": ("diffusion_dpo.recipes.demo", "the whole loop offline on a tiny world: label, train, evaluate"),
    "llm": (LLM_METHODS, "language-model paths: sft, reward, dpo, ppo"),
}

TRACEBACK_VARIABLE = "DIFFUSION_DPO_TRACEBACK"
# What a Ctrl-C'd command says about continuing; every other command keeps a run folder that resume=auto
# continues from its last complete state.
INTERRUPT_HINTS = {
    "score": "",
    "serve": "",
    "llm ppo": "; PPO keeps no checkpoints: start it again (overwrite=true replaces the folder)",
}


def _usage(prog: str, table: Table, noun: str) -> str:
    width = max(map(len, table))
    lines = [f"usage: {prog} <{noun}> [--config FILE.yaml] [key=value ...]", "", f"{noun}s:"]
    lines += [f"  {name:<{width}}  {doc}" for name, (_, doc) in table.items()]
    lines += ["", f"{prog} <{noun}> --help lists every key of that {noun}."]
    return "\n".join(lines)


def _dispatch(prog: str, table: Table, noun: str, argv: list[str]) -> int:
    """Run the entry of ``table`` that ``argv[0]`` names with the rest of ``argv``; a table entry (``llm``)
    dispatches again on its methods (:func:`run_command` turns the errors into messages and exit codes)."""
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
    return run_command(f"{prog} {name}", lambda: importlib.import_module(target).main(rest))


def run_command(label: str, command: Callable[[], int | None]) -> int:
    """``command()``'s exit code, with the package's errors as one message on stderr (``label: message``):
    InputError 2, RunError 1, KeyboardInterrupt 130. Other exceptions propagate with their traceback."""
    show_traceback = os.environ.get(TRACEBACK_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return command() or 0
    except (InputError, RunError, KeyboardInterrupt) as e:
        if show_traceback:
            traceback.print_exc()
        if isinstance(e, InputError):
            message, code = str(e), 2
        elif isinstance(e, RunError):
            message, code = f"stopped: {e}", 1
        else:
            hint = INTERRUPT_HINTS.get(label.removeprefix("diffusion-dpo "), "; continue with resume=auto")
            message, code = f"interrupted{hint}", 130
        # On a terminal a progress bar may be redrawing the current line: the message starts a new one.
        start = "\n" if code == 130 and sys.stderr.isatty() else ""
        print(f"{start}{label}: {message}", file=sys.stderr)
        return code
    finally:
        end_process_group()


def end_process_group() -> None:
    """Destroy a process group the command left formed (label and evaluate under torchrun; the training
    engine's runs destroy theirs as they end) while the interpreter is whole, rather than leave it to
    interpreter exit. It does not stop the rare abort in torch's gloo teardown that tests/run_files.py names."""
    if "torch" not in sys.modules:  # --help and errors before any import: nothing was formed
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    return _dispatch("diffusion-dpo", COMMANDS, "command", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
