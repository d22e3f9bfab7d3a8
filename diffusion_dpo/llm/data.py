"""Text rows in, token ids out, for the LLM recipes.

Four row formats, each as plain text or as conversations (lists of ``{"role", "content"}`` messages rendered
with the tokenizer's chat template):

    preference pairs   prompt, chosen, rejected [, margin]      (DPO, reward model)
    rankings           prompt, responses (K >= 2, best first)    (reward model, InstructGPT's K = 4..9)
    demonstrations     prompt, completion   or   messages        (SFT)
    prompts            prompt                                   (PPO rollouts)

The prompt column may be missing when chosen and rejected are whole conversations or texts sharing their start
(Anthropic/hh-rlhf, trl-lib/ultrafeedback_binarized): the shared start is the prompt.

Tokenisation keeps prompt and completion ids apart, ends every completion with EOS, keeps the end of a prompt
that is too long (``max_prompt_length``; ``prompt_truncation="left"`` drops its oldest tokens, so a chat
prompt keeps its latest turns and the assistant's generation header) and the start of a completion that does
not fit (``max_length``), and drops a row whose prompt alone fills ``max_length``. ``TokenStats`` counts what
was cut and dropped.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

from diffusion_dpo.errors import InputError
from diffusion_dpo.fileio import read_text

Message = dict[str, str]
# Which side of a too-long prompt loses tokens: "left" keeps the end (latest turns, generation header),
# "right" keeps the start.
Truncation = Literal["left", "right"]
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json")


# ----------------------------------------------------------------------------------------------- reading rows


def _read_file(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise InputError(f"{path}: not a readable parquet file ({e})") from None
        return
    text = read_text(path, "data source")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise InputError(f"{path}: item {i} is {type(row).__name__}, expected an object of columns")
            yield row
        return
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}, line {line_no}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}, line {line_no}: expected a JSON object of columns")
        yield row


def _local_files(path: Path, split: str) -> list[Path]:
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise InputError(f"{path}: expected a {', '.join(LOCAL_SUFFIXES)} file")
        return [path]
    folder = path / split if (path / split).is_dir() else path
    if folder == path and split != "train":
        # A flat folder is the training split; silently evaluating on training rows would be wrong.
        raise InputError(f"{path} has no subfolder '{split}' for split '{split}'")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise InputError(f"{folder} holds no {', '.join(LOCAL_SUFFIXES)} files")
    return files


def read_rows(
    source: str, split: str = "train", *, subset: str | None = None, max_rows: int | None = None
) -> Iterable[dict[str, Any]]:
    """Rows of a hub dataset id, a local parquet/JSON/JSONL file, or a folder of them.

    A folder means every such file directly in it (sorted by name), or in its subfolder named after the split
    if that exists. A hub id is loaded with ``datasets.load_dataset(source, subset, split=split)``.
    """
    path = Path(source).expanduser()
    if path.exists():
        rows: Iterable[dict[str, Any]] = (row for f in _local_files(path, split) for row in _read_file(f))
    elif source.startswith((".", "/", "~")) or source.endswith(LOCAL_SUFFIXES):
        raise InputError(f"data source {source} does not exist")
    else:
        import datasets

        ds = datasets.load_dataset(source, subset, split=split)
        rows = ds.select(range(min(max_rows, len(ds)))) if max_rows is not None else ds
    if max_rows is not None:
        rows = (row for i, row in zip(range(max_rows), rows))
    return rows


# ---------------------------------------------------------------------------------- conversations and prompts


def is_conversation(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def _check_text(value: Any, where: str) -> str | list[Message]:
    if isinstance(value, str) or is_conversation(value):
        return value
    raise InputError(
        f"{where}: expected a string or a list of {{'role', 'content'}} messages, got {value!r:.80}"
    )


def implicit_prompt(chosen: str | list[Message], rejected: str | list[Message]) -> tuple[Any, Any, Any]:
    """Split two responses that share their start into (prompt, chosen completion, rejected completion).

    Conversations split at the first message that differs. Texts split at the last whitespace before the first
    differing character, the whitespace going to the completions ("...Assistant: I think" vs "...Assistant:
    I don't" -> prompt "...Assistant: I", completions " think", " don't").
    """
    n = 0
    if isinstance(chosen, list):
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n < min(len(chosen), len(rejected)):
        while n > 0 and not chosen[n - 1].isspace():
            n -= 1
        while n > 0 and chosen[n - 1].isspace():
            n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def normalize(prompt: Any, completions: list[Any], where: str) -> tuple[Any, list[Any]]:
    """Bring a prompt and its completions to one form: all plain text, or a prompt conversation plus
    assistant-message completions. A completion that is a whole conversation (its first message is not from
    the assistant) carries its own prompt, which is then taken from the shared start of the completions."""
    completions = [_check_text(c, f"{where}, completion {i}") for i, c in enumerate(completions)]
    if prompt is not None:
        prompt = _check_text(prompt, f"{where}, prompt")
    whole = [is_conversation(c) and c[0]["role"] != "assistant" for c in completions]
    if any(whole):
        if not all(whole):
            raise InputError(f"{where}: completions mix whole conversations and assistant replies")
        shared = completions[0]
        for c in completions[1:]:
            shared = implicit_prompt(shared, c)[0]
        if not shared:
            raise InputError(f"{where}: the conversations share no prompt messages")
        return shared, [c[len(shared) :] for c in completions]
    if prompt is None:
        if len(completions) < 2:
            raise InputError(
                f"{where}: no prompt, and a single completion has no shared start to take it from"
            )
        shared = completions[0]
        for c in completions[1:]:
            shared = implicit_prompt(shared, c)[0]
        return shared, [c[len(shared) :] for c in completions]
    if is_conversation(prompt) or any(is_conversation(c) for c in completions):
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        completions = [
            [{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions
        ]
    return prompt, completions


# ------------------------------------------------------------------------------------------------- tokenising


class Encoder:
    """Token ids for prompts and completions; the chat template renders conversations.

    A completion's ids are the text the template adds after the prompt's generation header, so that prompt ids
    + completion ids is the rendered conversation. Every completion ends with EOS: appended to plain text, and
    for a template that already closes the turn with EOS (Qwen's ``<|im_end|>``) anything after the last EOS
    (a trailing newline) is dropped.
    """

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise InputError("the tokenizer has no EOS token; set one (tokenizer.eos_token) before training")
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id

    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tok(text, add_special_tokens=special, verbose=False)["input_ids"]

    def _render(self, messages: list[Message], generation_prompt: bool, where: str) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise InputError(f"{where}: conversations need a tokenizer with a chat template")
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def prompt(self, prompt: str | list[Message], where: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            ids = self._ids(prompt, special=True)
            if ids and ids[-1] == self.eos:  # a tokenizer that closes every text with EOS
                ids = ids[:-1]
            return ids
        return self._ids(self._render(prompt, True, where), special=False)

    def completion(
        self, prompt: str | list[Message], completion: str | list[Message], where: str = "completion"
    ) -> list[int]:
        if isinstance(completion, str):
            ids = self._ids(completion, special=False)
        else:
            head = self._render(prompt, True, where)
            full = self._render(prompt + completion, False, where)
            if not full.startswith(head):
                raise InputError(
                    f"{where}: the chat template does not render the prompt as the conversation's start"
                )
            ids = self._ids(full[len(head) :], special=False)
        if self.eos in ids:
            return ids[: len(ids) - ids[::-1].index(self.eos)]
        return ids + [self.eos]


@dataclass
class TokenStats:
    """How many rows were read, kept whole, cut to fit, dropped because the prompt fills the budget, or left
    out as bad rows (``bad_rows``: reason -> count, e.g. identical_pair, empty_response; ``first_bad``: the
    first one's message), as the diffusion data counts its bad rows."""

    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)
    first_bad: str | None = None

    @property
    def kept(self) -> int:
        return self.rows - self.dropped - sum(self.bad_rows.values())

    def count_bad(self, reason: str, message: str) -> None:
        self.bad_rows[reason] = self.bad_rows.get(reason, 0) + 1
        self.first_bad = self.first_bad or message

    def describe(self, what: str = "rows") -> str:
        text = (f"{self.rows} {what}: {self.kept} kept, {self.truncated} truncated to fit, "
                f"{self.dropped} dropped (prompt fills max_length)")
        if self.bad_rows:
            text += ", bad rows: " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.bad_rows.items()))
            text += f" (first: {self.first_bad})"
        return text

    def as_dict(self) -> dict[str, Any]:
        counts = {"rows": self.rows, "kept": self.kept, "truncated": self.truncated, "dropped": self.dropped}
        return counts | ({"bad_rows": dict(self.bad_rows), "first_bad": self.first_bad} if self.bad_rows else {})


