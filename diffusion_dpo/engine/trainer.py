"""The training engine every training recipe runs on (diffusion DPO/SFT, LLM SFT/reward/DPO, PPO's updates).

A recipe brings its models, a data feed and a step function; the engine owns everything around the step:

    Engine(cfg, ...)      the run folder (its one rule: engine.run_folder), the accelerator, config.yaml,
                          metrics.jsonl + tensorboard, the resolved mixed precision
    engine.shard(m, blocks) under parallel.strategy=fsdp, the trained model sharded by FSDP2 (before its
                          optimizer is built); keep_frozen: a reference copy sharded or offloaded alike
    engine.fit(...)       the loop: micro-batches with gradient accumulation, clipping, the non-finite guard,
                          optimizer and schedule steps, windowed metrics and the progress bar, checkpoints
                          every N steps, exact resume (weights, optimizer, schedule, RNG, data position)
    engine.optimizer_step the same single step for a recipe that drives its own outer loop (PPO)
    engine.save_final     final/ written to final.tmp and renamed, refused if a weight is not finite
    engine.ema            the EMA of the trained weights (ema.decay > 0, else None): built by prepare, updated
                          after each applied optimizer step, in every checkpoint, optionally in final/
    engine.finish         summary.json and the trackers closed

The step function is ``step_fn(batch, ctx) -> StepOutput``: per-example losses (the engine back-propagates
their mean), metrics (tensors, averaged) and how many units (pairs, tokens) the batch held, for throughput.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from tqdm.auto import tqdm

import diffusion_dpo.engine.sharding as sharding
from diffusion_dpo import checkpointing
from diffusion_dpo.config import ConfigError, flat_scalars, save_config, to_dict, validate
from diffusion_dpo.engine.ema import EMA
from diffusion_dpo.engine.feed import Feed, data_position
from diffusion_dpo.engine.resume_settings import RESUME_LOG, check_resume_settings
from diffusion_dpo.engine.run_folder import claim_output_dir, parse_resume, release_output_dir
from diffusion_dpo.errors import InputError, RunError
from diffusion_dpo.fileio import atomic_write_text
from diffusion_dpo.reference import FrozenCopy
from diffusion_dpo.run_options import TrainingRunOptions

Tensor = torch.Tensor
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What a training run writes into output_dir; overwrite=true removes these (and config.yaml).
RUN_FILES = ("metrics.jsonl", "logs", "checkpoints", "final", "final.tmp", "summary.json", RESUME_LOG)
# The files by which a folder written before run.json existed is recognised as a training run's.
TRAINING_MARKS = ("metrics.jsonl", "logs", "checkpoints", "final", "final.tmp")


class NonFiniteError(RunError):
    """max_nonfinite_steps optimizer steps in a row had a NaN/inf loss or gradient."""


@dataclass
class StepContext:
    step: int  # optimizer steps completed before this one
    micro: int  # index of the micro-batch within the step
    rank: int


@dataclass
class StepOutput:
    losses: Tensor  # per example (or a scalar); the engine back-propagates the mean
    metrics: dict[str, Tensor] = field(default_factory=dict)  # averaged into the logged window
    units: int = 0  # pairs / tokens in this micro-batch, for <unit>_per_s


def resolve_mixed_precision(value: str) -> str:
    """auto -> bf16 on a CUDA GPU, no (fp32) otherwise; fp16 needs a GPU (its loss scaling is CUDA's)."""
    if value == "fp16" and not torch.cuda.is_available():
        raise ConfigError("config key 'mixed_precision': expected fp16 only on a CUDA GPU (use no or bf16 on "
                          "CPU), got 'fp16'")
    return ("bf16" if torch.cuda.is_available() else "no") if value == "auto" else value


def weights_digest(state: dict[str, Tensor]) -> str:
    """SHA-256 of the weights' bytes in name order (identical weights on every process -> identical digests)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _first_nonfinite(values: dict[str, Tensor]) -> Optional[str]:
    return next((name for name, v in values.items() if not torch.isfinite(v.detach().float()).all()), None)


class Engine:
    """One training run. ``cfg`` is the recipe's config (a :class:`TrainingRunOptions`); ``seed`` seeds every
    generator before the recipe builds its models; ``unit`` names the throughput figure (pairs, tokens);
    ``run_files``: what the recipe writes into output_dir besides RUN_FILES (removed too by overwrite=true);
    ``name`` names the tensorboard run, ``desc`` the progress bar (default: name); ``owner`` the command
    that owns the folder (default: name; engine.run_folder)."""

    def __init__(self, cfg: TrainingRunOptions, *, seed: int, gradient_accumulation_steps: int = 1,
                 unit: str = "examples", name: str = "train", before_write: Callable[[], None] = lambda: None,
                 run_files: tuple[str, ...] = (), desc: str | None = None, owner: str | None = None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        validate(cfg)
        before_write()  # the recipe's input checks: nothing is created if they fail
        mixed = resolve_mixed_precision(cfg.mixed_precision)
        sharding.check_parallel(cfg.parallel, mixed)
        self.cfg = dataclasses.replace(cfg, mixed_precision=mixed)
        self.sharded = cfg.parallel.strategy == "fsdp"
        self.shard_bytes: list[tuple[int, int]] = []  # (held, whole) per process, once shard() ran
        self.out = Path(cfg.output_dir)
        self.unit, self.name, self.desc = unit, name, desc or name  # desc: the progress bar's label
        self.grad_accum = gradient_accumulation_steps
        # cpu=True on a machine without CUDA lets processes started by torchrun form a gloo group.
        self.accelerator = Accelerator(
            mixed_precision=mixed, gradient_accumulation_steps=gradient_accumulation_steps,
            cpu=not torch.cuda.is_available(), log_with="tensorboard" if cfg.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")))
        acc = self.accelerator
        if self.sharded:
            sharding.ensure_process_group()
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device
        self.is_main = acc.is_main_process
        self.compute_dtype = DTYPES[mixed]
        if self.is_main:
            self._claim(owner or name, run_files)
        acc.wait_for_everyone()
        mode = parse_resume(cfg.resume)
        # The main process set aside any damaged newer checkpoint: the newest complete one is the intact one.
        self.resume_from = checkpointing.latest_checkpoint(self.out) if mode == "auto" else (
            Path(mode) if mode else None)
        set_seed(seed)
        self.metrics_path = self.out / "metrics.jsonl"
        self.step = 0
        self.nonfinite_steps = 0  # skipped steps, over the whole run
        self._nonfinite_in_a_row = 0
        self.last: dict[str, float] = {}
        self.start = time.perf_counter()
        self.ema: Optional[EMA] = None  # built by prepare from the trained module
        if cfg.tensorboard:
            acc.init_trackers(name, config=flat_scalars(to_dict(self.cfg)))

    # ------------------------------------------------------------------------------------------ set-up

    def _claim(self, owner: str, run_files: tuple[str, ...]) -> None:
        """Main process: the folder's lock and rule, the checkpoint to resume from (intact, with settings
        that keep its steps' meaning), then config.yaml. A refusal releases the lock."""
        claim_output_dir(self.out, owner=owner, resume=self.cfg.resume, overwrite=self.cfg.overwrite,
                         run_files=RUN_FILES + run_files, marks=TRAINING_MARKS)
        try:
            mode = parse_resume(self.cfg.resume)
            checkpoint = checkpointing.latest_intact_checkpoint(self.out) if mode == "auto" else (
                Path(mode) if mode else None)
            given = mode not in (None, "auto") and (checkpoint / checkpointing.STATE_FILE).is_file()
            problem = checkpointing.checkpoint_problem(checkpoint) if given else None
            if problem:
                raise InputError(f"config key 'resume': checkpoint {checkpoint} is damaged: {problem}; resume "
                                 f"from another step in {checkpoint.parent}")
            if checkpoint is not None:
                check_resume_settings(self.cfg, self.out, checkpoint, self.world)
            save_config(self.cfg, self.out / "config.yaml")
        except BaseException:
            release_output_dir(self.out)
            raise

    def shard(self, module: torch.nn.Module, blocks: list[torch.nn.Module]) -> torch.nn.Module:
        """Under parallel.strategy=fsdp: ``module`` sharded over the processes, one FSDP unit per block of
        ``blocks`` (the family's, or the LM's decoder layers) and one for the rest; its parameters become
        DTensors, so call this before building the optimizer. Under ddp: ``module`` as it is."""
        from accelerate.utils import gather_object

        if not self.sharded:
            return module
        module = sharding.shard_model(module, blocks, self.compute_dtype, self.cfg.parallel.cpu_offload)
        # What each process holds of the trained weights, measured from its DTensor shards (summary.json).
        self.shard_bytes = gather_object([sharding.local_shard_bytes(module)])
        return module

    def keep_frozen(self, module: torch.nn.Module, blocks: list[torch.nn.Module]) -> FrozenCopy:
        """A frozen full copy (a reference model) kept as parallel.frozen says under fsdp: ``shard``: sharded
        over the processes by ``blocks`` like the trained model; ``offload``: in CPU memory, on the device only
        for its forward. Under ddp: whole, where it is."""
        if not self.sharded:
            return FrozenCopy(module)
        if self.cfg.parallel.frozen == "offload":
            return FrozenCopy(module, offload_to=self.device)
        return FrozenCopy(sharding.shard_model(module.requires_grad_(False), blocks, self.compute_dtype))

    def prepare(self, *modules):
        """accelerate's prepare (DDP wrapping, device placement of optimizers); a sharded module is already
        distributed and passes through unwrapped. The first module given is the trained one: with ema.decay > 0
        its EMA starts here, from its weights as they are now (sharded like them under fsdp)."""
        if not self.sharded:
            prepared = self.accelerator.prepare(*modules)
        else:
            prepared = [m if isinstance(m, torch.nn.Module) else self.accelerator.prepare(m) for m in modules]
            prepared = prepared[0] if len(prepared) == 1 else tuple(prepared)
        # ---- EMA (engine.ema): every training recipe passes its trained module through here
        trained = next((m for m in modules if isinstance(m, torch.nn.Module)), None)
        if self.cfg.ema.decay > 0 and trained is not None:
            self.ema = EMA(trained, self.cfg.ema)
        # ---- end EMA
        return prepared

    def resume(self, policy: torch.nn.Module, optimizer, scheduler, feed: Feed | None = None,
               extra: Callable[[dict], None] | None = None) -> int:
        """Restore the checkpoint this run continues from, if any; return the step it reached. ``extra``
        receives the recipe's own saved state (see :meth:`save_checkpoint`)."""
        if self.resume_from is not None:
            state = checkpointing.load_checkpoint(self.resume_from, self.rank, self.world)
            ema_restored = False
            if state["strategy"] == "fsdp":  # model and optimizer shards, resharded onto this run's processes
                ema_restored = checkpointing.load_sharded(self.resume_from, policy,
                                                          sharding.unwrapped_optimizer(optimizer), self.ema)
            elif self.sharded:
                raise InputError(f"resume: checkpoint {self.resume_from} was written with parallel.strategy=ddp;"
                                 " resume it with parallel.strategy=ddp (a sharded run writes checkpoints "
                                 "either strategy resumes)")
            else:
                checkpointing.load_trainable_state_dict(policy, state["trainable"], str(self.resume_from))
                optimizer.load_state_dict(state["training_state"]["optimizer"])
            training = state["training_state"]
            scheduler.load_state_dict(training["lr_scheduler"])
            if self.accelerator.scaler is not None and training.get("scaler"):
                self.accelerator.scaler.load_state_dict(training["scaler"])
            self.nonfinite_steps = int(training.get("nonfinite_steps", 0))
            checkpointing.restore_rng_state(state["rank_state"]["rng"])
            if feed is not None:
                feed.load_state_dict(data_position(feed, state, self.world))
            if extra is not None:
                extra(state["rank_state"].get("recipe", {}))
            self.step = state["step"]
            if not ema_restored:  # a data-parallel checkpoint's EMA file, or none
                self._resume_ema(state.get("ema"))
        if self.is_main:  # a resumed run re-logs the steps after its checkpoint; a fresh one starts empty
            kept = [line for line in (self.metrics_path.read_text().splitlines()
                                      if self.metrics_path.exists() and self.step else [])
                    if json.loads(line)["step"] <= self.step]
            # Atomic: a kill while trimming must not lose the rows up to the checkpoint.
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))
            # A run killed after publishing a checkpoint but before pruning left one too many.
            checkpointing.prune_checkpoints(self.out, self.cfg.checkpoints_keep)
        return self.step

    def _resume_ema(self, saved: Optional[dict[str, Tensor]]) -> None:
        """The EMA from the checkpoint; one written without EMA starts the EMA from the restored weights."""
        if self.ema is None:
            return
        if saved is None:
            self.ema.reset()
            if self.is_main:
                print(f"resume: checkpoint {self.resume_from} holds no EMA (its run had ema.decay = 0 or predates "
                      f"it); the EMA starts from its weights at step {self.step}", flush=True)
            return
        self.ema.load_state_dict(saved, str(self.resume_from / checkpointing.EMA_FILE))

    # -------------------------------------------------------------------------------------------- step

    def optimizer_step(self, model, params: list[torch.nn.Parameter], optimizer, scheduler,
                       micro_batches: Iterator[Any], step_fn: Callable[[Any, StepContext], StepOutput],
                       max_grad_norm: float) -> Optional[dict[str, Tensor]]:
        """One optimizer step over ``grad_accum`` micro-batches: backward of each mean loss, clipping, the
        update and the schedule step. Returns the step's metrics (micro-batch means, grad_norm, units), or
        None when a loss, metric or gradient was not finite on any process: then nothing is updated, the step
        is counted, and the ``max_nonfinite_steps``-th such step in a row raises NonFiniteError."""
        acc = self.accelerator
        sums: dict[str, Tensor] = {}
        units, bad = 0, None
        for micro in range(self.grad_accum):
            batch = next(micro_batches)
            if self.sharded:  # reduce-scatter the gradients once, after the last micro-batch
                model.set_requires_gradient_sync(micro == self.grad_accum - 1)
            with acc.accumulate(model):
                with acc.autocast():
                    out = step_fn(batch, StepContext(self.step, micro, self.rank))
                loss = out.losses.float().mean()
                bad = bad or _first_nonfinite({"loss": loss, **out.metrics})
                acc.backward(loss)  # accelerate divides by the accumulation steps
            for k, v in {"loss": loss, **out.metrics}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float().mean() / self.grad_accum
            units += out.units
        if self.sharded:  # the optimizer's shards (``params`` taken while a unit was gathered would miss its grads)
            grad_norm = sharding.clip_grad_norm([p for g in optimizer.param_groups for p in g["params"]],
                                                max_grad_norm or math.inf)
        else:
            grad_norm = acc.clip_grad_norm_(params, max_grad_norm or math.inf)
        bad = bad or _first_nonfinite({"grad_norm": grad_norm})
        # Every process must skip together: a NaN on one rank reaches all ranks' gradients through the
        # all-reduce, but a NaN metric stays local, so the verdict is reduced.
        flag = torch.tensor([0.0 if bad is None else 1.0], device=self.device)
        if self.world > 1:
            flag = acc.reduce(flag, reduction="sum")
        if flag.item() > 0:
            optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.nonfinite_steps += 1
            self._nonfinite_in_a_row += 1
            if self._nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
                raise NonFiniteError(
                    f"step {self.step}: {bad or 'a value on another process'} is not finite for "
                    f"{self._nonfinite_in_a_row} steps in a row (max_nonfinite_steps={self.cfg.max_nonfinite_steps}"
                    f"); no update was applied for them, and the last checkpoint holds the last good weights. "
                    "Lower the learning rate or check the data.")
            return None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._nonfinite_in_a_row = 0
        if self.ema is not None:  # after an applied update only: a skipped step leaves the average too
            self.ema.update(self.step)
        return sums | {"grad_norm": grad_norm.detach().float(), "units": torch.tensor(float(units))}

    # -------------------------------------------------------------------------------------------- loop

    def fit(self, *, model, policy: torch.nn.Module, optimizer, scheduler, feed: Feed, batch_size: int,
            step_fn: Callable[[Any, StepContext], StepOutput], max_steps: int, max_grad_norm: float,
            evaluate: Callable[[int], dict[str, float]] | None = None, eval_every: int | None = None,
            postfix: Callable[[dict[str, float]], dict[str, str]] | None = None) -> dict[str, float]:
        """Train ``model`` (prepared; ``policy`` is the unwrapped module whose trainable weights are saved)
        to ``max_steps`` optimizer steps from where :meth:`resume` left it. Logs every ``log_every`` steps,
        checkpoints every ``checkpoint_every``, evaluates every ``eval_every`` steps and at the end. Returns the
        last logged metrics."""
        cfg = self.cfg
        params = [p for p in model.parameters() if p.requires_grad]
        batches = feed.batches(batch_size)
        bar = tqdm(total=max_steps, initial=self.step, desc=self.desc, unit="step", disable=not self.is_main,
                   dynamic_ncols=True)
        window: dict[str, Tensor] = {}
        window_steps, window_start = 0, time.perf_counter()
        try:
            while self.step < max_steps:
                metrics = self.optimizer_step(model, params, optimizer, scheduler, batches, step_fn, max_grad_norm)
                bar.update(1)
                if metrics is not None:
                    window = {k: window.get(k, 0.0) + v.to(self.device) for k, v in metrics.items()}
                    window_steps += 1
                if (self.step % cfg.log_every == 0 or self.step == max_steps) and window_steps:
                    self.last = self._log_window(window, window_steps, time.perf_counter() - window_start,
                                                 scheduler)
                    bar.set_postfix((postfix or self._postfix)(self.last))
                    window, window_steps, window_start = {}, 0, time.perf_counter()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    save_start = time.perf_counter()
                    self.save_checkpoint(policy, optimizer, scheduler, feed)
                    window_start += time.perf_counter() - save_start  # throughput measures training only
                if evaluate is not None and eval_every and self.step % eval_every == 0 and self.step < max_steps:
                    self.log(evaluate(self.step))
        finally:
            bar.close()
            if hasattr(batches, "close"):
                batches.close()
        if evaluate is not None:
            self.log(evaluate(self.step))
        return self.last

    def _log_window(self, window: dict[str, Tensor], steps: int, elapsed: float, scheduler) -> dict[str, float]:
        names = sorted(window)
        means = self.accelerator.reduce(torch.stack([window[k] for k in names]), reduction="mean")
        row = {k: float(v) / steps for k, v in zip(names, means.tolist())}
        units = row.pop("units") * steps * self.world
        row |= {"lr": scheduler.get_last_lr()[0], f"{self.unit}_per_s": units / max(elapsed, 1e-9),
                "nonfinite_steps": self.nonfinite_steps}
        self.log(row)
        return {"step": self.step} | row

    def _postfix(self, last: dict[str, float]) -> dict[str, str]:
        shown = {"loss": f"{last['loss']:.4f}"}
        for name in ("implicit_acc", "rewards/accuracies", "accuracy"):
            if name in last:
                shown["acc"] = f"{last[name]:.2f}"
        shown[f"{self.unit}/s"] = f"{last[f'{self.unit}_per_s']:.1f}"
        return shown

    def log(self, values: dict[str, float], step: int | None = None) -> None:
        """One metrics.jsonl row (and tensorboard scalars) at ``step`` (default: the current step)."""
        if not values:
            return
        step = self.step if step is None else step
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.cfg.tensorboard:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)

    # ------------------------------------------------------------------------------------------ saving

    def _check_finite(self, state: dict[str, Tensor], what: str) -> None:
        name = _first_nonfinite(state)
        if name is not None:
            raise NonFiniteError(f"step {self.step}: weight {name} is not finite; {what} was not written "
                                 f"(the last checkpoint in {self.out / 'checkpoints'} holds good weights)")

    def _check_finite_everywhere(self, state: dict[str, Tensor], what: str) -> None:
        """Every process checks its own ``state`` (its shards); if any is not finite, all raise."""
        name = _first_nonfinite({k: sharding.local(v) for k, v in state.items()})
        flag = torch.tensor([0.0 if name is None else 1.0], device=self.device)
        if self.accelerator.reduce(flag, reduction="sum").item() > 0:
            raise NonFiniteError(f"step {self.step}: weight {name or 'a shard on another process'} is not "
                                 f"finite; {what} was not written (the last checkpoint in "
                                 f"{self.out / 'checkpoints'} holds good weights)")

    def save_checkpoint(self, policy: torch.nn.Module, optimizer, scheduler, feed: Feed | None = None,
                        recipe_state: dict[str, Any] | None = None) -> Path:
        """checkpoints/step-N: trainable weights, optimizer, schedule, scaler and counters (main process), RNG
        and data position (every process); ``recipe_state``: anything else the recipe must restore."""
        what = f"checkpoint step-{self.step}"
        if self.sharded:  # every process checks its shards; all refuse together
            self._check_finite_everywhere(checkpointing.trainable_state_dict(policy), what)
            trainable, sharded = None, functools.partial(checkpointing.save_sharded, policy=policy,
                                                         optimizer=sharding.unwrapped_optimizer(optimizer),
                                                         ema=self.ema)
            ema = None  # in the shards
        else:
            trainable = checkpointing.trainable_state_dict(policy) if self.is_main else None
            if trainable is not None:
                self._check_finite(trainable, what)
            sharded = None
            ema = self.ema.state_dict() if self.ema is not None and self.is_main else None
            if ema is not None:
                self._check_finite(ema, f"{what} (its EMA)")
        scaler = self.accelerator.scaler
        training_state = {"lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                          "nonfinite_steps": self.nonfinite_steps}
        if not self.sharded:
            training_state["optimizer"] = optimizer.state_dict()
        return checkpointing.save_checkpoint(
            self.out, self.step, rank=self.rank, world_size=self.world,
            barrier=self.accelerator.wait_for_everyone, keep=self.cfg.checkpoints_keep, trainable=trainable,
            training_state=training_state if self.is_main else None, sharded=sharded,
            rank_state={"rng": checkpointing.capture_rng_state(),
                        "data": feed.state_dict() if feed is not None else {}, "recipe": recipe_state or {}},
            ema=ema)

    def save_final(self, policy: torch.nn.Module, write: Callable[[Path], None]) -> Path:
        """final/ written by ``write(folder)`` into final.tmp, then renamed (main process; all wait). With
        ema.final the EMA weights stand in the module meanwhile, so ``write`` saves them."""
        with self.ema.swapped_in() if self.ema is not None and self.cfg.ema.final else contextlib.nullcontext():
            return self._save_final(policy, write)

    def _save_final(self, policy: torch.nn.Module, write: Callable[[Path], None]) -> Path:
        final = self.out / "final"
        with (sharding.gathered(policy) if self.sharded else contextlib.nullcontext(policy)) as whole:
            if self.is_main:  # under fsdp: the whole weights, gathered once onto the main process's CPU
                self._check_finite(checkpointing.trainable_state_dict(whole), "final/")
                tmp = final.with_name("final.tmp")
                _remove(tmp)
                write(tmp)
                _remove(final)
                tmp.rename(final)
        self.accelerator.wait_for_everyone()
        return final

    def digests(self, policy: torch.nn.Module) -> list[str]:
        """Every process's weight digest (data parallelism keeps them identical)."""
        from accelerate.utils import gather_object

        if self.sharded:  # the shards differ; the gathered weights are what every process holds together
            return gather_object([weights_digest(sharding.full_state_dict(policy))])
        return gather_object([weights_digest(checkpointing.trainable_state_dict(policy))])

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json (main process), close the trackers; return the summary with this process's rank."""
        summary = {"output_dir": str(self.out), "steps": self.step, "nonfinite_steps": self.nonfinite_steps,
                   "resumed_from": str(self.resume_from) if self.resume_from else None,
                   "num_processes": self.world, "wall_s": time.perf_counter() - self.start} | summary
        if self.sharded and self.shard_bytes:
            summary["trained_bytes"] = self.shard_bytes[0][1]
            summary["trained_bytes_held"] = [held for held, _ in self.shard_bytes]  # per process
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if self.is_main:
            release_output_dir(self.out)
        return summary | {"process_index": self.rank}


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

