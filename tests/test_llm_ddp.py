"""DPO on two CPU processes through ``accelerate launch`` (gloo): both ranks end with identical weights, the
saved model is those weights, and the run equals a one-process run whose batch is both ranks' batches
together.

On CPU, ``accelerate launch --cpu --num_processes 2`` starts a single process (its CPU path spreads over
machines only through mpirun and a hostfile); two local CPU processes are ``ACCELERATE_USE_CPU=1 accelerate
launch --multi_gpu --num_processes 2`` (torchrun underneath, gloo backend).

Run as a script, this file is the worker each rank executes: it trains and writes its summary to
``OUT/rank<i>.json``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.run_files import TEARDOWN_ABORT

ROOT = Path(__file__).resolve().parent.parent


def dpo_overrides(world: dict, out: Path, batch_size: int) -> list[str]:
    return [
        f"model.name_or_path={world['model']}",
        f"data.source={world['pairs']}",
        "data.max_rows=128",
        "data.eval_fraction=0.25",
        "reference.kind=precomputed",
        "loss.beta=0.5",
        "optim.learning_rate=0.005",
        f"optim.batch_size={batch_size}",
        "optim.max_steps=6",
        "log_every=3",
        "tensorboard=false",
        f"output_dir={out}",
    ]


@pytest.mark.slow
def test_two_processes_keep_identical_weights(tmp_path):
    from diffusion_dpo.checkpointing import trainable_state_dict
    from diffusion_dpo.config import load_config
    from diffusion_dpo.engine import weights_digest
    from diffusion_dpo.llm import models, tiny
    from diffusion_dpo.recipes import llm_dpo as dpo

    world = {k: str(v) for k, v in tiny.write_world(tmp_path / "world").items()}
    out = tmp_path / "ddp"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(Path(__file__)),
        json.dumps(world),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    finished = all((out / f"rank{i}.json").is_file() for i in range(2))
    # Both ranks wrote their summaries: an abort in torch's teardown after that (run_files.TEARDOWN_ABORT) is
    # not the run's; any other failure fails here.
    assert proc.returncode == 0 or finished and TEARDOWN_ABORT in proc.stderr, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["process_index"] for r in ranks] == [0, 1] and {r["num_processes"] for r in ranks} == {2}
    assert ranks[0]["weight_digests"] == ranks[1]["weight_digests"]
    assert len(set(ranks[0]["weight_digests"])) == 1  # every process holds the same weights
    saved = models.load_causal_lm(str(out / "final"))
    assert weights_digest(trainable_state_dict(saved)) == ranks[0]["weight_digests"][0]
    # Two ranks of 8 pairs average their gradients: the same steps as one process with 16 pairs per batch.
    torch.set_num_threads(1)
    single = dpo.run(load_config(dpo.DPOConfig, [], dpo_overrides(world, tmp_path / "one", 16)))
    one = models.load_causal_lm(single["final"])
    for (name, a), (_, b) in zip(saved.named_parameters(), one.named_parameters()):
        assert torch.allclose(a, b, atol=1e-4), name  # Adam magnifies float rounding of tiny gradients
    assert ranks[0]["eval"]["eval/loss"] == pytest.approx(single["eval"]["eval/loss"], abs=1e-4)


if __name__ == "__main__":
    from diffusion_dpo.config import load_config
    from diffusion_dpo.recipes import llm_dpo as dpo

    world, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    summary = dpo.run(load_config(dpo.DPOConfig, [], dpo_overrides(world, out, 8)))
    (out / f"rank{summary['process_index']}.json").write_text(json.dumps(summary))
