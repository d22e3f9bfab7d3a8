"""Runs killed with SIGKILL at every write of one save, then rerun, end equal to a run never disturbed.

Each killed run is a process of its own, forked from a wrapper process (below) that imported torch and the
recipes once. The forked run patches the file-writing calls the recipes use (torch.save, safetensors'
save_file, parquet's write_table, PIL's Image.save, os.replace, Path.mkdir / write_text / unlink,
shutil.rmtree...) to count the calls on paths under one marker and send itself SIGKILL right before (or
after) the N-th of them; N runs over every write point of one save. Nothing in the
package knows about it. The rerun (resume=auto for train, the same command for label and evaluate) runs in
this process, and its weights, shards or report are compared with an uninterrupted reference run's.
"""

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from diffusion_dpo import checkpointing
from diffusion_dpo.config import load_config
from diffusion_dpo.recipes import evaluate, label, train
from diffusion_dpo.tiny import build_tiny_pipeline, write_tiny_pairs

REPO = Path(__file__).resolve().parent.parent

WRAPPER = '''
import importlib, json, os, pathlib, shutil, signal, sys, traceback
import torch
torch.set_num_threads(1)
import PIL.Image, pyarrow.parquet, safetensors.torch
from diffusion_dpo.config import load_config
for name in ("train", "label", "evaluate"):
    importlib.import_module("diffusion_dpo.recipes." + name)


def hook(owner, name, spec, calls):
    real = getattr(owner, name)

    def patched(*args, **kwargs):
        paths = [os.fspath(a) for a in args[:2] if isinstance(a, os.PathLike)
                 or isinstance(a, str) and a.startswith("/")]
        if not any(spec["marker"] in p for p in paths):
            return real(*args, **kwargs)
        calls.append(name + " " + " ".join(paths))
        n = len(calls)
        if n == spec["kill_at"] and spec["mode"] == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if n == spec["kill_at"] and spec["mode"] == "torn":  # killed halfway through writing the file
            written = next(p for p in paths if os.path.isfile(p))
            os.truncate(written, os.path.getsize(written) // 2)
        if n == spec["kill_at"] and spec["mode"] in ("after", "torn"):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, patched)


def run(spec_file):
    spec = json.loads(pathlib.Path(spec_file).read_text())
    log = os.open(spec["log_file"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    calls, record = [], pathlib.Path.write_text
    for owner, names in ((torch, ["save"]), (safetensors.torch, ["save_file"]), (pyarrow.parquet, ["write_table"]),
                         (PIL.Image.Image, ["save"]), (os, ["replace", "rename"]), (shutil, ["rmtree"]),
                         (pathlib.Path, ["write_text", "write_bytes", "mkdir", "unlink", "rename"])):
        for name in names:
            hook(owner, name, spec, calls)
    recipe = importlib.import_module("diffusion_dpo.recipes." + spec["recipe"])
    recipe.run(load_config(getattr(recipe, spec["config"]), [], spec["overrides"]))
    record(pathlib.Path(spec["calls_file"]), json.dumps(calls))


# One spec file per line of stdin, each run in a child forked from this process (torch and the recipes
# imported once, not once per run); the child's exit code goes back as one line of stdout.
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            run(line.strip())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
'''

CONFIGS = {"train": "TrainConfig", "label": "LabelConfig", "evaluate": "EvaluateConfig"}




