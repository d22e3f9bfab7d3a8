"""Token-id examples into padded batches: prompt + completion(s) with the masks the losses read.

Right padding for training batches (the completions start at each row's own prompt length), left padding for
generation prompts (every row's last prompt token aligned at the end).
"""

from __future__ import annotations

import torch


def pad(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence. Returns (ids [B, T] long, mask [B, T] long)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def collate_completions(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows: input_ids, attention_mask and completion_mask (1 on the
    completion's tokens), all [N, T]."""
    ids, mask = pad([p + c for p, c in zip(prompts, completions)], pad_id)
    completion_mask = torch.zeros_like(mask)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        completion_mask[i, len(p) : len(p) + len(c)] = 1
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion_mask}


class PairCollator:
    """Pairs -> one batch of 2B rows, chosen first then rejected, for a single concatenated forward pass.
    Carries "index" (row ids, for caching reference log-probs), "margin" and "ref_chosen"/"ref_rejected" when
    the examples have them."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [e["prompt"] for e in examples]
        batch = collate_completions(
            prompts + prompts,
            [e["chosen"] for e in examples] + [e["rejected"] for e in examples],
            self.pad_id,
        )
        for key in ("index", "margin", "ref_chosen", "ref_rejected"):
            if key in examples[0]:
                dtype = torch.long if key == "index" else torch.float32
                batch[key] = torch.tensor([e[key] for e in examples], dtype=dtype)
        return batch


class RankingCollator:
    """Rankings -> all responses of all rows flattened to [sum K_b, T], plus "num_responses" [B]."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [e["prompt"] for e in examples for _ in e["responses"]]
        batch = collate_completions(prompts, [r for e in examples for r in e["responses"]], self.pad_id)
        batch["num_responses"] = torch.tensor([len(e["responses"]) for e in examples], dtype=torch.long)
        return batch


class DemoCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return collate_completions(
            [e["prompt"] for e in examples], [e["completion"] for e in examples], self.pad_id
        )


class PromptCollator:
    """Prompts left-padded for generation: input_ids, attention_mask [B, Tq]."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad([e["prompt"] for e in examples], self.pad_id, side="left")
        return {"input_ids": ids, "attention_mask": mask}