class BadRow(Exception):
    """A row that cannot teach a preference (``reason``: identical_pair, empty_response): counted in
    :class:`TokenStats` and left out, not an error."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _is_empty(completion: str | list[Message]) -> bool:
    """An empty text, or a conversation whose last message (the response) is empty."""
    if isinstance(completion, str):
        return not completion.strip()
    return not str(completion[-1]["content"]).strip()


def check_comparison(completions: list[Any], columns: list[str], where: str) -> None:
    """Raise :class:`BadRow` when two completions of one row (as stored, in ``columns``) are the same or one
    is empty: such a row says nothing about which response is better."""
    for i in range(len(completions)):
        for j in range(i + 1, len(completions)):
            if completions[i] == completions[j]:
                raise BadRow("identical_pair", f"{where}: {columns[i]} and {columns[j]} are the same")
    for column, completion in zip(columns, completions):
        if _is_empty(completion):
            raise BadRow("empty_response", f"{where}: {column} is empty")


def cut_prompt(prompt: list[int], max_prompt_length: int, side: Truncation = "left") -> list[int]:
    """The ``max_prompt_length`` tokens of ``prompt`` that are kept: its last ones when ``side`` is "left" (the
    oldest tokens are dropped), its first ones when "right"."""
    if side not in ("left", "right"):
        raise InputError(f"prompt truncation side must be 'left' or 'right', got {side!r}")
    if len(prompt) <= max_prompt_length:
        return prompt
    return prompt[len(prompt) - max_prompt_length :] if side == "left" else prompt[:max_prompt_length]


def fit(
    prompt: list[int],
    completions: list[list[int]],
    max_length: int,
    max_prompt_length: int | None = None,
    prompt_truncation: Truncation = "left",
) -> tuple[list[int], list[list[int]], bool] | None:
    """Cut one row to the token budget: the prompt to ``max_prompt_length`` (on the ``prompt_truncation``
    side, see :func:`cut_prompt`), then each completion to ``max_length - len(prompt)``, keeping its start.
    None when the prompt alone fills ``max_length`` (no completion token would fit). Returns
    (prompt, completions, cut)."""
    cut = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, cut = cut_prompt(prompt, max_prompt_length, prompt_truncation), True
    room = max_length - len(prompt)
    if room <= 0:
        return None
    if any(len(c) > room for c in completions):
        completions, cut = [c[:room] for c in completions], True
    return prompt, completions, cut


def _column(row: dict[str, Any], name: str, where: str, required: bool = True,
            expected: str = "a string or a list of messages") -> Any:
    if name in row and row[name] is not None:
        return row[name]
    if required and name in row:
        raise InputError(f"{where}: column '{name}' is null; expected {expected}")
    if required:
        raise InputError(f"{where}: missing column '{name}' (columns: {', '.join(sorted(row))})")
    return None


def _fit_rows(rows: Iterable[dict[str, Any]], tokenizer, split: Callable, *, max_length: int,
              max_prompt_length: int | None, prompt_truncation: Truncation, source: str) -> tuple[list[dict], TokenStats]:
    """The loop every row-to-example tokeniser shares. ``split(row, where) -> (prompt, completions, build)``
    reads a row's texts; ``build(prompt_ids, completion_ids) -> example`` names them. Rows that do not fit the
    budget are dropped and counted, cut ones counted."""
    enc, stats, out = Encoder(tokenizer), TokenStats(), []
    for i, row in enumerate(rows):
        where = f"{source}, row {i}"
        stats.rows += 1
        try:
            prompt, completions, build = split(row, where)
        except BadRow as bad:
            stats.count_bad(bad.reason, str(bad))
            continue
        fitted = fit(enc.prompt(prompt, where), [enc.completion(prompt, c, where) for c in completions],
                     max_length, max_prompt_length, prompt_truncation)
        if fitted is None:
            stats.dropped += 1
            continue
        p, cs, cut = fitted
        stats.truncated += cut
        out.append(build(p, cs))
    return out, stats


def tokenize_pairs(rows: Iterable[dict[str, Any]], tokenizer, *, max_length: int,
                   max_prompt_length: int | None = None, prompt_truncation: Truncation = "left",
                   prompt_column: str = "prompt", chosen_column: str = "chosen",
                   rejected_column: str = "rejected", margin_column: str | None = None,
                   source: str = "data") -> tuple[list[dict], TokenStats]:
    """Preference rows -> examples {"prompt", "chosen", "rejected": ids [, "margin": float]} and stats."""

    def split(row, where):
        stored = [_column(row, chosen_column, where), _column(row, rejected_column, where)]
        prompt, completions = normalize(_column(row, prompt_column, where, required=False), stored, where)
        check_comparison(stored, [f"column '{chosen_column}'", f"column '{rejected_column}'"], where)
        extra: dict[str, Any] = {}
        if margin_column is not None:
            margin = _column(row, margin_column, where, expected="a number")
            if isinstance(margin, bool) or not isinstance(margin, (int, float)):
                raise InputError(f"{where}: column '{margin_column}' must be a number, got {margin!r}")
            extra["margin"] = float(margin)
        return prompt, completions, lambda p, cs: {"prompt": p, "chosen": cs[0], "rejected": cs[1], **extra}

    return _fit_rows(rows, tokenizer, split, max_length=max_length, max_prompt_length=max_prompt_length,
                     prompt_truncation=prompt_truncation, source=source)


def tokenize_rankings(rows: Iterable[dict[str, Any]], tokenizer, *, max_length: int,
                      max_prompt_length: int | None = None, prompt_truncation: Truncation = "left",
                      prompt_column: str = "prompt", responses_column: str = "responses",
                      source: str = "data") -> tuple[list[dict], TokenStats]:
    """Ranking rows (K >= 2 responses, best first) -> examples {"prompt", "responses": [ids]} and stats."""

    def split(row, where):
        responses = _column(row, responses_column, where, expected="a list of responses, best first")
        if not isinstance(responses, list) or len(responses) < 2:
            raise InputError(
                f"{where}: column '{responses_column}' must list at least 2 responses, best first"
            )
        stored = responses
        prompt, responses = normalize(_column(row, prompt_column, where, required=False), responses, where)
        check_comparison(stored, [f"response {k}" for k in range(len(stored))], where)
        return prompt, responses, lambda p, rs: {"prompt": p, "responses": rs}

    return _fit_rows(rows, tokenizer, split, max_length=max_length, max_prompt_length=max_prompt_length,
                     prompt_truncation=prompt_truncation, source=source)


def tokenize_demos(rows: Iterable[dict[str, Any]], tokenizer, *, max_length: int,
                   max_prompt_length: int | None = None, prompt_truncation: Truncation = "left",
                   prompt_column: str = "prompt", completion_column: str = "completion",
                   messages_column: str = "messages", source: str = "data") -> tuple[list[dict], TokenStats]:
    """Demonstrations -> examples {"prompt", "completion": ids}. A row with a ``messages`` conversation (and
    no completion column) is split before its last message, which must be the assistant's."""

    def split(row, where):
        if completion_column not in row and messages_column in row:
            messages = _check_text(row[messages_column], f"{where}, column '{messages_column}'")
            if not is_conversation(messages) or messages[-1]["role"] != "assistant" or len(messages) < 2:
                raise InputError(f"{where}: column '{messages_column}' must end with an assistant message")
            prompt, completions = messages[:-1], [messages[-1:]]
        else:
            prompt, completions = normalize(
                _column(row, prompt_column, where), [_column(row, completion_column, where)], where
            )
        return prompt, completions, lambda p, cs: {"prompt": p, "completion": cs[0]}

    return _fit_rows(rows, tokenizer, split, max_length=max_length, max_prompt_length=max_prompt_length,
                     prompt_truncation=prompt_truncation, source=source)


