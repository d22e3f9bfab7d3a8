"""Preference losses: tensors in, unreduced per-pair tensors out. The caller reduces.

Vocabulary, one per side: images are **winner / loser** (``_w`` / ``_l``: the diffusion losses and the image
recipes), texts are **chosen / rejected** (the LLM losses and recipes); on both sides the model being tuned is
the **policy** and the frozen anchor the **reference**. The two meet only here: ``diffusion_dpo_loss`` is
``dpo_loss`` with log p = -mse, and hands back winner and loser rewards.

References
    [DPO]  Rafailov et al., "Direct Preference Optimization", 2023, eq. 7 (loss) and sec. 5 (implicit reward).
    [cDPO] Mitchell, "A note on DPO with noisy preferences" (conservative DPO / label smoothing), 2023.
    [IPO]  Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences", 2023,
           eq. 17 (the empirical IPO loss).
    [D-DPO] Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", 2023, eq. 14.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _sigmoid(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # [DPO] eq. 7; with label smoothing e, [cDPO]: the label is flipped with probability e.
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def _hinge(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # SLiC-style hinge on the scaled log-ratio margin.
    return torch.relu(1 - beta * h)


def _ipo(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # [IPO] eq. 17: regress the log-ratio margin onto 1/(2*tau), tau = beta. Length normalisation of the
    # log-probs is the caller's choice (the LLM recipe averages over tokens, as the IPO authors do).
    return (h - 1 / (2 * beta)) ** 2


LOSS_TYPES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
}


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO and its variants on per-pair sequence log-probabilities, shape [B] each.

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))

    loss_type "sigmoid": -(1-e) log sigma(beta h) - e log sigma(-beta h)   ([DPO] eq. 7, [cDPO])
              "hinge":   max(0, 1 - beta h)
              "ipo":     (h - 1/(2 beta))^2                                 ([IPO] eq. 17)

    Worked example (used by the tests): policy (-1, -3), reference (-2, -2), beta 0.5
        h = (-1 + 2) - (-3 + 2) = 2, beta h = 1
        sigmoid: -log sigma(1) = 0.313262; hinge: max(0, 1 - 1) = 0; ipo: (2 - 1)^2 = 1
        chosen reward 0.5 * 1 = 0.5, rejected reward 0.5 * -1 = -0.5

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); rewards are the implicit rewards
    beta * (log pi - log ref) ([DPO] sec. 5), detached.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {sorted(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' only, not {loss_type!r}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = LOSS_TYPES[loss_type](chosen_logratios - rejected_logratios, beta, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def diffusion_dpo_loss(
    model_mse_w: Tensor,
    model_mse_l: Tensor,
    ref_mse_w: Tensor,
    ref_mse_l: Tensor,
    *,
    beta_dpo: float = 5000.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Diffusion-DPO ([D-DPO] eq. 14) on per-sample denoising errors, shape [B] each.

    The log-likelihood of an image is replaced by its negative denoising error at a shared (noise, t):

        inside = -0.5 * beta_dpo * [(mse_theta(w) - mse_ref(w)) - (mse_theta(l) - mse_ref(l))]
        loss   = -log sigmoid(inside)

    which is ``dpo_loss`` with log p = -mse and beta = 0.5 * beta_dpo. The 0.5 and the scale of beta_dpo
    match the paper's released code (beta_dpo 5000 for SD1.5, 5000 for SDXL), so published settings carry over.

    Worked example: model (0.10, 0.20), reference (0.12, 0.18), beta_dpo 100
        (0.10 - 0.12) - (0.20 - 0.18) = -0.04, inside = -0.5 * 100 * -0.04 = 2
        loss = -log sigma(2) = 0.126928; winner reward 50 * 0.02 = 1.0, loser reward 50 * -0.02 = -1.0

    Returns (losses [B], winner_rewards [B], loser_rewards [B]) with
    rewards = 0.5 * beta_dpo * (ref_mse - model_mse), detached.
    """
    return dpo_loss(
        -model_mse_w.float(),
        -model_mse_l.float(),
        -ref_mse_w.float(),
        -ref_mse_l.float(),
        beta=0.5 * beta_dpo,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
    )


def implicit_accuracy(preferred_rewards: Tensor, other_rewards: Tensor) -> Tensor:
    """Per pair: 1 where the preferred (chosen, or winner) reward is higher, 0.5 for a tie, 0 otherwise."""
    return (preferred_rewards > other_rewards).float() + 0.5 * (preferred_rewards == other_rewards).float()


