"""The report schema: what an evaluation (``report.json`` of ``diffusion-dpo evaluate``) and the demo
(``report.json`` of ``diffusion-dpo demo``) report, as dataclasses. ``to_json()`` gives the JSON object
written to disk; recipes return these objects, so callers read numbers from them, never from the files.

Scores are in a scorer's display units (raw score x ``display_scale``, e.g. x100 for HPS); win rates are
shares in [0, 1]; every interval is a 95% percentile bootstrap interval ``[low, high]`` over prompts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, TypedDict


class ScoreRow(TypedDict):
    """One image's score by one scorer: a line of ``scores.jsonl``."""

    style: str
    index: int  # the prompt's position within its style
    prompt: str
    seed: int
    model: str  # "base" or "tuned"
    scorer: str
    score: float  # raw, not scaled by display_scale
    image: str  # path of the image relative to the evaluation's output_dir


@dataclass
class Comparison:
    """Tuned vs base on a set of (prompt, seed) items, both models with the same seeds."""

    n_prompts: int
    n_seeds: int
    n_images: int  # (prompt, seed) items, i.e. images per model
    base_mean: float
    base_mean_ci: list[float]
    base_median: float
    base_median_ci: list[float]
    tuned_mean: float
    tuned_mean_ci: list[float]
    tuned_median: float
    tuned_median_ci: list[float]
    win_rate: float  # share of items where tuned scores higher, ties half
    win_rate_ci: list[float]


@dataclass
class ScorerComparison(Comparison):
    """A scorer's comparison over every item, and per style."""

    display_scale: float = 1.0
    styles: dict[str, Comparison] = field(default_factory=dict)


@dataclass
class ImplicitRewardAccuracy:
    """How often the tuned model's DPO implicit reward ranks the labelled winner of a held-out pair higher."""

    source: str
    split: str
    n_pairs: int
    n_ties_skipped: int
    n_bad_skipped: int
    first_bad: Optional[str]
    accuracy: float  # ties of the implicit reward count half
    accuracy_ci: list[float]
    mean_reward_margin: float  # mean of reward_w - reward_l
    beta_dpo: float
    noise_draws: int
    resolution: int  # px


@dataclass
class EvaluationReport:
    """``report.json`` of ``diffusion-dpo evaluate``."""

    styles: list[str]
    n_prompts: int
    n_seeds: int
    scorers: dict[str, ScorerComparison]
    models: dict[str, str] = field(default_factory=dict)  # base, tuned: what each model is
    prompts: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)
    seeds: dict[str, Any] = field(default_factory=dict)  # the first seed and the rule deriving the others
    implicit_reward: Optional[ImplicitRewardAccuracy] = None
    # scorer -> its benchmark table (diffusion_dpo.evaluation.benchmarks): GenEval per task and overall, OCR
    benchmarks: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.implicit_reward is None:
            del out["implicit_reward"]
        if not self.benchmarks:
            del out["benchmarks"]
        return out


@dataclass
class TunedVsBase:
    """One tuned model against the base on the demo's held-out prompts, by its one scorer."""

    win_rate: float
    win_rate_ci: list[float]
    base_mean: float
    base_mean_ci: list[float]
    tuned_mean: float
    tuned_mean_ci: list[float]
    n_prompts: int
    n_images: int
    eval_dir: str  # the evaluation's output_dir

    @classmethod
    def of(cls, c: Comparison, eval_dir: str) -> TunedVsBase:
        return cls(win_rate=c.win_rate, win_rate_ci=c.win_rate_ci, base_mean=c.base_mean,
                   base_mean_ci=c.base_mean_ci, tuned_mean=c.tuned_mean, tuned_mean_ci=c.tuned_mean_ci,
                   n_prompts=c.n_prompts, n_images=c.n_images, eval_dir=eval_dir)


@dataclass
class RoundReport:
    """One label -> train -> evaluate round of the demo."""

    round: int
    policy: str  # the pipeline folder this round produced
    pairs: int
    mean_winner_score: Optional[float]
    mean_loser_score: Optional[float]
    train_metrics: dict[str, float]  # the DPO run's last logged metrics (loss, implicit_acc, ...)
    dpo: TunedVsBase
    images_generated: int = 0  # candidates labelled this round (training prompts x candidates per prompt)
    # the shapes world as an offline GenEval on the same images (evaluation.benchmarks' table)
    geneval: Optional[dict[str, Any]] = None
    # videos: evaluate's frame_consistency (how alike adjacent frames are), {"base": mean, "tuned": mean}
    frame_consistency: Optional[dict[str, float]] = None


@dataclass
class DemoReport:
    """``report.json`` of ``diffusion-dpo demo``. The top-level ``win_rate`` (with ``win_rate_ci``,
    ``base_mean``, ``tuned_mean``) is round 1's Diffusion-DPO over the base; ``dpo_win_rate`` and
    ``dpo_win_rate_ci`` repeat it under their earlier names."""

    method: str  # "offline_dpo": pairs labelled once per round, then trained on
    base: str
    output_dir: str
    config: dict[str, Any]
    train_prompts: int
    held_out_prompts: int
    rounds: list[RoundReport]
    sft: Optional[TunedVsBase]
    seconds: dict[str, float]  # wall time per stage
    report: str  # report.md
    grid: Optional[str]  # grid.png (null when grid_prompts=0)
    cpu_seconds: Optional[float] = None  # the process's CPU time (all threads), label to last evaluation
    win_rate: float = field(init=False)
    images_generated: int = field(init=False)  # candidates labelled over all rounds
    win_rate_ci: list[float] = field(init=False)
    base_mean: float = field(init=False)
    tuned_mean: float = field(init=False)
    dpo_win_rate: float = field(init=False)
    dpo_win_rate_ci: list[float] = field(init=False)
    frame_consistency: Optional[dict[str, float]] = field(init=False)  # videos: round 1's (RoundReport)

    def __post_init__(self) -> None:
        self.frame_consistency = self.rounds[0].frame_consistency
        first = self.rounds[0].dpo
        self.win_rate, self.win_rate_ci = first.win_rate, first.win_rate_ci
        self.base_mean, self.tuned_mean = first.base_mean, first.tuned_mean
        self.dpo_win_rate, self.dpo_win_rate_ci = first.win_rate, first.win_rate_ci
        self.images_generated = sum(r.images_generated for r in self.rounds)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
