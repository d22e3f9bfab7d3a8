"""What the LLM recipes share on the data side: the data config section, reading and tokenising the training
and held-out rows, and reading a run's metrics back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diffusion_dpo.config import option
from diffusion_dpo.errors import InputError


def _none_or_positive(v) -> bool:
    return v is None or v >= 1


@dataclass
class DataSection:
    source: str = option("trl-lib/ultrafeedback_binarized",
                         "hub dataset id, or a local parquet/JSON/JSONL file or folder of them")
    subset: str | None = option(None, "hub dataset configuration name (e.g. 'harmless-base'); null = default")
    split: str = option("train", "split to train on (a local folder's subfolder of that name, if any)")
    eval_source: str | None = option(None, "held-out rows from another source; null = the training source")
    eval_split: str | None = option(
        None, "split of held-out rows (e.g. 'test'); null = hold out eval_fraction of the training rows")
    eval_fraction: float = option(0.05,
                                  "fraction of training rows held out when eval_split is null (0 = none)",
                                  lambda v: 0 <= v < 1, "a fraction in [0, 1)")
    max_rows: int | None = option(None, "read at most this many training rows (null = all)",
                                  _none_or_positive,
                                  "null or at least 1 row")
    max_eval_rows: int | None = option(512, "read at most this many held-out rows (null = all)",
                                       _none_or_positive, "null or at least 1 row")
    max_length: int = option(1024, "token budget of prompt + completion; longer completions are cut (start "
                             "kept), rows whose prompt fills it are dropped", lambda v: v >= 2,
                             "at least 2 tokens")
    max_prompt_length: int | None = option(
        512, "prompts longer than this are cut on the prompt_truncation side (null = no separate prompt limit)",
        _none_or_positive, "null or at least 1 token")
    prompt_truncation: Literal["left", "right"] = option(
        "left",
        "side of a prompt longer than max_prompt_length that is cut: left drops its oldest tokens and keeps the "
        "end (a chat prompt's latest turns and the assistant's generation header); right keeps its start",
    )
    prompt_column: str = option(
        "prompt",
        "column of the prompt (text or conversation); may be absent when the completions share their "
        "start")


def read_metrics(output_dir: str | Path) -> list[dict[str, float]]:
    """The rows of a run's metrics.jsonl."""
    return [
        json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line
    ]


def token_budget(data: DataSection) -> dict[str, Any]:
    """The tokeniser keywords every recipe takes from its data section (budget, cut side, prompt column)."""
    return {"max_length": data.max_length, "max_prompt_length": data.max_prompt_length,
            "prompt_truncation": data.prompt_truncation, "prompt_column": data.prompt_column}


def load_examples(data: DataSection, tokenize, seed: int, log=print) -> tuple[list[dict], list[dict], dict]:
    """Read and tokenise the training rows and the held-out rows (another split or source, or a seeded
    ``eval_fraction`` of the training rows). ``tokenize(rows, source=name)`` returns (examples, TokenStats).
    Returns (train, held_out, {"train": stats, "eval": stats})."""
    from diffusion_dpo.llm.data import holdout, read_rows

    name = f"{data.source}[{data.split}]"
    train, stats = tokenize(
        read_rows(data.source, data.split, subset=data.subset, max_rows=data.max_rows), source=name
    )
    log(f"{name}: {stats.describe()}")
    report = {"train": stats.as_dict()}
    if data.eval_split is None and data.eval_source is None:
        train, held = holdout(train, data.eval_fraction, seed)
        held = held[: data.max_eval_rows] if data.max_eval_rows is not None else held
    else:
        eval_source, eval_split = data.eval_source or data.source, data.eval_split or "train"
        eval_name = f"{eval_source}[{eval_split}]"
        held, eval_stats = tokenize(
            read_rows(eval_source, eval_split, subset=data.subset, max_rows=data.max_eval_rows),
            source=eval_name,
        )
        log(f"{eval_name}: {eval_stats.describe()}")
        report["eval"] = eval_stats.as_dict()
    if not train:
        raise InputError(f"{name}: no training rows left after tokenisation ({stats.describe()})")
    return train, held, report
