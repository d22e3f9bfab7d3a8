"""The training engine: the run folder and its rule, the step loop, optimizer construction, checkpoints, a
resumable feed."""

from diffusion_dpo.engine.feed import ExampleFeed, Feed
from diffusion_dpo.engine.optim import build_optimizer, peak_learning_rate
from diffusion_dpo.engine.run_folder import (
    claim_output_dir,
    holds_run,
    parse_resume,
    release_output_dir,
    releases_output_dir,
)
from diffusion_dpo.engine.trainer import (
    DTYPES,
    Engine,
    NonFiniteError,
    StepContext,
    StepOutput,
    resolve_mixed_precision,
    weights_digest,
)

__all__ = ["DTYPES", "Engine", "ExampleFeed", "Feed", "NonFiniteError", "StepContext", "StepOutput",
           "build_optimizer", "claim_output_dir", "holds_run", "parse_resume", "peak_learning_rate",
           "release_output_dir", "releases_output_dir", "resolve_mixed_precision", "weights_digest"]
