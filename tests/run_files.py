"""What the end-to-end tests share: reading a run folder's metrics and weights, and running a command on
two processes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent


def metrics(out) -> list[dict]:
    """The rows of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(path) -> dict:
    """The tensors of the (one) safetensors file in a ``final/`` folder."""
    return load_file(next(Path(path).glob("*.safetensors")))


def same(a, b, atol=0.0) -> bool:
    """Same tensor names, and every tensor equal within ``atol``."""
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


# What a process prints when it aborts in torch's teardown of the gloo group after the run has finished (exit
# -6). Seen in about one full-suite run in two (a PPO run, rank 1, after both ranks had written everything),
# never in 45 runs of the same command alone under load, and not cured by destroying the process group before
# exit (accelerate's end_training destroys it already): a fault of the teardown, not of the run.
TEARDOWN_ABORT = "terminate called without an active exception"


def run_on_two_processes(command: str, args: list[str], timeout: int = 300) -> None:
    """``diffusion-dpo COMMAND ARGS`` under torchrun on two CPU processes (gloo, one thread each); fails the
    test with the end of stderr unless it exits 0, or unless it wrote its summary.json during this run and
    then aborted only in the teardown (TEARDOWN_ABORT); what the tests compare was written before that.
    Python's fault handler prints every thread's stack if a process aborts."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "diffusion_dpo", command, *args]
    started = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    out = next((Path(a.split("=", 1)[1]) for a in args if a.startswith("output_dir=")), None)
    summary = out / "summary.json" if out else None
    finished = summary is not None and summary.is_file() and summary.stat().st_mtime >= started
    if proc.returncode != 0 and finished and TEARDOWN_ABORT in proc.stderr:
        print(f"a process aborted in the teardown after the run finished:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return
    assert proc.returncode == 0, proc.stderr[-3000:]


class CountingFeed:
    """Batches x = [k, 1] (k = position), exactly resumable by position: the engine tests' toy data."""

    def __init__(self):
        self.position = 0

    def batches(self, batch_size):
        while True:
            x = torch.tensor([[float(self.position + i), 1.0] for i in range(batch_size)])
            self.position += batch_size  # before the yield: a checkpoint taken after this batch skips it
            yield x

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]
