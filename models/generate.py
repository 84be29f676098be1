"""Batched autoregressive generation with a KV cache: left padding, temperature / top-k / top-p
sampling, stopping on EOS. It is raylm's own generator: the rollout and evaluation actors fall back
to it where vLLM cannot be installed, and tests check vLLM against it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .transformer import KVCache, Transformer


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop_on_eos: bool = True


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest nucleus of mass top_p."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        if prompt:
            tokens[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
            mask[row, width - len(prompt) :] = True
    return tokens, mask


def padded_attention_mask(key_valid: torch.Tensor, n_queries: int) -> torch.Tensor:
    """[B, K] valid keys -> [B, 1, Q, K] causal mask over cache slots for the last Q slots.

    A padding query may see itself, so its softmax row is never empty (an all-masked row would
    give NaN and poison later layers through the values)."""
    n_keys = key_valid.shape[1]
    q_slots = torch.arange(n_keys - n_queries, n_keys, device=key_valid.device)
    k_slots = torch.arange(n_keys, device=key_valid.device)
    causal = k_slots[None, :] <= q_slots[:, None]
    mask = causal[None] & key_valid[:, None, :]
    mask = mask | (k_slots[None, :] == q_slots[:, None])[None]
    return mask[:, None]


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt; returns only the new tokens (ending with EOS when it was produced)."""
    params = params or SamplingParams()
    cfg = model.config
    device = next(model.parameters()).device
    tokens, valid = left_pad(prompts, cfg.pad_token_id, device)
    batch, prompt_len = tokens.shape
    if prompt_len + params.max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_len}) + max_new_tokens ({params.max_new_tokens}) exceeds max_seq_len ({cfg.max_seq_len})"
        )
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, batch, prompt_len + params.max_new_tokens, device, dtype) if use_cache else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    end_ids = torch.tensor(cfg.end_token_ids, device=device)
    new_tokens = []
    step_input = tokens
    for _ in range(params.max_new_tokens):
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        n_queries = step_input.shape[1]
        mask = padded_attention_mask(valid, n_queries)
        logits = model(step_input, positions=positions[:, -n_queries:], attn_mask=mask, cache=cache)[:, -1]
        next_token = sample_next(logits, params, generator)
        next_token = torch.where(finished, torch.full_like(next_token, cfg.pad_token_id), next_token)
        new_tokens.append(next_token)
        if params.stop_on_eos:
            finished |= torch.isin(next_token, end_ids)
        if finished.all():
            break
        valid = torch.cat([valid, torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        step_input = next_token[:, None] if use_cache else tokens
    out = torch.stack(new_tokens, dim=1).tolist()
    results = []
    for row in out:
        if params.stop_on_eos:
            row = row[: next((i + 1 for i, t in enumerate(row) if t in cfg.end_token_ids), len(row))]
        results.append(row)
    return results
