"""The sample-efficiency table: each tuning method on the demo world's SD and flow bases, several seeds.

Every cell is one ``diffusion-dpo demo`` run in its own folder (``RUNS/<method>-<family>-s<seed>``), launched as
a child process so its wall and CPU seconds are measured from outside; a cell whose report.json already exists
is read, not rerun. The table gives, per method and base, the images the method generated, the CPU seconds
and the held-out win rate over the base with its 95% interval, seed by seed, plus the seeds' mean.

    python scripts/sample_efficiency.py --runs runs/efficiency --seeds 0 1 2 --jobs 2
    python scripts/sample_efficiency.py --runs runs/efficiency --table-only      # the table from finished cells

Methods: offline_dpo (label once, then DPO; the SFT baseline off), online_dpo, grpo (the demo's defaults for
the base: a window and a group's shared start), grpo_every_step (the earlier default: every step stochastic, 3
trained), grpo_window (the window of WINDOW steps alone, Flow-GRPO-Fast style) and nft (DiffusionNFT).
Each run gets ``threads=1`` so ``--jobs`` runs share the cores without oversubscribing them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WINDOW = 2
# The online keys of the earlier GRPO default (before the window and the shared start; 10 steps, 4 prompts x 48)
EVERY_STEP = ["online.sde_window_size=0", "online.train_steps=3", "online.updates_per_epoch=3",
              "online.shared_start_noise=false", "online.sampling.num_inference_steps=10", "online.prompts_per_step=4",
              "online.optim.max_steps=48"]
METHODS = {
    "offline_dpo": ["method=offline_dpo", "sft=false"],
    "online_dpo": ["method=online_dpo"],
    "grpo": ["method=grpo"],  # the demo's defaults for the base
    "grpo_every_step": ["method=grpo", *EVERY_STEP],
    # the window alone: its transitions in as many updates of 32 as GRPO's every-step default (4 x 8 x 3 in 3)
    "grpo_window": ["method=grpo", *EVERY_STEP[3:], f"online.sde_window_size={WINDOW}", f"online.train_steps={WINDOW}",
                    f"online.updates_per_epoch={WINDOW}"],
    "nft": ["method=nft"],
}


def cell_dir(runs: Path, method: str, family: str, seed: int) -> Path:
    return runs / f"{method}-{family}-s{seed}"


def run_cell(runs: Path, method: str, family: str, seed: int, extra: list[str]) -> dict:
    """Run one demo (unless its report exists) and return its row; the child's CPU time comes from wait4."""
    out = cell_dir(runs, method, family, seed)
    measured = out / "efficiency.json"
    if not (out / "report.json").exists():
        args = [sys.executable, "-m", "diffusion_dpo.cli", "demo", *METHODS[method], f"family={family}",
                f"seed={seed}", "threads=1", f"output_dir={out}", "overwrite=true", *extra]
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(out.parent / f"{out.name}.log", "w") as log:
            child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != 0:  # a failed cell is a row of the table, and the sweep goes on
            print(f"{' '.join(args)} exited {code}; its output is in {out.parent / (out.name + '.log')}",
                  file=sys.stderr)
            return {"method": method, "family": family, "seed": seed, "failed": code}
        measured.write_text(json.dumps({"wall_seconds": round(wall, 1),
                                        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
                                        "command": args[2:]}) + "\n")
    return row(out, method, family, seed)


def row(out: Path, method: str, family: str, seed: int) -> dict:
    report = json.loads((out / "report.json").read_text())
    measured = json.loads((out / "efficiency.json").read_text()) if (out / "efficiency.json").exists() else {}
    return {"method": method, "family": family, "seed": seed, "images": report["images_generated"],
            "win_rate": report["win_rate"], "win_rate_ci": report["win_rate_ci"],
            "base_mean": report["base_mean"], "tuned_mean": report["tuned_mean"],
            "cpu_seconds": measured.get("cpu_seconds", report.get("cpu_seconds")),
            "wall_seconds": measured.get("wall_seconds", report["seconds"]["total"])}


def table(rows: list[dict]) -> str:
    """Markdown: a line per method and base (seeds side by side), then the mean over seeds."""
    seeds = sorted({r["seed"] for r in rows})
    head = ("| method | base | images generated | CPU s (median) | "
            + " | ".join(f"seed {s} win rate [95% CI]" for s in seeds) + " | mean win rate | all above 50% |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    groups: dict[tuple[str, str], list[dict]] = {}
    failed = [r for r in rows if "failed" in r]
    for r in rows:
        if "failed" in r:
            continue
        groups.setdefault((r["method"], r["family"]), []).append(r)
    for (method, family), cells in sorted(groups.items(), key=lambda kv: (kv[0][1], list(METHODS).index(kv[0][0]))):
        by_seed = {c["seed"]: c for c in cells}
        cpu = sorted(c["cpu_seconds"] for c in cells if c["cpu_seconds"] is not None)
        rates = [f"{100 * by_seed[s]['win_rate']:.1f}% [{100 * by_seed[s]['win_rate_ci'][0]:.1f}, "
                 f"{100 * by_seed[s]['win_rate_ci'][1]:.1f}]" if s in by_seed else "-" for s in seeds]
        mean = sum(c["win_rate"] for c in cells) / len(cells)
        above = sum(c["win_rate_ci"][0] > 0.5 for c in cells)
        lines.append(f"| {method} | {family} | {cells[0]['images']} | {cpu[len(cpu) // 2]:.0f} | "
                     + " | ".join(rates) + f" | {100 * mean:.1f}% | {above} of {len(cells)} |")
    lines += [f"\n{r['method']} on {r['family']}, seed {r['seed']}: the run failed (exit {r['failed']}); its log "
              f"is beside its folder." for r in failed]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/efficiency"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--families", nargs="+", default=["sd", "flow"], choices=["sd", "flow"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--jobs", type=int, default=1, help="demo runs at once (each on one thread)")
    parser.add_argument("--table-only", action="store_true", help="only tabulate the cells already finished")
    parser.add_argument("extra", nargs="*", help="further demo keys for every run (key=value)")
    args = parser.parse_args()
    # seed by seed, so an interrupted sweep still has every method on the first seeds
    cells = [(m, f, s) for s in args.seeds for f in args.families for m in args.methods]
    if args.table_only:
        rows = [row(cell_dir(args.runs, *c), *c) for c in cells if (cell_dir(args.runs, *c) / "report.json").exists()]
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(lambda c: run_cell(args.runs, *c, args.extra), cells))
    (args.runs / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = table(rows)
    (args.runs / "table.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
