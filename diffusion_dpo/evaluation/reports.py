"""Reports of an evaluation and of the demo: the numbers (build_report), side-by-side grids, a bar chart of
per-style means, Markdown, and the demo's sentences.

    report = build_report(rows, n_seeds=2, scales={"hpsv2": 100.0})  # an EvaluationReport
    grid = pair_grid(pairs, title="photo", cell=192, columns=4)     # PIL image, size grid_size(...)
    bar_chart(report.to_json(), "means.png")                        # one panel per scorer
    text = markdown_table(report.to_json())
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from diffusion_dpo.evaluation.benchmarks import markdown_benchmarks
from diffusion_dpo.evaluation.schema import (
    Comparison,
    DemoReport,
    EvaluationReport,
    ScorerComparison,
    ScoreRow,
    TunedVsBase,
)
from diffusion_dpo.fileio import atomic_write

MODELS = ("base", "tuned")

# Grid layout in pixels: margin around and between tiles, gap between the two images of a pair, a title band
# on top and a fixed caption band (CAPTION_LINES lines) under each pair, so the size depends only on counts.
MARGIN, GAP, TITLE_HEIGHT, LINE_HEIGHT, CAPTION_LINES, FONT_SIZE = 8, 4, 24, 14, 3, 11


def grid_size(n_pairs: int, cell_w: int, cell_h: int, columns: int) -> tuple[int, int]:
    """(width, height) in px of a grid of ``n_pairs`` pairs of ``cell_w`` x ``cell_h`` images, ``columns``
    pairs per row."""
    cols = max(1, min(columns, n_pairs))
    rows = math.ceil(n_pairs / cols)
    tile_w, tile_h = 2 * cell_w + GAP, cell_h + CAPTION_LINES * LINE_HEIGHT
    return MARGIN + cols * (tile_w + MARGIN), TITLE_HEIGHT + rows * (tile_h + MARGIN)


def pair_grid(pairs: list[tuple], *, title: str, cell: int = 192, columns: int = 4):
    """A grid image of (base image, tuned image, prompt) triples: base left, tuned right, prompt under each
    pair, wrapped to the pair's width and cut to CAPTION_LINES lines. Images are resized to ``cell`` px
    wide (height keeps the first image's aspect ratio)."""
    from PIL import Image, ImageDraw, ImageFont

    if not pairs:
        raise ValueError("a grid needs at least one pair")
    first = pairs[0][0]
    cell_w, cell_h = cell, max(1, round(cell * first.height / first.width))
    width, height = grid_size(len(pairs), cell_w, cell_h, columns)
    cols = max(1, min(columns, len(pairs)))
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_SIZE)
    draw.text((MARGIN, 6), f"{title}: base (left) vs tuned (right)", fill="black", font=font)
    tile_w = 2 * cell_w + GAP
    for k, (base, tuned, prompt) in enumerate(pairs):
        x = MARGIN + (k % cols) * (tile_w + MARGIN)
        y = TITLE_HEIGHT + (k // cols) * (cell_h + CAPTION_LINES * LINE_HEIGHT + MARGIN)
        canvas.paste(base.convert("RGB").resize((cell_w, cell_h)), (x, y))
        canvas.paste(tuned.convert("RGB").resize((cell_w, cell_h)), (x + cell_w + GAP, y))
        for i, line in enumerate(_wrap(prompt, font, tile_w, CAPTION_LINES)):
            draw.text((x, y + cell_h + 1 + i * LINE_HEIGHT), line, fill="black", font=font)
    return canvas


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` px; the last line ends in an ellipsis when text is left over."""
    lines: list[str] = []
    current = ""
    words = text.split()
    for i, word in enumerate(words):
        trial = f"{current} {word}".strip()
        if font.getlength(trial) <= width or not current:
            current = trial
            continue
        lines.append(current)
        current = word
        if len(lines) == max_lines:
            break
    else:
        lines.append(current)
        return lines[:max_lines]
    last = lines[-1]
    while last and font.getlength(last + "...") > width:
        last = last[:-1]
    lines[-1] = last.rstrip() + "..."
    return lines


def bar_chart(report: dict, path: str | Path, *, panel_inches: tuple[float, float] = (5.0, 4.0),
              dpi: int = 100) -> Path:
    """Per-style means of base and tuned with their 95% intervals as error bars, one panel per scorer,
    saved as PNG of exactly (n_scorers * panel_inches[0] * dpi) x (panel_inches[1] * dpi) px."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    scorers = report["scorers"]
    fig, axes = plt.subplots(1, len(scorers), figsize=(panel_inches[0] * len(scorers), panel_inches[1]),
                             dpi=dpi, squeeze=False)
    for ax, (name, result) in zip(axes[0], scorers.items()):
        styles = list(result["styles"])
        x = np.arange(len(styles))
        lows = [result["styles"][s][f"{m}_mean_ci"][0] for s in styles for m in ("base", "tuned")]
        highs = [result["styles"][s][f"{m}_mean_ci"][1] for s in styles for m in ("base", "tuned")]
        # Scores of one scorer sit in a narrow band (HPS ~ 27 +- 1, and they may be negative): zoom the axis
        # onto it and draw each bar up from the bottom of the axis.
        pad = 0.15 * (max(highs) - min(lows) or abs(max(highs)) or 1.0)
        bottom, top = min(lows) - pad, max(highs) + pad
        for offset, model, color in ((-0.2, "base", "#9e9e9e"), (0.2, "tuned", "#1f77b4")):
            means = np.array([result["styles"][s][f"{model}_mean"] for s in styles])
            ci = np.array([result["styles"][s][f"{model}_mean_ci"] for s in styles]).reshape(-1, 2)
            err = np.stack([means - ci[:, 0], ci[:, 1] - means]).clip(min=0)
            ax.bar(x + offset, means - bottom, bottom=bottom, width=0.4, yerr=err, capsize=3, label=model,
                   color=color)
        ax.set_ylim(bottom, top)
        ax.set_xticks(x, styles, rotation=20)
        scale = result.get("display_scale", 1.0)
        ax.set_title(f"{name} mean" + (f" (x{scale:g})" if scale != 1.0 else "") + ", 95% CI")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    plt.close(fig)
    return path


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def markdown_table(report: dict) -> str:
    """The report as Markdown: one table per scorer, one row per style and one for all styles."""
    out = [f"# Evaluation: tuned vs base\n\n{report['n_prompts']} prompts x {report['n_seeds']} seeds, "
           f"styles: {', '.join(report['styles'])}.\n"]
    models = report.get("models", {})
    if models:
        out.append(f"- base: `{models.get('base')}`\n- tuned: `{models.get('tuned')}`\n")
    for name, result in report["scorers"].items():
        scale = result.get("display_scale", 1.0)
        out.append(f"## {name}" + (f" (scores x{scale:g})" if scale != 1.0 else "") + "\n")
        out.append("| style | prompts | base mean [95% CI] | tuned mean [95% CI] | base median | tuned median "
                   "| win rate [95% CI] |")
        out.append("|---|---:|---|---|---:|---:|---|")
        rows = list(result["styles"].items()) + [("**all**", result)]
        for style, r in rows:
            out.append(
                f"| {style} | {r['n_prompts']} | {_fmt(r['base_mean'])} [{_fmt(r['base_mean_ci'][0])}, "
                f"{_fmt(r['base_mean_ci'][1])}] | {_fmt(r['tuned_mean'])} [{_fmt(r['tuned_mean_ci'][0])}, "
                f"{_fmt(r['tuned_mean_ci'][1])}] | {_fmt(r['base_median'])} | {_fmt(r['tuned_median'])} | "
                f"{100 * r['win_rate']:.1f}% [{100 * r['win_rate_ci'][0]:.1f}, {100 * r['win_rate_ci'][1]:.1f}] |"
            )
        out.append("")
    out.extend(markdown_benchmarks(report))
    implicit = report.get("implicit_reward")
    if implicit:
        out.append("## Implicit-reward accuracy\n")
        out.append(f"{100 * implicit['accuracy']:.1f}% of {implicit['n_pairs']} pairs "
                   f"(95% CI [{100 * implicit['accuracy_ci'][0]:.1f}, {100 * implicit['accuracy_ci'][1]:.1f}]) "
                   f"from `{implicit['source']}`: the tuned model's DPO implicit reward ranks the labelled "
                   f"winner higher.\n")
    out.append("Win rate: share of (prompt, seed) pairs where the tuned image scores higher, ties counted half. "
               "Intervals: percentile bootstrap over prompts.\n")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ the numbers

def build_report(rows: Sequence[ScoreRow], *, n_seeds: int, scales: dict[str, float] | None = None,
                 n_boot: int = 2000, seed: int = 0) -> EvaluationReport:
    """Per scorer: overall and per-style means, medians (95% CIs), paired win rate (95% CI) from score rows
    (keys style, index, seed, model, scorer, score are used). Means, medians and their CIs are multiplied by
    ``scales[scorer]`` (a scorer's ``report_scale``: x100 for HPS, as the HPSv2 benchmark prints it);
    scores.jsonl keeps the raw values. Intervals resample whole prompts."""
    table: dict[str, dict[tuple, dict[str, float]]] = {}
    for r in rows:
        table.setdefault(r["scorer"], {}).setdefault((r["style"], r["index"], r["seed"]), {})[r["model"]] = r["score"]
    styles = list(dict.fromkeys(r["style"] for r in rows))
    scorers = {}
    for name, by_key in table.items():
        incomplete = [k for k, v in by_key.items() if set(v) != set(MODELS)]
        if incomplete:
            raise ValueError(f"scorer {name}: item {incomplete[0]} lacks a base or tuned score")
        scale = float((scales or {}).get(name, 1.0))
        overall = _compare(by_key, list(by_key), scale, n_seeds, n_boot, seed)
        per_style = {s: _compare(by_key, [k for k in by_key if k[0] == s], scale, n_seeds, n_boot, seed)
                     for s in styles}
        scorers[name] = ScorerComparison(**vars(overall), display_scale=scale, styles=per_style)
    return EvaluationReport(styles=styles, n_prompts=len({(r["style"], r["index"]) for r in rows}),
                            n_seeds=n_seeds, scorers=scorers)


def _compare(by_key: dict, keys: list[tuple], scale: float, n_seeds: int, n_boot: int, seed: int) -> Comparison:
    import numpy as np

    from diffusion_dpo.evaluation.stats import summarize, win_rate, win_rate_ci

    base = np.array([by_key[k]["base"] for k in keys], dtype=np.float64)
    tuned = np.array([by_key[k]["tuned"] for k in keys], dtype=np.float64)
    prompt_ids: dict[tuple, int] = {}
    groups = np.array([prompt_ids.setdefault(k[:2], len(prompt_ids)) for k in keys])  # a group per prompt
    numbers = {}
    for model, values in (("base", base), ("tuned", tuned)):
        s = summarize(values * scale, groups=groups, n_boot=n_boot, seed=seed)
        numbers.update({f"{model}_{k}": v for k, v in s.items()})
    return Comparison(n_prompts=len(prompt_ids), n_seeds=n_seeds, n_images=len(keys), **numbers,
                      win_rate=win_rate(tuned, base),
                      win_rate_ci=list(win_rate_ci(tuned, base, groups=groups, n_boot=n_boot, seed=seed)))


# ---------------------------------------------------------------------------------------------- the demo

def comparison_grid(rows: list[tuple[str, list]], columns: list[str], path: Path, cell: int = 96) -> Path:
    """Held-out prompts down, models across (each image with its score under it)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    label_w, pad, caption = 250, 6, 14
    width = label_w + len(columns) * (cell + pad) + pad
    height = 20 + len(rows) * (cell + caption + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        draw.text((label_w + pad + j * (cell + pad), 4), name, fill="black", font=font)
    for i, (prompt, cells) in enumerate(rows):
        y = 20 + i * (cell + caption + pad)
        draw.text((pad, y + cell // 2 - 6), prompt.removeprefix("a "), fill="black", font=font)
        for j, (image, score) in enumerate(cells):
            x = label_w + pad + j * (cell + pad)
            canvas.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
            draw.text((x, y + cell + 1), f"{score:.3f}", fill="black", font=font)
    canvas.save(path)
    return path


def grid_rows(evaluations: list[tuple[Path, Sequence[ScoreRow]]], n_prompts: int,
              scorer: str) -> list[tuple[str, list]]:
    """For ``n_prompts`` prompts (first seed): the base image, then each evaluation's tuned image, with their
    ``scorer`` scores. ``evaluations``: (output_dir, score rows) of evaluations of the same base on the same
    prompts and seeds; a row's image path is relative to its output_dir."""
    from PIL import Image

    def first_seed_rows(rows: Sequence[ScoreRow]) -> dict[tuple[int, str], ScoreRow]:
        mine = [r for r in rows if r["scorer"] == scorer]
        first = min(r["seed"] - r["index"] for r in mine)
        return {(r["index"], r["model"]): r for r in mine if r["seed"] - r["index"] == first}

    tables = [first_seed_rows(rows) for _, rows in evaluations]
    every = sorted({i for i, _ in tables[0]})
    # Evenly spread over the (sorted) prompts, so both sizes and all shapes show up.
    indices = sorted({every[k * len(every) // n_prompts] for k in range(min(n_prompts, len(every)))})
    out = []
    for i in indices:
        base = tables[0][(i, "base")]
        cells = [(Image.open(Path(evaluations[0][0]) / base["image"]).convert("RGB"), base["score"])]
        for (folder, _), table in zip(evaluations, tables):
            r = table[(i, "tuned")]
            cells.append((Image.open(Path(folder) / r["image"]).convert("RGB"), r["score"]))
        out.append((base["prompt"], cells))
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pct_ci(c: TunedVsBase) -> str:
    return f"{_pct(c.win_rate)} [{100 * c.win_rate_ci[0]:.1f}, {100 * c.win_rate_ci[1]:.1f}]"


def demo_sentences(report: DemoReport) -> list[str]:
    """The demo's result in words, one sentence per line, for the console."""
    first = report.rounds[0].dpo
    lines = [f"Diffusion-DPO beats the base on {_pct_ci(first)} of held-out images"
             + (f"; SFT {_pct(report.sft.win_rate)}." if report.sft else ".")]
    verdict = "entirely above" if first.win_rate_ci[0] > 0.5 else "not entirely above"
    lines.append(f"Its 95% interval is {verdict} 50%; mean shapes score {first.base_mean:.3f} (base) -> "
                 f"{first.tuned_mean:.3f} (Diffusion-DPO).")
    for r in report.rounds[1:]:
        lines.append(f"Round {r.round}, trained from round {r.round - 1}'s policy, beats the base on "
                     f"{_pct_ci(r.dpo)} (mean {r.dpo.tuned_mean:.3f}).")
    if report.rounds[0].geneval:
        lines.append(geneval_sentence(report.rounds[0].geneval))
    return lines


def geneval_sentence(table: dict) -> str:
    """One line of a GenEval benchmark table (evaluation.benchmarks): overall and per task, base -> tuned."""
    tasks = ", ".join(f"{t} {line['base']:.2f} -> {line['tuned']:.2f}" for t, line in table["tasks"].items())
    return (f"Shapes-world GenEval (share of correct images, mean of the checks): {table['overall']['base']:.3f} "
            f"(base) -> {table['overall']['tuned']:.3f}; {tasks}.")


def markdown_report(report: DemoReport) -> str:
    from diffusion_dpo.recipes.demo_config import FAMILY_WORLD

    cfg, rounds = report.config, report.rounds
    first = rounds[0].dpo
    scorer = FAMILY_WORLD[cfg.get("family", "sd")]["scorer"]
    lines = [
        "# Diffusion-DPO demo: the shapes world",
        "",
        f"Base `{report.base}`; {report.train_prompts} training prompts x "
        f"{cfg['candidates_per_prompt']} candidates, best vs worst by the `{scorer}` scorer; evaluation on "
        f"{report.held_out_prompts} held-out "
        f"prompts x {cfg['eval_seeds']} seeds, tuned vs base with the same seeds. Seed {cfg['seed']}.",
        "",
        f"| model | mean {scorer} score [95% CI] | win rate over base [95% CI] |",
        "|---|---|---|",
        f"| base | {first.base_mean:.3f} [{first.base_mean_ci[0]:.3f}, {first.base_mean_ci[1]:.3f}] | - |",
    ]
    rows = [("SFT on winners (round 1 pairs)", report.sft)] if report.sft else []
    rows += [(f"Diffusion-DPO round {r.round}", r.dpo) for r in rounds]
    for name, c in rows:
        lines.append(f"| {name} | {c.tuned_mean:.3f} [{c.tuned_mean_ci[0]:.3f}, {c.tuned_mean_ci[1]:.3f}] "
                     f"| {_pct(c.win_rate)} [{_pct(c.win_rate_ci[0])}, {_pct(c.win_rate_ci[1])}] |")
    verdict = "entirely above" if first.win_rate_ci[0] > 0.5 else "not entirely above"
    lines += [
        "",
        f"Round 1 Diffusion-DPO beats the base on {_pct(first.win_rate)} of held-out (prompt, seed) pairs; "
        f"its 95% interval is {verdict} 50%.",
        "",
        "| round | pairs | mean winner score | mean loser score | DPO loss (last) | implicit accuracy (last) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rounds:
        m = r.train_metrics
        lines.append(f"| {r.round} | {r.pairs} | {r.mean_winner_score:.3f} | {r.mean_loser_score:.3f} "
                     f"| {m.get('loss', float('nan')):.4f} | {m.get('implicit_acc', float('nan')):.2f} |")
    lines += [f"\n{geneval_sentence(r.geneval)} (round {r.round})" for r in rounds if r.geneval]
    lines += [
        "",
        "![base | SFT | DPO rounds](grid.png)",
        "",
        "Win rate: share of (prompt, seed) pairs where the tuned image scores higher than the base's, ties "
        "half; intervals: bootstrap over prompts. Timings (s): "
        + ", ".join(f"{k} {v}" for k, v in report.seconds.items()) + ".",
        "",
    ]
    return "\n".join(lines)