# ---------------------------------------------------------------------------------------------------------
# Reward-model and PPO losses (the LLM paths). Same contract: tensors in, unreduced tensors out.
#
#   [InstructGPT] Ouyang et al., "Training language models to follow instructions with human feedback", 2022,
#                 eq. 1 (the ranking loss over C(K,2) pairs) and eq. 2 (the RL objective with PPO-ptx).
#   [Llama2]      Touvron et al., "Llama 2", 2023, eq. 2 (a margin inside the Bradley-Terry loss).
#   [PPO]         Schulman et al., "Proximal Policy Optimization Algorithms", 2017, eq. 7 (clipped surrogate).
#   [ORM-center]  Eisenstein et al., "Helping or Herding? Reward Model Ensembles", 2023 (the centering term
#                 that pins the reward's free offset: coef * (r_chosen + r_rejected)^2).
# ---------------------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    *,
    center_coef: float = 0.0,
) -> Tensor:
    """Reward-model loss on per-pair scalar rewards, shape [B] each.

        loss = -log sigma(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)^2

    ([InstructGPT] eq. 1 for one pair, the margin of [Llama2] eq. 2, the centering term of [ORM-center]).

    Worked example (used by the tests): r_chosen 2, r_rejected 1
        no margin:          -log sigma(1) = 0.313262
        margin 1:           -log sigma(0) = ln 2 = 0.693147
        center_coef 0.01:   0.313262 + 0.01 * (2 + 1)^2 = 0.403262

    Returns the per-pair losses [B].
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return losses


def ranking_pairs(num_responses: int) -> tuple[Tensor, Tensor]:
    """All C(K,2) (better, worse) index pairs of K responses sorted best first: (i, j) with i < j.

    K = 3 -> better (0, 0, 1), worse (1, 2, 2).
    """
    i, j = torch.triu_indices(num_responses, num_responses, offset=1)
    return i, j


def ranking_loss(
    rewards: Tensor,
    num_responses: Tensor | None = None,
    *,
    center_coef: float = 0.0,
) -> Tensor:
    """InstructGPT's ranking loss ([InstructGPT] eq. 1): every C(K,2) pair of one prompt's K responses.

    rewards: [B, K], responses of a row sorted best first. num_responses: [B] ints, how many of the K are real
    (rows with fewer responses are padded on the right; padded slots are ignored); None means all K.

        loss_b = 1 / C(k_b, 2) * sum_{i < j < k_b} [ -log sigma(r_i - r_j) + center_coef * (r_i + r_j)^2 ]

    Dividing by C(k_b, 2) keeps a prompt with many responses from outweighing one with few, and putting all
    pairs of a prompt into one batch element is what keeps the reward model from overfitting (one pass over
    each comparison set instead of C(K,2) correlated passes).

    Worked example (used by the tests): rewards (2, 1, 0), K = 3
        pairs (0,1): -log sigma(1) = 0.313262, (0,2): -log sigma(2) = 0.126928, (1,2): 0.313262
        loss = (0.313262 + 0.126928 + 0.313262) / 3 = 0.251151
        with num_responses 2 only pair (0,1) counts: loss = 0.313262

    Returns the per-row losses [B].
    """
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"a ranking needs at least 2 responses, got K = {k}")
    i, j = ranking_pairs(k)
    i, j = i.to(rewards.device), j.to(rewards.device)
    pair_losses = bradley_terry_loss(rewards[:, i], rewards[:, j], center_coef=center_coef)  # [B, C(K,2)]
    if num_responses is None:
        return pair_losses.mean(dim=1)
    counts = num_responses.to(rewards.device)
    valid = (j[None, :] < counts[:, None]).to(pair_losses.dtype)  # both ends real, since i < j
    n_pairs = (counts * (counts - 1) / 2).to(pair_losses.dtype)
    return (pair_losses * valid).sum(dim=1) / n_pairs.clamp(min=1)


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, *,
                    clip_range: float = 0.2) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate ([PPO] eq. 7), negated to a loss, per token; all inputs [B, T].

        ratio = exp(logprobs - old_logprobs)
        loss  = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))

    Worked example (used by the tests), eps = 0.2:
        A =  1, ratio 1.5: max(-1.5, -1.2) = -1.2  (clipped: no gradient pushes the ratio further up)
        A = -1, ratio 1.5: max( 1.5,  1.2) =  1.5  (the pessimistic, unclipped term)
        A =  2, ratio 0.9: max(-1.8, -1.8) = -1.8

    Returns (losses [B, T], clipped [B, T]) where clipped is 1.0 where the clipped term was the larger one
    (its masked mean is the usual "clip fraction").
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, *,
                   clip_range: float = 0.2) -> tuple[Tensor, Tensor]:
    """Clipped value loss (the PPO reference implementation's, as used for RLHF), per token; inputs [B, T].

        v_clip = old_values + clip(values - old_values, -eps, eps)
        loss   = 0.5 * max((values - returns)^2, (v_clip - returns)^2)

    Worked example (used by the tests), eps = 0.2:
        values 1.0, old 0.5, return 1.0: max(0, (0.7 - 1)^2) = 0.09 -> 0.045   (clipped term wins)
        values 0.6, old 0.5, return 0.0: max(0.36, 0.36)      = 0.36 -> 0.18

    Returns (losses [B, T], clipped [B, T]) with clipped 1.0 where the clipped term was the larger one.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float()