def tokenize_prompts(rows: Iterable[dict[str, Any]], tokenizer, *, max_prompt_length: int,
                     prompt_truncation: Truncation = "left", prompt_column: str = "prompt",
                     chosen_column: str = "chosen", rejected_column: str = "rejected",
                     source: str = "data") -> tuple[list[dict], TokenStats]:
    """Prompts for rollouts -> examples {"prompt": ids}; a prompt longer than ``max_prompt_length`` is cut on
    the ``prompt_truncation`` side (see :func:`cut_prompt`) and counted as truncated. Rows of a preference set (no prompt column) give their shared start."""
    enc, stats, out = Encoder(tokenizer), TokenStats(), []
    for i, row in enumerate(rows):
        where = f"{source}, row {i}"
        stats.rows += 1
        prompt = _column(row, prompt_column, where, required=chosen_column not in row)
        if prompt is None or (
            is_conversation(row.get(chosen_column)) and row[chosen_column][0]["role"] != "assistant"
        ):
            prompt, _ = normalize(
                prompt, [_column(row, chosen_column, where), _column(row, rejected_column, where)], where
            )
        else:
            prompt = _check_text(prompt, f"{where}, column '{prompt_column}'")
        ids = enc.prompt(prompt, where)
        if not ids:
            stats.dropped += 1
            continue
        if len(ids) > max_prompt_length:
            ids = cut_prompt(ids, max_prompt_length, prompt_truncation)
            stats.truncated += 1
        out.append({"prompt": ids})
    return out, stats


def holdout(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded (train, held-out) split; ``fraction`` of the rows (at least one if fraction > 0) held out."""
    if not 0 <= fraction < 1:
        raise InputError(f"eval_fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n = max(1, round(fraction * len(examples)))
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in order[:n]]
