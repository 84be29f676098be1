"""RLHF's batches: rollouts as right-padded tensors (``tokens`` [B, T], ``prompt_lens`` [B],
``response_mask`` [B, R]), split over ranks or actors and put back together."""

from __future__ import annotations

import numpy as np
import torch


def split_evenly(items: list, n: int) -> list[list]:
    per, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + per + (i < extra)
        out.append(items[start:end])
        start = end
    return out


def make_batch(prompts: list[list[int]], responses: list[list[int]], masks: list[list[int]] | None = None) -> dict:
    """Right-padded ``tokens`` [B, T] (prompt then response), ``prompt_lens`` [B], ``response_mask`` [B, R]:
    1 on the response's tokens, or where given, on those ``masks`` marks (the model's, in a tool episode)."""
    width = max(1, max(len(r) for r in responses))
    seq_len = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens = torch.zeros(len(prompts), max(seq_len, 2), dtype=torch.long)
    mask = torch.zeros(len(prompts), width)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, :len(r)] = torch.tensor(masks[i], dtype=mask.dtype) if masks is not None else 1
    return {"tokens": tokens, "prompt_lens": torch.tensor([len(p) for p in prompts]), "response_mask": mask}


def pad_rows(values: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(values), width)
    for i, row in enumerate(values):
        out[i, :len(row)] = torch.tensor(row[:width])
    return out


def shard_batch(batch: dict, n: int) -> list[dict]:
    """Contiguous equal-ish row slices, one per rank / actor."""
    sizes = [len(s) for s in split_evenly(list(range(len(batch["tokens"]))), n)]
    starts = np.cumsum([0] + sizes)
    return [{k: v[starts[i]:starts[i + 1]] for k, v in batch.items()} for i in range(n)]


def cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


def minibatch_rows(n: int, minibatches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A fresh permutation of ``n`` rows cut into ``minibatches`` equal parts (every rank the same count)."""
    order = torch.randperm(n, generator=generator)
    per = n // minibatches
    return [order[i * per:(i + 1) * per] for i in range(minibatches)]


def trim(batch: dict, rows: torch.Tensor) -> dict:
    """The rows of a batch, cut to the longest real sequence and response among them."""
    out = {k: v[rows] for k, v in batch.items()}
    # Up to each row's last real token (a tool episode's mask has holes: the tool tokens).
    mask = out["response_mask"]
    ends = ((mask > 0) * torch.arange(1, mask.shape[1] + 1)).amax(-1)
    width = int(ends.max().clamp(min=1))
    seq_len = int((out["prompt_lens"] + ends).max())
    for key, value in out.items():
        if key == "tokens":
            out[key] = value[:, :max(seq_len, 2)]
        elif value.ndim == 2:
            out[key] = value[:, :width]
    return out
