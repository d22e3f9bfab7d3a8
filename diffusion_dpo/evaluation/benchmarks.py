"""Benchmark tables the way their papers report them, built from an evaluation's comparisons.

- GenEval (``geneval``, and the offline ``shapes_geneval``): per task the share of correct images (a
  score of 1) of each model, and the overall score as GenEval computes it, the mean of the task shares
  (not the share of all images). ``geneval``'s tasks are the prompt set's styles (``prompts=geneval``: the
  six GenEval tags); ``shapes_geneval``'s are its checks, each reported as the rows ``shapes_geneval/<task>``.
- OCR (``ocr``): accuracy, the mean of the per-image reward over all images (Flow-GRPO's number).

Each line carries our paired win rate of tuned over base with its 95% interval beside the paper's number.

    tables = benchmark_tables(report, scorers)   # {"geneval": {"kind": "geneval", "tasks": {...}, ...}}
    text = markdown_benchmarks(report.to_json())
"""

from __future__ import annotations

from typing import Any

from diffusion_dpo.evaluation.schema import Comparison, EvaluationReport

OCR_SCORERS = ("ocr",)


def _line(c: Comparison) -> dict[str, Any]:
    return {"n_images": c.n_images, "base": c.base_mean, "tuned": c.tuned_mean, "win_rate": c.win_rate,
            "win_rate_ci": list(c.win_rate_ci)}


def benchmark_tables(report: EvaluationReport, scorers: dict) -> dict[str, dict[str, Any]]:
    """scorer name -> its benchmark table, for the benchmark scorers among ``scorers`` (name -> scorer)."""
    tables = {}
    for name, scorer in scorers.items():
        if name not in report.scorers:
            continue
        if getattr(scorer, "overall", None) == "task_mean":
            tasks = getattr(scorer, "tasks", None)
            if tasks:
                lines = {t: _line(report.scorers[f"{name}/{t}"]) for t in tasks if f"{name}/{t}" in report.scorers}
            else:
                lines = {style: _line(c) for style, c in report.scorers[name].styles.items()}
            tables[name] = {
                "kind": "geneval", "tasks": lines,
                "overall": {m: sum(line[m] for line in lines.values()) / len(lines) for m in ("base", "tuned")},
                "all_correct": _line(report.scorers[name]),
            }
        elif name in OCR_SCORERS:
            tables[name] = {"kind": "ocr", "accuracy": _line(report.scorers[name])}
    return tables


def _win(line: dict) -> str:
    low, high = line["win_rate_ci"]
    return f"{100 * line['win_rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def markdown_benchmarks(report: dict) -> list[str]:
    """Markdown lines of the report's benchmark tables (none when it has none)."""
    out = []
    for name, table in (report.get("benchmarks") or {}).items():
        if table["kind"] == "geneval":
            out.append(f"## {name}: GenEval score (share of correct images)\n")
            out.append("| task | images | base | tuned | win rate [95% CI] |")
            out.append("|---|---:|---:|---:|---|")
            for task, line in table["tasks"].items():
                out.append(f"| {task} | {line['n_images']} | {line['base']:.3f} | {line['tuned']:.3f} | {_win(line)} |")
            overall, every = table["overall"], table["all_correct"]
            out.append(f"| **overall** (mean of tasks) | {every['n_images']} | {overall['base']:.3f} | "
                       f"{overall['tuned']:.3f} | {_win(every)} |")
            out.append("")
        else:
            line = table["accuracy"]
            out.append(f"## {name}: OCR accuracy\n")
            out.append(f"base {line['base']:.3f}, tuned {line['tuned']:.3f} over {line['n_images']} images; "
                       f"win rate {_win(line)}.\n")
    return out