@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny pipeline, prompts and pairs every test runs on, and the process that forks each wrapped run."""
    root = tmp_path_factory.mktemp("faults")
    (root / "wrapper.py").write_text(WRAPPER)
    prompts = root / "prompts.txt"
    prompts.write_text("a red dog\na blue cat\na green house\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    with open(root / "wrapper.log", "w") as log:
        wrapper = subprocess.Popen([sys.executable, str(root / "wrapper.py")], cwd=REPO, env=env, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    yield {"root": root, "sd": str(build_tiny_pipeline(root / "sd")), "prompts": str(prompts),
           "pairs": str(write_tiny_pairs(root / "pairs", n_pairs=16)), "wrapper": wrapper}
    wrapper.stdin.close()
    wrapper.wait(timeout=60)


def run_wrapped(world, recipe: str, overrides: list[str], marker: str, kill_at: int = 0,
                mode: str = "before") -> list[str] | None:
    """Run ``recipe`` in a process of its own; kill it at the ``kill_at``-th write under ``marker`` (0: never):
    ``before`` or ``after`` that call, or ``torn``: after it, with the file it wrote cut to half its size
    (a kill in the middle of writing it). Returns the list of writes under ``marker`` of a run that
    finished, None for a killed one."""
    root, wrapper = world["root"], world["wrapper"]
    calls_file, log_file, spec = root / "calls.json", root / "run.log", root / "spec.json"
    calls_file.unlink(missing_ok=True)
    spec.write_text(json.dumps({"recipe": recipe, "config": CONFIGS[recipe], "overrides": overrides,
                                "marker": marker, "kill_at": kill_at, "mode": mode,
                                "calls_file": str(calls_file), "log_file": str(log_file)}))
    wrapper.stdin.write(f"{spec}\n")
    wrapper.stdin.flush()
    ready, _, _ = select.select([wrapper.stdout], [], [], 600)
    answer = wrapper.stdout.readline() if ready else ""
    assert answer, f"the wrapper gave no exit code:\n{(root / 'wrapper.log').read_text()[-3000:]}"
    code, stderr = int(answer), log_file.read_text()
    if kill_at:
        assert code == -signal.SIGKILL, f"not killed at write {kill_at}:\n{stderr[-3000:]}"
        return None
    assert code == 0, stderr[-3000:]
    return json.loads(calls_file.read_text())


def first(calls: list[str], *words: str) -> int:
    """The number (from 1) of the first write whose description holds every word."""
    return next(i for i, c in enumerate(calls, 1) if all(w in c for w in words))


def last(calls: list[str], *words: str) -> int:
    return max(i for i, c in enumerate(calls, 1) if all(w in c for w in words))


FILE_WRITERS = ("save ", "save_file ", "write_table ", "write_text ", "write_bytes ")


def kill_points(calls: list[str], start: int, end: int, torn: bool = True) -> list[tuple[int, str]]:
    """(N, mode) for the writes ``start``..``end``: killed before the first, halfway through each that
    writes a file (``torn``), and after each."""
    points = [(start, "before")]
    for n in range(start, end + 1):
        points += [(n, "torn")] if torn and calls[n - 1].startswith(FILE_WRITERS) else []
        points.append((n, "after"))
    return points


# ----------------------------------------------------------------------------------------------- train

def train_overrides(world, out, *extra):
    return [f"model.pretrained={world['sd']}", f"data.source={world['pairs']}", "data.resolution=32",
            f"output_dir={out}", "optim.learning_rate=1e-3", "optim.scale_lr=false", "optim.warmup_steps=0",
            "optim.batch_size=2", "optim.max_steps=4", "log_every=1", "checkpoint_every=2",
            "data.random_flip=true", *extra]


def train_result(out: Path) -> dict:
    """What must equal between runs: final weights, the checkpoints left and their weights, the metrics
    (but their pairs/s, a timing)."""
    metrics = [{k: v for k, v in json.loads(line).items() if k != "pairs_per_s"}
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    checkpoints = {json.loads((p / "state.json").read_text())["step"]: load_file(p / "trainable.safetensors")
                   for p in checkpointing.complete_checkpoints(out)}
    resumed = summary["resumed_from"] and re.match(r"step-(\d+)", Path(summary["resumed_from"]).name)
    return {"final": load_file(out / "final" / "diffusion_pytorch_model.safetensors"), "metrics": metrics,
            "digests": summary["weight_digests"], "steps": summary["steps"], "checkpoints": checkpoints,
            "resumed_step": int(resumed.group(1)) if resumed else None}


def assert_same_training(got: dict, want: dict, where: str) -> None:
    assert got["digests"] == want["digests"] and got["steps"] == want["steps"], where
    assert got["final"].keys() == want["final"].keys(), where
    assert all(torch.equal(got["final"][k], want["final"][k]) for k in want["final"]), where
    assert got["metrics"] == want["metrics"], where
    # A run killed after publishing step-4 but before pruning step-2 resumes with nothing left to do and
    # saves nothing, so nothing prunes step-2 (train would need to prune on resume): step-2 may stay.
    assert set(got["checkpoints"]) - set(want["checkpoints"]) <= ({2} if got["resumed_step"] == 4 else set()), where
    assert set(want["checkpoints"]) <= set(got["checkpoints"]), where
    for step, weights in want["checkpoints"].items():
        assert all(torch.equal(got["checkpoints"][step][k], weights[k]) for k in weights), (where, step)


@pytest.mark.slow
def test_train_killed_at_every_write_of_a_checkpoint_resumes_exactly(world, tmp_path):
    """4 steps, a checkpoint every 2, keep 1: killed at each write of step-4's save (the files, the
    state.json mark, the rename, pruning step-2), resume=auto gives the weights, metrics and checkpoint of
    the uninterrupted run."""
    ref = tmp_path / "ref"
    calls = run_wrapped(world, "train", train_overrides(world, ref, "checkpoints_keep=1"), "/checkpoints/")
    want = train_result(ref)
    assert list(want["checkpoints"]) == [4]
    # Every file goes into step-4.tmp/, which a rerun never reads: a kill halfway through one leaves what
    # a kill after it leaves, so no torn points here (label and evaluate have them).
    points = kill_points(calls, first(calls, "step-4"), len(calls), torn=False)
    # before; after each of: stale .tmp, folder, 3 files, state.json, rename, step-2's mark and folder
    assert len(points) == 1 + 9, "\n".join(calls)
    published = first(calls, "replace", "step-4.tmp")
    for n, mode in points:
        out = tmp_path / f"killed-{n}-{mode}"
        run_wrapped(world, "train", train_overrides(world, out, "checkpoints_keep=1"), "/checkpoints/", n, mode)
        train.run(load_config(train.TrainConfig, [], train_overrides(world, out, "checkpoints_keep=1",
                                                                      "resume=auto")))
        got, where = train_result(out), f"killed {mode} {calls[n - 1]}"
        assert_same_training(got, want, where)
        # resumed from the newest complete checkpoint there was: never from an earlier one, nor from scratch
        assert got["resumed_step"] == (4 if n > published or (n == published and mode != "before") else 2), where
        shutil.rmtree(out)


@pytest.mark.slow
def test_train_killed_while_resaving_an_existing_step_resumes_exactly(world, tmp_path):
    """A run resumed from step-2 saves step-4 again over an existing step-4 (moved to step-4.old between
    the two renames): killed at each write of that save, resume=auto still ends equal."""
    ref = tmp_path / "ref"
    train.run(load_config(train.TrainConfig, [], train_overrides(world, ref, "checkpoints_keep=2")))
    want = train_result(ref)
    assert list(want["checkpoints"]) == [2, 4]
    resave = [f"resume={ref / 'checkpoints' / 'step-2'}", "checkpoints_keep=2"]
    probe = tmp_path / "probe"
    shutil.copytree(ref, probe)
    calls = run_wrapped(world, "train", train_overrides(world, probe, *resave[1:],
                                                        f"resume={probe / 'checkpoints' / 'step-2'}"),
                        "/checkpoints/")
    assert any("step-4.old" in c for c in calls)
    assert_same_training(train_result(probe), want, "re-saved without a kill")
    # From the state.json mark on (the files before it are as in the test above): the swap through .old.
    points = kill_points(calls, first(calls, "write_text", "step-4.tmp"), len(calls), torn=False)
    assert len(points) == 1 + 7, "\n".join(calls)  # mark, stale .old's mark and folder, 2 renames, .old
    for n, mode in points:
        out = tmp_path / f"killed-{n}-{mode}"
        shutil.copytree(ref, out)
        run_wrapped(world, "train", train_overrides(world, out, *resave[1:],
                                                    f"resume={out / 'checkpoints' / 'step-2'}"),
                    "/checkpoints/", n, mode)
        train.run(load_config(train.TrainConfig, [], train_overrides(world, out, *resave[1:], "resume=auto")))
        got, where = train_result(out), f"killed {mode} {calls[n - 1]}"
        assert_same_training(got, want, where)
        assert got["resumed_step"] == 4, where  # a complete step-4 existed at every instant
        shutil.rmtree(out)


# ----------------------------------------------------------------------------------------------- label

def label_overrides(world, out):
    return [f"model.pretrained={world['sd']}", f"prompts={world['prompts']}", "scorer.name=jpeg_compressibility",
            "candidates_per_prompt=3", "sampling.num_inference_steps=1", "prompts_per_shard=1", "batch_size=3",
            f"output_dir={out}"]


def label_result(out: Path) -> dict:
    """Every shard's bytes of rows (images, scores, labels...) and the summary but for this run's own
    counts and timings."""
    shards = {p.name: pq.read_table(p).to_pylist() for p in sorted(out.glob("*.parquet"))}
    summary = json.loads((out / "summary.json").read_text().replace(str(out), "OUT"))
    manifest = json.loads((out / "manifest.json").read_text())
    leftovers = sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))
    return {"shards": shards, "summary": {k: v for k, v in summary.items() if k != "this_run"},
            "manifest": manifest, "leftovers": leftovers}


@pytest.mark.slow
def test_label_killed_at_every_write_of_a_shard_resumes_exactly(world, tmp_path):
    """3 prompts, one shard each: killed at each write of the second shard (its parquet under the .tmp name,
    the rename) and of the final manifest and summary, the same command ends with the same shards (rows,
    image bytes, scores), manifest and summary as an uninterrupted run."""
    ref = tmp_path / "ref"
    calls = run_wrapped(world, "label", label_overrides(world, ref), str(ref))
    want = label_result(ref)
    assert len(want["shards"]) == 3 and want["leftovers"] == []
    shard = kill_points(calls, first(calls, "train-00001.parquet"), last(calls, "train-00001.parquet"))
    # the manifest rebuilt at the end, then summary.json
    points = shard + kill_points(calls, last(calls, "write_bytes", "manifest.json"), len(calls))
    for n, mode in points:
        out = tmp_path / f"killed-{n}-{mode}"
        run_wrapped(world, "label", label_overrides(world, out), str(out), n, mode)
        label.run(load_config(label.LabelConfig, [], label_overrides(world, out)))
        got = label_result(out)
        where = f"killed {mode} {calls[n - 1]}"
        assert got["shards"] == want["shards"] and got["summary"] == want["summary"], where
        assert got["manifest"] == want["manifest"] and got["leftovers"] == [], where
        shutil.rmtree(out)


# -------------------------------------------------------------------------------------------- evaluate

def evaluate_overrides(world, out):
    return [f"model.pretrained={world['sd']}", f"tuned.pretrained={world['sd']}", f"prompts={world['prompts']}",
            "seeds=2", "scorers=jpeg_compressibility", "sampling.num_inference_steps=2", "n_boot=50",
            "grid_cell=32", "batch_size=4", f"output_dir={out}"]


def evaluate_result(out: Path) -> dict:
    images = {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "images").rglob("*")) if p.is_file()}
    return {"images": images, "scores": (out / "scores.jsonl").read_text(),
            "report": (out / "report.json").read_text(), "report_md": (out / "report.md").read_text(),
            "grids": {p.name: p.read_bytes() for p in sorted((out / "grids").iterdir())}}


@pytest.mark.slow
def test_evaluate_killed_at_every_write_of_an_image_and_the_report_resumes_exactly(world, tmp_path):
    """3 prompts x 2 seeds, batches of 4: killed at each write of an image in the middle of a batch (its
    folder, the PNG under the .tmp name, the rename), of the settings a rerun checks (generation.json) and of
    the report, the same command ends with the same image bytes, scores and report as an uninterrupted run
    (the missing image's batch is regenerated whole, so batched kernels round as they did)."""
    ref = tmp_path / "ref"
    calls = run_wrapped(world, "evaluate", evaluate_overrides(world, ref), str(ref))
    want = evaluate_result(ref)
    assert len(want["images"]) == 2 * 6
    image = next(name for name in want["images"] if name.startswith("images/tuned/") and name.endswith("/1-1.png"))
    folder = first(calls, image) - 1  # each image's save makes sure its folder exists first
    assert calls[folder - 1].startswith("mkdir ")
    points = kill_points(calls, folder, last(calls, image))  # before, folder, PNG under .tmp (torn, after), rename
    for name in ("generation.json", "report.json"):  # before, under .tmp (torn, after), rename
        points += kill_points(calls, first(calls, name), last(calls, name))
    assert len(points) == 5 + 4 + 4
    for n, mode in points:
        out = tmp_path / f"killed-{n}-{mode}"
        run_wrapped(world, "evaluate", evaluate_overrides(world, out), str(out), n, mode)
        evaluate.run(load_config(evaluate.EvaluateConfig, [], evaluate_overrides(world, out)))
        assert evaluate_result(out) == want, f"killed {mode} {calls[n - 1]}"
        shutil.rmtree(out)
