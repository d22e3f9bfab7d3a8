"""The denoising objectives of the offline and online preference recipes: Diffusion-DPO and SFT on a batch of
pair inputs (``train`` runs them on stored pairs; ``grpo method=online_dpo`` on each group's best and worst
sampled image). Each returns the engine's StepOutput: per-pair losses and metrics.
"""

from __future__ import annotations

import torch

from diffusion_dpo.denoising import PairInputs, pair_errors, unet_forward, winner_errors
from diffusion_dpo.engine import StepOutput
from diffusion_dpo.losses import diffusion_dpo_loss, implicit_accuracy
from diffusion_dpo.run_options import PreferenceLossSection

Tensor = torch.Tensor


def dpo_objective(policy, reference, x: PairInputs, is_tie: Tensor, process, loss: PreferenceLossSection,
                  forward=unet_forward) -> StepOutput:
    """Diffusion-DPO (Wallace et al. 2023, eq. 14) on B pairs: per-pair losses [B] and metrics.

    ``process``: the family's noise process; ``forward``: its denoiser call. A tie (kept with
    data.keep_ties) has no winner: its loss is the mean of the loss with either image as winner (for the
    sigmoid loss, DPO with a preference probability of 1/2), and its accuracy counts 0.5.
    """
    with torch.no_grad(), reference.model() as ref_model:
        ref_w, ref_l = pair_errors(ref_model, x, process, forward)
    model_w, model_l = pair_errors(policy, x, process, forward)

    def pair_loss(*errors):
        return diffusion_dpo_loss(*errors, beta_dpo=loss.beta, loss_type=loss.loss_type,
                                  label_smoothing=loss.label_smoothing)

    losses, reward_w, reward_l = pair_loss(model_w, model_l, ref_w, ref_l)
    swapped = pair_loss(model_l, model_w, ref_l, ref_w)[0]
    losses = torch.where(is_tie, 0.5 * (losses + swapped), losses)
    accuracy = torch.where(is_tie, 0.5, implicit_accuracy(reward_w, reward_l))
    return StepOutput(losses, {"implicit_acc": accuracy, "reward_margin": reward_w - reward_l,
                               "model_mse_w": model_w, "model_mse_l": model_l, "ref_mse_w": ref_w,
                               "ref_mse_l": ref_l}, units=len(losses))


def sft_objective(policy, reference, x: PairInputs, is_tie: Tensor, process, loss: PreferenceLossSection,
                  forward=unet_forward) -> StepOutput:
    """Supervised fine-tuning on the winners (the paper's SFT baseline): the plain denoising loss [B]."""
    model_w = winner_errors(policy, x, process, forward)
    return StepOutput(model_w, {"model_mse_w": model_w}, units=len(model_w))


OBJECTIVES = {"dpo": dpo_objective, "sft": sft_objective}
