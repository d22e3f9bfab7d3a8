"""The shell and Python examples of README.md and docs/*.md, read as a newcomer copies them.

A fenced ```bash or ```python block is an example. An HTML comment on the line before its fence marks one
that is only parsed, never run: ``<!-- example: hub -->`` (needs weights or data from the hub),
``<!-- example: gpu -->`` (needs a GPU), ``<!-- example: long -->`` (takes minutes: the full demo runs,
benchmarks), ``<!-- example: sketch -->`` (the shape of an API, with ``...`` for what a caller fills in).
In a bash block, a command is a line and its ``\\`` continuations, without its trailing ``# comment``; the
``# lines`` right after a command are the output it prints (``tests/test_doc_examples.py`` checks them).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKS = ("hub", "gpu", "long", "sketch")

# The config dataclass of each command, by the words that name it on the command line.
CONFIGS = {
    ("train",): ("diffusion_dpo.recipes.train", "TrainConfig"),
    ("score",): ("diffusion_dpo.recipes.score", "ScoreConfig"),
    ("label",): ("diffusion_dpo.recipes.label", "LabelConfig"),
    ("evaluate",): ("diffusion_dpo.recipes.evaluate", "EvaluateConfig"),
    ("grpo",): ("diffusion_dpo.recipes.grpo", "GrpoConfig"),
    ("demo",): ("diffusion_dpo.recipes.demo", "DemoConfig"),
    ("serve",): ("diffusion_dpo.recipes.serve", "ServeConfig"),
    ("plan",): ("diffusion_dpo.memory_plan", "PlanConfig"),
    ("llm", "sft"): ("diffusion_dpo.recipes.llm_sft", "SFTConfig"),
    ("llm", "reward"): ("diffusion_dpo.recipes.llm_reward", "RewardConfig"),
    ("llm", "dpo"): ("diffusion_dpo.recipes.llm_dpo", "DPOConfig"),
    ("llm", "ppo"): ("diffusion_dpo.recipes.llm_ppo", "PPOConfig"),
}


@dataclass
class Command:
    text: str  # one shell command line, continuations joined, trailing comment removed
    line: int  # where it starts in its document
    output: list[str] = field(default_factory=list)  # the "# ..." lines after it: what it prints


@dataclass
class Example:
    document: Path
    line: int  # the line of the opening fence
    language: str  # bash or python
    mark: str | None  # hub, gpu, long, or None for an example that runs offline
    text: str

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"

    def commands(self) -> list[Command]:
        """The commands of a bash example (a quoted string or a heredoc spanning lines stays one command),
        each with the ``#`` lines after it: in an example that runs, the output it prints."""
        out: list[Command] = []
        pending, start, heredoc = "", 0, None
        for number, raw in enumerate(self.text.splitlines(), self.line + 1):
            stripped = raw.strip()
            if not pending and (not stripped or stripped.startswith("#")):
                if stripped and out:
                    out[-1].output.append(stripped[1:].strip())
                continue
            if not pending:
                start = number
            pending += raw + "\n"
            if heredoc is None and (found := re.search(r"<<-?'?(\w+)'?", raw)):
                heredoc = found.group(1)
                continue
            if heredoc is not None:
                if stripped == heredoc:
                    heredoc = None
                    out.append(Command(pending.strip(), start))
                    pending = ""
                continue
            if raw.rstrip().endswith("\\") or _open_quote(pending):
                continue
            out.append(Command(_strip_comment(pending.replace("\\\n", " ")).strip(), start))
            pending = ""
        return out


def _open_quote(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
    except ValueError:
        return True
    return False


def _strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` outside quotes that starts a word)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


_FENCE = re.compile(r"^```(\w+)\s*$")
_MARK = re.compile(r"^<!--\s*example:\s*(\w+)\s*-->\s*$")


def examples(document: Path) -> list[Example]:
    """The bash and python blocks of ``document`` in order, with their marks."""
    found, lines = [], document.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i].strip())
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = _MARK.match(previous)
        if mark and mark.group(1) not in MARKS:
            raise ValueError(f"{document}:{i}: unknown example mark {mark.group(1)!r}; known: {MARKS}")
        if fence.group(1) in ("bash", "python"):
            found.append(Example(document, i + 1, fence.group(1), mark.group(1) if mark else None,
                                 "\n".join(lines[i + 1:end])))
        i = end + 1
    return found


def package_calls(command: str) -> list[list[str]]:
    """Each ``diffusion-dpo ...`` (or ``-m diffusion_dpo ...``) call in a shell command line, as the words
    after the program name; the rest of the line (``accelerate launch``, ``time``, ``&&``) is left out."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    parts: list[list[str]] = [[]]
    for word in lexer:
        if word and set(word) <= set("&|;()<>"):
            parts.append([])
        else:
            parts[-1].append(word)
    calls = []
    for words in parts:
        for i, word in enumerate(words):
            if word == "diffusion-dpo" or (word == "diffusion_dpo" and i > 0 and words[i - 1] == "-m"):
                calls.append(words[i + 1:])
                break
    return calls


def split_call(words: list[str]) -> tuple[tuple[str, ...], list[str], list[str], list[str]]:
    """``(command words, --config files, key=value overrides, other arguments)`` of one call."""
    name = tuple(words[:2]) if words[:1] == ["llm"] else tuple(words[:1])
    files, overrides, other = [], [], []
    rest = iter(words[len(name):])
    for word in rest:
        if word == "--config":
            files.append(next(rest))
        elif word.startswith("--config="):
            files.append(word.split("=", 1)[1])
        elif "=" in word and not word.startswith("-"):
            overrides.append(word)
        else:
            other.append(word)
    return name, files, overrides, other
