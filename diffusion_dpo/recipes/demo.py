"""``diffusion-dpo demo``: the package's whole job, offline, on a CPU, in minutes.

The shapes world (scorers/shapes/world.py) has two tiny base models that ship with the package
(assets/demo/base/, SD layout, ``family=sd``, the default; assets/demo/flow_base/, SD3 layout with
rectified flow, ``family=flow``) and a scorer that needs no weights (scorers/shapes/scorer.py); its moving
version (scorers/shapes/motion.py: 5-frame clips of a shape moving left, right, up or down) has a tiny
Wan-layout video base (assets/demo/video_base/, ``family=video``) and the clip scorer ``shapes_video``. The demo
runs, with the same recipes a user runs on Stable Diffusion:

1. label: K candidates per training prompt from the current policy, scored by ``shapes``; the best and the
   worst of each prompt make a preference pair (``diffusion-dpo label``);
2. train: Diffusion-DPO on those pairs (``diffusion-dpo train``, full fine-tune or LoRA), and, in round 1,
   the paper's baseline: SFT on the winners of the same pairs;
3. evaluate: held-out prompts (never labelled or trained on), several seeds each, tuned vs the original
   base with the same seeds (``diffusion-dpo evaluate``);
4. report: win rate over the base with its 95% interval, mean scores, a side-by-side grid
   (``report.md``, ``report.json``, ``grid.png`` in ``output_dir``).

With ``rounds=N`` steps 1-3 repeat, each round labelling with the policy the previous round produced
and training from it (its reference is that policy too); every round is evaluated against the base.

    diffusion-dpo demo                                   # ~5 minutes on a 2-core laptop CPU
    diffusion-dpo demo family=flow                       # the same on the SD3-layout flow-matching base
    diffusion-dpo demo family=video threads=1            # video pairs on the Wan-layout video base
    diffusion-dpo demo seed=1 rounds=2 output_dir=runs/demo-r2

An output_dir that holds a demo is refused (its pairs and images would pass for new ones); overwrite=true
replaces it, resume=auto continues its stages (label and evaluate reuse their finished shards and images).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from diffusion_dpo import config
from diffusion_dpo.config import at_least_one, fill_nulls, non_negative, option, parse_args, to_dict
from diffusion_dpo.engine.run_folder import claim_output_dir, parse_resume, releases_output_dir
from diffusion_dpo.evaluation.paired import reuse_base_images
from diffusion_dpo.evaluation.schema import DemoReport, RoundReport, TunedVsBase
from diffusion_dpo.pipeline_config import PipelineSection
from diffusion_dpo.recipes.demo_common import (
    Console,
    check_base,
    consistency,
    evaluate_config,
    family_eval_seeds,
    policy_pipeline,
    sampling_section,
    timed,
    world,
    write_prompts,
)
from diffusion_dpo.recipes.demo_config import (
    FAMILY_TRAIN_DEFAULTS,
    FAMILY_WORLD,
    DemoTrainConfig,
    SamplingConfig,
    WorldConfig,
    null_or_positive,
)
from diffusion_dpo.recipes.demo_online import OnlineDemoConfig
from diffusion_dpo.run_options import OptimSection, PreferenceLossSection, RunOptions, auto_or_null


@dataclass
class DemoConfig(RunOptions):
    output_dir: str = option("runs/demo", "where every stage's files, report.md, report.json and grid.png go")
    resume: Optional[str] = option(
        None, "null: start afresh (an output_dir holding a demo is refused unless overwrite=true: its pairs and "
        "images would pass for new ones); auto: continue the demo there, each stage from what it finished",
        auto_or_null, "null or auto")
    overwrite: bool = option(False, "replace the demo already in output_dir (its config.yaml, prompts, rounds "
                             "and reports; other files stay)")
    family: Literal["sd", "flow", "video"] = option(
        "sd", "which shipped demo base (and its tuning defaults): sd, the SD-layout UNet (assets/demo/base); "
        "flow, the SD3-layout flow-matching transformer (assets/demo/flow_base); or video, the Wan-layout "
        "video base of the moving-shapes world (assets/demo/video_base: 5-frame clips, the shapes_video scorer)")
    base: str | None = option(None, "the base pipeline folder (null: the shipped base of ``family``); its model "
                              "family must be the one ``family`` names")
    seed: int = option(0, "seed of labelling candidates, training noise and evaluation images")
    rounds: int = option(1, "label -> train rounds, each from the previous round's policy", at_least_one,
                         "at least 1")
    candidates_per_prompt: int = option(8, "K: candidates generated per training prompt, best vs worst kept",
                                        lambda v: v >= 2, "at least 2")
    sft: bool = option(True, "also train the SFT baseline (winners only) on round 1's pairs and evaluate it")
    eval_seeds: Optional[int] = option(None, "images per held-out prompt and model (null: the family's, 16 on "
                                       "the flow base, 4 on sd and video)", null_or_positive, "null or at least 1")
    world: WorldConfig = option(WorldConfig, "prompts of the shapes world")
    sampling: SamplingConfig = option(SamplingConfig, "sampler settings, the same for every model")
    train: DemoTrainConfig = option(DemoTrainConfig, "Diffusion-DPO and SFT settings")
    threads: int = option(0, "CPU threads for torch (0: torch's default); on a CPU shared with other jobs "
                          "1 can be much faster than 2", non_negative, "0 (torch's default) or a positive number")
    n_boot: int = option(2000, "bootstrap resamples for the 95% intervals")
    grid_prompts: int = option(12, "held-out prompts shown in grid.png (first seed)", non_negative, "0 or more")
    method: Literal["offline_dpo", "grpo", "online_dpo", "nft"] = option(
        "offline_dpo", "offline_dpo: label -> train (-> evaluate); grpo / online_dpo / nft: tune online against "
        "the scorer (diffusion-dpo grpo), then evaluate (recipes/demo_online.py)")
    online: OnlineDemoConfig = option(OnlineDemoConfig, "method=grpo / online_dpo / nft: the online tuning "
                                      "settings")


# ------------------------------------------------------------------------------------------ stage configs

def label_config(cfg: DemoConfig, policy: str, prompts_file: Path, out: Path, round_: int, resume: str | None):
    from diffusion_dpo.recipes import label

    s = cfg.sampling
    return label.LabelConfig(
        model=PipelineSection(pretrained=policy), prompts=str(prompts_file),
        scorer=label.ScorerConfig(name=world(cfg)["scorer"]), candidates_per_prompt=cfg.candidates_per_prompt,
        pairing="best_worst", sampling=sampling_section(cfg),
        batch_size=s.batch_size, seed=1000 * cfg.seed + round_, output_dir=str(out),
        prompts_per_shard=10_000,  # one shard: the whole round is one unit of work
        resume=resume, mixed_precision=cfg.mixed_precision,
    )


def train_config(cfg: DemoConfig, method: str, policy: str, pairs: Path, out: Path, round_: int,
                 resume: str | None):
    from diffusion_dpo.data import DataConfig
    from diffusion_dpo.recipes import train

    t = cfg.train
    run_optim = t.optim if method == "dpo" else t.sft_optim
    return train.TrainConfig(
        method=method,
        model=train.ModelConfig(pretrained=policy, lora_rank=t.model.lora_rank),
        # no flips of clips: a mirrored "moving left" clip moves right
        data=DataConfig(source=str(pairs), resolution=world(cfg)["side"] or _resolution(policy),
                        random_flip=not world(cfg)["motion"],
                        caption_dropout=t.data.caption_dropout),
        loss=PreferenceLossSection(beta=t.loss.beta),
        optim=OptimSection(
            learning_rate=run_optim.learning_rate, scale_lr=False, scheduler="constant_with_warmup",
            warmup_steps=t.optim.warmup_steps, batch_size=t.optim.batch_size, max_steps=run_optim.max_steps,
            seed=1000 * cfg.seed + round_),
        precompute=True, output_dir=str(out), checkpoint_every=0, log_every=10, resume=resume,
        mixed_precision=cfg.mixed_precision,
    )


def _resolution(pipeline: str) -> int:
    """Image side in px of a pipeline folder: denoiser sample size (in latent px) x VAE downsampling factor."""
    from diffusion_dpo.families import detect

    name = detect(pipeline).denoiser_name
    denoiser = json.loads((Path(pipeline) / name / "config.json").read_text())
    vae = json.loads((Path(pipeline) / "vae" / "config.json").read_text())
    return denoiser["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


def resolve_defaults(cfg: DemoConfig) -> DemoConfig:
    """``cfg`` with the train.* keys and eval_seeds left null set to the family's defaults (what config.yaml
    records)."""
    from dataclasses import replace

    return replace(family_eval_seeds(cfg), train=fill_nulls(cfg.train, FAMILY_TRAIN_DEFAULTS[cfg.family]))


# ---------------------------------------------------------------------------------------------- pieces

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# ------------------------------------------------------------------------------------------------- run

@dataclass
class _Context:
    """What every round needs: the config, the folders and prompt files, where timings and words go."""

    cfg: DemoConfig
    base: str
    out: Path
    train_file: Path
    held_out_file: Path
    n_train: int
    n_held_out: int
    resume: str | None  # handed to every stage: null (fresh) or auto (continue)
    seconds: dict
    console: Console


@releases_output_dir
def run(cfg: DemoConfig) -> DemoReport:
    """Label, train (DPO and SFT), evaluate and report into ``cfg.output_dir``; return the report."""
    import torch

    config.validate(cfg)
    cfg = resolve_defaults(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base = check_base(cfg)
    out = Path(cfg.output_dir)
    claim_output_dir(out, owner="demo", resume=cfg.resume, overwrite=cfg.overwrite,
                     run_files=("prompts", "report.md", "report.json", "grid.png", "round-*"),
                     marks=("prompts", "round-*", "report.md", "report.json"))
    out.mkdir(parents=True, exist_ok=True)
    config.save_config(cfg, out / "config.yaml")
    train_file, held_out_file = write_prompts(cfg, out / "prompts")
    n_train, n_held_out = (len(f.read_text().splitlines()) for f in (train_file, held_out_file))
    console = Console(total=3 * cfg.rounds + int(cfg.sft))
    # Every stage continues (auto) when the demo does, and otherwise starts afresh in its own folder.
    ctx = _Context(cfg, base, out, train_file, held_out_file, n_train, n_held_out, parse_resume(cfg.resume), {},
                   console)
    start, cpu_start = time.perf_counter(), time.process_time()
    rounds, evaluations, policy, sft = [], [], base, None
    for r in range(1, cfg.rounds + 1):
        round_report, round_evals, sft_result = _round(ctx, r, policy)
        rounds.append(round_report)
        evaluations += round_evals
        sft = sft or sft_result
        policy = round_report.policy
    ctx.seconds["total"] = round(time.perf_counter() - start, 1)

    report = DemoReport(method="offline_dpo", base=base, output_dir=str(out), config=to_dict(cfg),
                        train_prompts=n_train, held_out_prompts=n_held_out, rounds=rounds, sft=sft,
                        seconds=ctx.seconds, report=str(out / "report.md"), grid=None,
                        cpu_seconds=round(time.process_time() - cpu_start, 1))
    _write_report(report, evaluations, cfg.grid_prompts, out)
    return report


def _round(ctx: _Context, r: int, policy: str) -> tuple[RoundReport, list, Optional[TunedVsBase]]:
    """One round: label with ``policy``, train DPO (and SFT in round 1) from it, evaluate against the base.
    Returns the round, its evaluations (SFT first) for the grid, and the SFT comparison (or None)."""
    from diffusion_dpo.recipes import evaluate, label, train

    cfg, console, seconds, resume = ctx.cfg, ctx.console, ctx.seconds, ctx.resume
    rdir = ctx.out / f"round-{r}"
    source = "the base" if r == 1 else f"round {r - 1}'s policy"
    tag = console.stage(f"label: {cfg.candidates_per_prompt} candidates for each of {ctx.n_train} training "
                        f"prompts from {source}, best vs worst by the {world(cfg)['scorer']} scorer")
    labelled = timed(seconds, f"label_{r}", label.run,
                      label_config(cfg, policy, ctx.train_file, rdir / "pairs", r, resume), desc=tag)
    console.say(f"{labelled.pairs_written} pairs; mean winner score {labelled.mean_winner_score:.3f}, mean loser "
                f"score {labelled.mean_loser_score:.3f}.")
    t = cfg.train
    kind = f"a rank-{t.model.lora_rank} LoRA" if t.model.lora_rank else "the full denoiser"
    console.stage(f"train DPO: {t.optim.max_steps} steps of {t.optim.batch_size} pairs, {kind}, beta_dpo "
                  f"{t.loss.beta:g}")
    trained = timed(seconds, f"train_dpo_{r}", train.run,
                     train_config(cfg, "dpo", policy, rdir / "pairs", rdir / "dpo", r, resume))
    m = trained.last_metrics
    console.say(f"last logged DPO loss {m.get('loss', float('nan')):.4f}, implicit accuracy "
                f"{m.get('implicit_acc', float('nan')):.2f}.")
    sft_run = None
    if r == 1 and cfg.sft:
        console.stage(f"train SFT: the paper's baseline, {t.sft_optim.max_steps} steps on the winners of the same pairs")
        sft_run = timed(seconds, "train_sft", train.run,
                         train_config(cfg, "sft", policy, rdir / "pairs", rdir / "sft", r, resume))
    new_policy = policy_pipeline(policy, Path(trained.final), trained.format, rdir / "policy")
    if r > 1:
        reuse_base_images(ctx.out / "round-1" / "eval", rdir / "eval")
    tag = console.stage(f"evaluate: {'SFT and ' if sft_run else ''}Diffusion-DPO round {r} against the base on "
                        f"{ctx.n_held_out} held-out prompts x {cfg.eval_seeds} seed{'s' * (cfg.eval_seeds != 1)}")
    evaluation = timed(seconds, f"evaluate_{r}", evaluate.run,
                        evaluate_config(cfg, ctx.base, new_policy, ctx.held_out_file, rdir / "eval", resume),
                        desc=f"{tag} DPO")
    scorer = world(cfg)["scorer"]
    dpo = TunedVsBase.of(evaluation.scorers[scorer], evaluation.output_dir)
    evaluations, sft = [evaluation], None
    if sft_run is not None:
        sft_policy = policy_pipeline(policy, Path(sft_run.final), sft_run.format, rdir / "sft_policy")
        reuse_base_images(rdir / "eval", rdir / "sft_eval")
        sft_eval = timed(seconds, "evaluate_sft", evaluate.run,
                          evaluate_config(cfg, ctx.base, sft_policy, ctx.held_out_file, rdir / "sft_eval", resume),
                          desc=f"{tag} SFT")
        sft = TunedVsBase.of(sft_eval.scorers[scorer], sft_eval.output_dir)
        evaluations.insert(0, sft_eval)
    console.say(f"Diffusion-DPO round {r} beats the base on {_pct(dpo.win_rate)} of held-out images"
                + (f"; SFT {_pct(sft.win_rate)}." if sft else "."))
    round_report = RoundReport(round=r, policy=new_policy, pairs=labelled.pairs_written,
                               mean_winner_score=labelled.mean_winner_score,
                               mean_loser_score=labelled.mean_loser_score, train_metrics=m, dpo=dpo,
                               images_generated=cfg.candidates_per_prompt * ctx.n_train,
                               geneval=evaluation.benchmarks.get("shapes_geneval"),
                               frame_consistency=consistency(evaluation))
    return round_report, evaluations, sft


def _write_report(report: DemoReport, evaluations: list, grid_prompts: int, out: Path) -> None:
    """grid.png (held-out prompts down; base, SFT and each DPO round across), report.json and report.md."""
    from diffusion_dpo.evaluation.reports import comparison_grid, grid_rows, markdown_report

    if grid_prompts:
        columns = ["base"] + (["SFT"] if report.sft else []) + [f"DPO round {r.round}" for r in report.rounds]
        scorer = FAMILY_WORLD[report.config["family"]]["scorer"]
        rows = grid_rows([(Path(e.output_dir), e.rows) for e in evaluations], grid_prompts, scorer=scorer)
        report.grid = str(comparison_grid(rows, columns, out / "grid.png"))
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=1) + "\n")
    (out / "report.md").write_text(markdown_report(report))


# demo methods run by recipes/demo_online.py (the offline label -> train loop is run() above)
ONLINE_METHODS = ("grpo", "online_dpo", "nft")


def main(argv: list[str]) -> int:
    from diffusion_dpo.evaluation.reports import demo_sentences

    cfg = parse_args(DemoConfig, argv, prog="diffusion-dpo demo", description=__doc__.split("\n\n")[0])
    if cfg.method in ONLINE_METHODS:
        from diffusion_dpo.recipes import demo_online

        online = demo_online.run_online(cfg)
        print()
        print("\n".join(demo_online.sentences(online)))
        print(f"Everything is in {online['output_dir']}/: report.md, report.json, grid.png.")
        return 0
    report = run(cfg)
    print()
    print("\n".join(demo_sentences(report)))
    print(f"Everything is in {report.output_dir}/: report.md (tables and timings), report.json, grid.png.")
    sys.stdout.flush()
    return 0
