"""Log-probabilities of token sequences under a causal LM.

A causal LM's logits at position t predict token t + 1, so the log-prob of a completion is

    log pi(y | x) = sum_{t in completion} log softmax(logits[t - 1])[ids[t]]

summed over completion tokens only: prompt and padding positions are masked out ([DPO] eq. 7 uses these
sequence log-probs; IPO averages them over the completion's length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] per position, in float32. logits [B, T, V], targets [B, T] -> [B, T].

    Row by row, so that only one row's [T, V] float32 copy exists at a time (the vocabulary of a real model is
    ~150k, which makes the full [B, T, V] upcast the largest tensor of a step)."""
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for i in range(logits.shape[0]):
        row = logits[i].float()
        out[i] = row.gather(-1, targets[i].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1)
    return out


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution per position, nats. logits [B, T, V] -> [B, T]."""
    out = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
    for i in range(logits.shape[0]):
        logp = F.log_softmax(logits[i].float(), dim=-1)
        out[i] = -(logp.exp() * logp).sum(-1)
    return out


def sequence_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of completion-token log-probs per row.

    logits [B, T, V] from a forward pass over input_ids [B, T]; completion_mask [B, T] is 1 on completion
    tokens (0 on prompt and padding). Returns (logps [B] float32, n_tokens [B] float32); logps / n_tokens is
    the length-averaged log-prob that IPO uses.
    """
    mask = completion_mask[:, 1:].float()
    per_token = token_logps(logits[:, :-1], input_ids[:, 1:])
    return (per_token * mask).sum(-1), mask.sum(-1)


def forward_logps(
    model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """One forward pass of ``model`` over right-padded rows -> (sequence logps [N], completion lengths
    [N])."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return sequence_logps(logits, input_ids, completion_mask)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding: the first real token of every row is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of completion-token negative log-likelihoods, number of completion tokens) of one batch."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    mask = batch["completion_mask"][:, 1:].float()
    nll = -(token_logps(logits[:, :-1], batch["input_ids"][:, 1:]) * mask).sum()
    return nll, mask.sum()
