"""Implicit-reward accuracy of a Diffusion-DPO model on held-out preference pairs.

The DPO implicit reward of an image under a tuned denoiser (policy) and its base (reference) is

    r(x) = 0.5 * beta_dpo * (mse_ref(x) - mse_policy(x))

with mse the denoising error at a noise and timestep (Wallace et al. 2023, eq. 14, as in
:func:`diffusion_dpo.losses.diffusion_dpo_loss`). A pair counts as ranked right when r(winner) > r(loser)
(a tie counts half). Each pair's winner and loser share the noise and time (DDPM: timestep; flow families:
sigma, from the family's noise process), the two denoisers see the same ones through the family's
denoiser call, and the errors are averaged over ``noise_draws`` draws, because one draw is a noisy
estimate. The paper reports 60.8% for DPO-SD1.5 and 72.0% for DPO-SDXL on Pick-a-Pic v2 validation.

    pairs, counts = labelled_pairs(open_pairs(source, "validation", streaming=True), 500, source, resolution=512)
    scores = score_pairs(tuned_pipe, base_pipe, pairs, beta_dpo=5000, noise_draws=4)
    accuracy = sum(s.correct for s in scores) / len(scores)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from diffusion_dpo.errors import InputError


@dataclass
class PairScore:
    """Denoising errors of one pair (averaged over the noise draws) and the resulting rewards."""

    index: int
    caption: str
    policy_mse_w: float
    policy_mse_l: float
    ref_mse_w: float
    ref_mse_l: float
    reward_w: float
    reward_l: float
    correct: float  # 1, 0, or 0.5 for equal rewards


def pipeline_components(pipe):
    """The training :class:`~diffusion_dpo.models.Components` of a loaded diffusers pipeline of any family:
    its denoiser, VAE, text encoders and tokenizers in the family's order, and the scheduler the family
    trains with (DDPM families: a DDPMScheduler from the pipeline's schedule, its betas and prediction type;
    flow families: the pipeline's flow-matching scheduler)."""
    from diffusers import DDPMScheduler

    from diffusion_dpo.models import Components
    from diffusion_dpo.sampling import pipeline_family

    family = pipeline_family(pipe)
    scheduler = pipe.scheduler if family.flow else DDPMScheduler.from_config(pipe.scheduler.config)
    family.prepare_vae(pipe.vae)
    return Components(
        getattr(pipe, family.denoiser_name), pipe.vae,
        [getattr(pipe, enc) for _, enc in family.text_components],
        [getattr(pipe, tok) for tok, _ in family.text_components], scheduler, family,
    )


def noise_process(comps):
    """The family's noise process with the default settings (mean reduction; flow families: u uniform and
    the scheduler's shift), the same for the two models so a pair's draws match."""
    from diffusion_dpo.families import NoiseConfig

    return comps.family.noise_process(comps.noise_scheduler, NoiseConfig())


def labelled_pairs(rows: Iterable[dict], max_pairs: int, where: str, *, resolution: int, rank: int = 0,
                   world_size: int = 1, convert_non_rgb: bool = True) -> tuple[list, dict[str, Any]]:
    """The first ``max_pairs`` (0 = all) rows with a winner as :class:`diffusion_dpo.data.Pair` (winner first,
    center crop at ``resolution``, no flip, no caption dropout). Ties are skipped, and so are rows with a bad
    label, caption or image, all counted. With several processes, process ``rank`` decodes only every
    ``world_size``-th pair. Returns (pairs, counts) with counts ``ties``, ``bad`` and ``first_bad``."""
    from diffusion_dpo.data import ROW_REASONS, BadPair, DataConfig, load_pair, row_verdict

    data_cfg = DataConfig(source=where, resolution=resolution, center_crop=True, random_flip=False,
                          caption_dropout=0.0, convert_non_rgb=convert_non_rgb)
    pairs, taken = [], 0
    counts: dict[str, Any] = {"ties": 0, "bad_rows": 0, "bad_images": 0, "first_bad": None}
    for i, row in enumerate(rows):
        if max_pairs and taken >= max_pairs:
            break
        verdict, detail = row_verdict(row.get("caption"), row.get("label_0"), row.get("label_1"))
        if verdict == "tie" or verdict in ROW_REASONS:
            counts["ties" if verdict == "tie" else "bad_rows"] += 1
            if verdict != "tie":
                counts["first_bad"] = counts["first_bad"] or f"row {i} of {where}: {detail}"
            continue
        taken += 1
        if (taken - 1) % world_size != rank:
            continue
        pair = load_pair(row, verdict, i, 0, 0, data_cfg, f"{i} of {where}")
        if isinstance(pair, BadPair):
            counts["bad_images"] += 1
            counts["first_bad"] = counts["first_bad"] or pair.message
            continue
        pairs.append(pair)
    return pairs, counts


def score_pairs(policy_pipe, reference_pipe, pairs: list, *, beta_dpo: float = 5000.0, noise_draws: int = 4,
                batch_size: int = 8, seed: int = 0, device=None, dtype=torch.float32,
                progress=None) -> list[PairScore]:
    """Implicit rewards of winner and loser for each :class:`diffusion_dpo.data.Pair`.

    The noise, timestep and latent sample of the pair from row ``i`` in draw ``d`` come from
    ``pair_seeds(seed, d, 0, 1, offset=i)``: the same for both models and both images of the pair,
    independent of the batch and of the process that scores it. Each model is conditioned through its own
    text encoder(s) and VAE (the base's, for a tuned denoiser or LoRA; its own, for a second checkpoint), with
    the encoding and denoiser inputs the trainer uses (``models.encode_pair_batch``, ``models.pair_inputs``).
    """
    from diffusion_dpo.data import collate
    from diffusion_dpo.denoising import draw_pair_noise, pair_errors, pair_seeds
    from diffusion_dpo.losses import diffusion_dpo_loss, implicit_accuracy
    from diffusion_dpo.models import encode_pair_batch, pair_inputs

    if noise_draws < 1:
        raise InputError(f"config key 'implicit_reward.noise_draws': expected at least 1, got {noise_draws}")
    device = torch.device(device) if device is not None else policy_pipe.device
    models = {"policy": pipeline_components(policy_pipe), "reference": pipeline_components(reference_pipe)}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scores: list[PairScore] = []
    for start in range(0, len(pairs), batch_size):
        batch = collate(pairs[start:start + batch_size])
        rows = batch["row_indices"].tolist()
        seeds = [[pair_seeds(seed, d, 0, 1, offset=i)[0] for i in rows] for d in range(noise_draws)]
        errors = {}
        with torch.no_grad(), autocast:
            for name, comps in models.items():
                encoded = encode_pair_batch(comps, batch).to(device)
                latent_shape = (encoded.moments.shape[-3] // 2, *encoded.moments.shape[-2:])
                process = noise_process(comps)
                total_w = total_l = 0.0
                for draw_seeds in seeds:
                    noise = draw_pair_noise(draw_seeds, latent_shape, process.draw_time, device)
                    mse_w, mse_l = pair_errors(comps.denoiser, pair_inputs(comps.vae.config, encoded, noise),
                                               process, comps.family.forward)
                    total_w, total_l = total_w + mse_w.float(), total_l + mse_l.float()
                errors[name] = ((total_w / noise_draws).cpu(), (total_l / noise_draws).cpu())
        (policy_w, policy_l), (ref_w, ref_l) = errors["policy"], errors["reference"]
        _, reward_w, reward_l = diffusion_dpo_loss(policy_w, policy_l, ref_w, ref_l, beta_dpo=beta_dpo)
        correct = implicit_accuracy(reward_w, reward_l)
        for k, i in enumerate(rows):
            scores.append(PairScore(i, batch["captions"][k], float(policy_w[k]), float(policy_l[k]),
                                    float(ref_w[k]), float(ref_l[k]), float(reward_w[k]), float(reward_l[k]),
                                    float(correct[k])))
        if progress is not None:
            progress.update(len(rows))
    return scores
