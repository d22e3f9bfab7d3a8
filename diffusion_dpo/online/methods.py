"""The online methods of ``diffusion-dpo grpo`` as objects: what each samples with, which rows its update
trains on and their loss, and what it keeps between steps. A new method is a new class here, registered in
METHODS; the recipe never branches on the method's name.

    grpo        the clipped importance-ratio loss per recorded transition ([Flow-GRPO] eq. 6, DDPO)
    online_dpo  Diffusion-DPO on each group's best vs worst final latents (objectives.dpo_objective)
    nft         DiffusionNFT on the forward process of the sampled images (online.nft), sampled by a
                trailing "old" policy with the deterministic sampler

Each method is built once per run from the run's config and its ``built`` models (the recipe's set-up:
``comps``, ``policy`` (unwrapped), ``reference``, ``noise``, ``latent_shape``, ``is_lora``), and asked, each
sampling step:

    before_sampling(step)          (online_dpo: refresh the reference)
    sampling_weights()             a context in which the policy holds the weights to sample with
    update(model, samples, step, rank) -> (rows, step_fn)   the step's row count and loss on rows ``index``
    after_update(step)             (nft: the old policy trails the current one)
    state_dict() / load_state_dict(state)                   what a checkpoint must keep
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from diffusion_dpo.denoising import PairInputs, draw_pair_noise
from diffusion_dpo.engine import StepOutput
from diffusion_dpo.engine.ema import ShadowWeights
from diffusion_dpo.engine.sharding import copy_into, resharded, whole_tensors
from diffusion_dpo.errors import InputError
from diffusion_dpo.objectives import dpo_objective
from diffusion_dpo.online.nft import nft_loss, old_policy_decay, optimality, velocity_kl
from diffusion_dpo.online.objective import grpo_transition_loss, policy_metrics, transition_kl
from diffusion_dpo.online.rollout import guided_predict
from diffusion_dpo.online.samples import CHOICE, FORWARD_NOISE, PAIRS, Samples, stream_seeds
from diffusion_dpo.online.step_choice import choose_steps, row_weights
from diffusion_dpo.online.trajectory import gather_steps, transition_logprob
from diffusion_dpo.reference import SecondAdapter
from diffusion_dpo.run_options import PreferenceLossSection

Tensor = torch.Tensor
StepFn = Callable[[Tensor], StepOutput]


class OnlineMethod(ABC):
    name = ""
    stochastic_sampling = True  # sample with noise and log-probs (False: the deterministic sampler)

    def __init__(self, cfg, built):
        self.cfg, self.built = cfg, built

    def before_sampling(self, step: int) -> None:
        pass

    def sampling_weights(self):
        return contextlib.nullcontext(self.built.policy)

    @abstractmethod
    def update(self, model, samples: Samples, step: int, rank: int) -> tuple[int, StepFn]:
        """This step's number of rows and the loss of rows ``index`` (long [M]) under ``model``."""

    def after_update(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ------------------------------------------------------------------------------------------------ GRPO

def grpo_rows(cfg, samples: Samples, step: int, rank: int) -> dict[str, Tensor]:
    """The K chosen transitions of every image as flat rows [N * K]: latents, next latents, old log-probs,
    step index, image index, advantage, loss weight."""
    n = samples.trajectory.logprobs.shape[0]
    seed = stream_seeds(cfg.optim.seed, step, rank, CHOICE, 1)[0]
    # the stochastic steps among the trainable first ones: all of them, or this step's window
    candidates = torch.nonzero(samples.schedule.step_stds()[:cfg.eligible_steps()] > 0).flatten()
    k = cfg.num_train_steps()
    if len(candidates) < k:
        raise InputError(f"online.train_steps = {k} but only {len(candidates)} of the first "
                         f"{cfg.eligible_steps()} steps inject noise (the others have no log-probability)")
    steps = candidates[choose_steps(n, len(candidates), k, seed, first=cfg.online.first_steps)]
    latents, next_latents, old = gather_steps(samples.trajectory, steps)
    image = torch.arange(n).repeat_interleave(steps.shape[1])
    advantages = samples.advantages[image.to(samples.advantages.device)]
    return {"latents": latents, "next_latents": next_latents, "old_logprobs": old,
            "step_index": steps.flatten(), "image": image, "advantages": advantages,
            "weights": row_weights(advantages, drop_zero=cfg.online.drop_zero_advantage)}


class GRPO(OnlineMethod):
    name = "grpo"

    def update(self, model, samples, step, rank):
        rows = grpo_rows(self.cfg, samples, step, rank)
        return len(rows["image"]), lambda index: self.loss(model, samples, rows, index)

    def loss(self, model, samples: Samples, rows: dict[str, Tensor], index: Tensor) -> StepOutput:
        """The clipped ratio loss plus kl_coef x KL of the transitions ``index`` (long [M]) of ``rows``."""
        cfg, built = self.cfg, self.built
        family, schedule, o = built.comps.family, samples.schedule, cfg.online
        reduction = cfg.sampling.logprob_reduction
        x, x_next = rows["latents"][index], rows["next_latents"][index]
        step_index = rows["step_index"][index]
        cond = samples.cond.rows(rows["image"][index])
        out = guided_predict(family, model, schedule, cond, detach_uncond=o.detach_uncond)(x, step_index)
        new = transition_logprob(schedule, x, x_next, out, step_index, reduction=reduction)
        old = rows["old_logprobs"][index].to(new.logprob.device)
        kl = torch.zeros_like(new.logprob)
        if o.kl_coef > 0:
            with torch.no_grad(), built.reference.model() as ref_model:
                ref_out = guided_predict(family, ref_model, schedule, cond)(x, step_index)
            kl = transition_kl(schedule, x, new.mean, ref_out, step_index, reduction=reduction,
                               convention=o.kl_convention)
        losses, clipped = grpo_transition_loss(new.logprob, old, rows["advantages"][index], kl,
                                               clip_range=o.clip_range, kl_coef=o.kl_coef)
        losses = losses * rows["weights"][index].to(losses.device)
        metrics = policy_metrics(new.logprob, old, clipped) | {
            "kl": kl.detach(), "ratio": torch.exp(new.logprob.detach() - old)}
        return StepOutput(losses, metrics, units=len(index))


# ------------------------------------------------------------------------------------------ online DPO

def best_worst(samples: Samples, g: int) -> tuple[Tensor, Tensor]:
    """Per prompt group, the image index of the highest and of the lowest reward: long [P] each."""
    grouped = samples.rewards.view(-1, g)
    offsets = torch.arange(grouped.shape[0], device=grouped.device) * g
    return grouped.argmax(dim=1) + offsets, grouped.argmin(dim=1) + offsets


class OnlineDPO(OnlineMethod):
    name = "online_dpo"

    def before_sampling(self, step: int) -> None:
        every = self.cfg.online.ref_refresh_every
        if every and step and step % every == 0:  # the reference becomes the policy as it is now
            resharded(self.built.policy)
            if isinstance(self.built.reference, SecondAdapter):
                self.built.reference.refresh()
                return
            policy = {n: p for n, p in self.built.policy.named_parameters() if p.requires_grad}
            for name, target in self.reference_weights().items():
                copy_into(target, policy[name])  # shard for shard; a whole (offloaded) copy gathers

    def reference_weights(self) -> dict[str, Tensor]:
        """The weights a refresh moves, by the policy's parameter names (the second adapter's by its own):
        DTensors where the reference is sharded."""
        reference = self.built.reference
        resharded(self.built.policy, *([reference.module] if hasattr(reference, "module") else []))
        if isinstance(reference, SecondAdapter):
            return {name: target for name, (_, target) in reference.pairs.items()}
        names = {n for n, p in self.built.policy.named_parameters() if p.requires_grad}
        return {n: p for n, p in reference.module.named_parameters() if n in names}

    def update(self, model, samples, step, rank):
        pairs = best_worst(samples, self.cfg.online.group_size)
        total = len(pairs[0])
        seeds = stream_seeds(self.cfg.optim.seed, step, rank, PAIRS, total)
        return total, lambda index: self.loss(model, samples, pairs, index, [seeds[int(i)] for i in index])

    def loss(self, model, samples: Samples, pairs: tuple[Tensor, Tensor], index: Tensor,
             noise_seeds: list[int]) -> StepOutput:
        """Diffusion-DPO on pairs ``index`` (long [M]) of (best, worst): the final latents of the two images,
        one noise and time per pair, through ``objectives.dpo_objective``."""
        built = self.built
        best, worst = pairs[0][index], pairs[1][index]
        final = samples.trajectory.final
        noise = draw_pair_noise(noise_seeds, built.latent_shape, built.noise.draw_time, final.device)
        cond = samples.cond
        text = {k: v[best.to(v.device)] for k, v in cond.text.items()}
        image = {k: torch.cat([v[best.to(v.device)], v[worst.to(v.device)]]) for k, v in cond.image.items()}
        x = PairInputs(final[best], final[worst], noise.noise, noise.timesteps, text, image)
        is_tie = samples.rewards[best] == samples.rewards[worst]
        beta = self.cfg.online.beta_dpo or built.comps.family.dpo_beta
        return dpo_objective(model, built.reference, x, is_tie, built.noise, PreferenceLossSection(beta=beta),
                             built.comps.family.forward)

    def state_dict(self) -> dict[str, Any]:
        """With refreshes: the reference's trained weights (whole: gathered under fsdp, collective), so a
        resumed run has the same reference."""
        if not self.cfg.online.ref_refresh_every:
            return {}
        return {"reference": whole_tensors(self.reference_weights())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "reference" not in state:
            return
        targets = self.reference_weights()
        if state["reference"].keys() != targets.keys():
            raise InputError("resume: the checkpoint's reference weights do not match this model's trained "
                             "parameters (written with another model, model.lora_rank or model.lora_targets?)")
        with torch.no_grad():
            for name, target in targets.items():
                copy_into(target, state["reference"][name])


# ------------------------------------------------------------------------------------------------- NFT

class NFT(OnlineMethod):
    """DiffusionNFT (online.nft): images from the deterministic sampler run by the old policy, a trailing
    average of the trained weights; each image noised afresh at K of the sampler's steps and trained with
    the implicit positive/negative policies' loss, plus nft_kl_coef x the velocity distance to the reference."""

    name = "nft"
    stochastic_sampling = False

    def __init__(self, cfg, built):
        super().__init__(cfg, built)
        self.old = ShadowWeights(built.policy)  # the policy as it starts: old = current

    def sampling_weights(self):
        return self.old.swapped_in()

    def update(self, model, samples, step, rank):
        cfg = self.cfg
        n, k = len(samples.rewards), cfg.num_train_steps()
        # one draw (steps and noise) per image, or per group shared by its G images (rows p*G .. p*G + G - 1)
        share = cfg.online.group_size if cfg.online.nft_group_noise else 1
        seed = stream_seeds(cfg.optim.seed, step, rank, CHOICE, 1)[0]
        steps = choose_steps(n // share, cfg.eligible_steps(), k, seed, first=cfg.online.first_steps)
        noise_seeds = torch.tensor(stream_seeds(cfg.optim.seed, step, rank, FORWARD_NOISE, n // share * k))
        rows = {"image": torch.arange(n).repeat_interleave(k),
                "step_index": steps.repeat_interleave(share, dim=0).flatten(),
                "noise_seed": noise_seeds.view(-1, k).repeat_interleave(share, dim=0).flatten()}
        return len(rows["image"]), lambda index: self.loss(model, samples, rows, index)

    def loss(self, model, samples: Samples, rows: dict[str, Tensor], index: Tensor) -> StepOutput:
        built, o = self.built, self.cfg.online
        family, schedule = built.comps.family, samples.schedule
        image, step_index = rows["image"][index], rows["step_index"][index]
        x0 = samples.trajectory.final[image.to(samples.trajectory.final.device)].float()
        noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                             for s in rows["noise_seed"][index]]).to(x0.device)
        xt = schedule.noised(x0, noise, step_index)
        cond = samples.cond.rows(image)
        with torch.no_grad(), self.old.swapped_in() as old_policy:
            old_out = guided_predict(family, old_policy, schedule, cond)(xt, step_index)
        out = guided_predict(family, model, schedule, cond, detach_uncond=o.detach_uncond)(xt, step_index)
        r = optimality(samples.advantages[image.to(samples.advantages.device)], o.advantage_clip)
        losses, metrics = nft_loss(out, old_out, x0, lambda u: schedule.predicted_x0(xt, u, step_index), r,
                                   beta=o.nft_beta, adv_clip_max=o.advantage_clip)
        if o.nft_kl_coef > 0:
            with torch.no_grad(), built.reference.model() as ref_model:
                ref_out = guided_predict(family, ref_model, schedule, cond)(xt, step_index)
            kl = velocity_kl(out, ref_out)
            losses = losses + o.nft_kl_coef * kl
            metrics["kl"] = kl.detach()
        return StepOutput(losses, metrics, units=len(index))

    def after_update(self, step: int) -> None:
        o = self.cfg.online
        self.old.blend(old_policy_decay(step + 1, rate=o.nft_old_decay_rate, maximum=o.nft_old_decay_max,
                                        after=o.nft_old_decay_after))

    def state_dict(self) -> dict[str, Any]:
        """The old policy's weights, whole (gathered under fsdp: collective)."""
        return {"nft_old": whole_tensors(self.old.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "nft_old" in state:
            self.old.load_state_dict(state["nft_old"], "the checkpoint's NFT old policy")


METHODS: dict[str, type[OnlineMethod]] = {m.name: m for m in (GRPO, OnlineDPO, NFT)}
