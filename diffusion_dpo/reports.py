"""Pictures and tables of an evaluation: side-by-side grids, a bar chart of per-style means, a Markdown table.

    grid = pair_grid(pairs, title="photo", cell=192, columns=4)     # PIL image, size grid_size(...)
    bar_chart(report, "means.png")                                  # one panel per scorer
    text = markdown_table(report)
"""

from __future__ import annotations

import math
from pathlib import Path

from diffusion_dpo.fileio import atomic_write

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
