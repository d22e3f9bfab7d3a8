"""``diffusion-dpo evaluate``: a tuned checkpoint against its base on a prompt set (HPSv2-style, or a benchmark:
GenEval, PartiPrompts, DrawBench, OCR), per style.

Both models generate an image for every (prompt, seed) with the same seed, sampler, steps, guidance and size;
every scorer scores every image; the report gives each model's mean and median per style and overall with
95% bootstrap intervals, and the paired win rate of tuned over base (ties half) with its interval.

    diffusion-dpo evaluate model.pretrained=BASE model.lora=runs/train/final prompts=hpsv2 seeds=1 \\
        scorers=pickscore,hpsv2 output_dir=runs/eval

Outputs in ``output_dir``: ``config.yaml``; ``images/{base,tuned}/<style>/<index>-<seed>.png`` (a rerun, with
the default resume=auto, skips images already there, so an interrupted run resumes; resume=null refuses a
folder holding a run, overwrite=true replaces it); ``scores.jsonl`` (one row per image and scorer);
``report.json``, ``report.md`` (schema: diffusion_dpo.evaluation.schema); ``grids/<style>.png``; ``means.png``.

Several GPUs: ``accelerate launch -m diffusion_dpo evaluate ...``; each process generates and scores its
share of the (prompt, seed) items, and the main process writes the report after all are done.
"""

from __future__ import annotations

from pathlib import Path

from diffusion_dpo.config import parse_args
from diffusion_dpo.evaluation.paired import EvaluateConfig, EvaluateResult, run

__all__ = ["EvaluateConfig", "EvaluateResult", "main", "run"]


def main(argv: list[str]) -> int:
    cfg = parse_args(EvaluateConfig, argv, prog="diffusion-dpo evaluate", description=__doc__.split("\n\n")[0])
    result = run(cfg)
    if result.report_md is not None:  # the main process
        print(Path(result.report_md).read_text())
        print(f"report: {result.report_json}  grids: {Path(result.output_dir) / 'grids'}  chart: {result.chart}")
    return 0
