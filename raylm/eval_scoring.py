"""Log-likelihood scoring with shared prefixes computed once: pure PyTorch over a raylm ``Transformer``.

A scoring request is a token sequence and how many of its last tokens to score. Requests that share
everything before their scored tokens (the answers of one multiple-choice question: one prompt, four
answers) become one *prefix tree*: the prompt once, then each answer's tokens as a branch that sees
the prompt and itself but no other branch, its positions continuing from the prompt's end. Trees
are packed whole into rows of up to ``row_tokens`` tokens with a block mask, so a batch carries no
padding inside rows and every prompt token is computed once, however many answers it has.

The log-probabilities are the ones a separate forward pass per request gives (same positions, same
visible keys); only the order of floating-point sums in the attention may differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raylm.models.transformer import Transformer


@dataclass
class PrefixTree:
    prefix: list[int]
    branches: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, scored tokens)

    @property
    def n_tokens(self) -> int:
        # The last token of each branch is only a target: nothing reads its output.
        return len(self.prefix) + sum(len(tokens) - 1 for _, tokens in self.branches)


def build_trees(sequences: list[list[int]], n_scored: list[int]) -> list[PrefixTree]:
    trees: dict[tuple[int, ...], PrefixTree] = {}
    for i, (seq, n) in enumerate(zip(sequences, n_scored)):
        if not 1 <= n < len(seq):
            raise ValueError(f"request {i}: scores {n} of {len(seq)} tokens; need 1 <= n_scored < len(tokens)")
        prefix = tuple(seq[: len(seq) - n])
        tree = trees.setdefault(prefix, PrefixTree(list(prefix)))
        tree.branches.append((i, list(seq[len(seq) - n :])))
    return list(trees.values())


def pack_rows(trees: list[PrefixTree], row_tokens: int) -> list[list[PrefixTree]]:
    """First-fit decreasing: the longest trees first, each into the first row with room."""
    rows: list[list[PrefixTree]] = []
    room: list[int] = []
    for tree in sorted(trees, key=lambda t: -t.n_tokens):
        for r, free in enumerate(room):
            if tree.n_tokens <= free:
                rows[r].append(tree)
                room[r] -= tree.n_tokens
                break
        else:
            rows.append([tree])
            room.append(max(row_tokens, tree.n_tokens) - tree.n_tokens)
    return rows


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, 1, T, T] bool: query row may attend key column
    read_at: torch.Tensor  # [N] flat index (b * T + t) whose output predicts target[n]
    targets: torch.Tensor  # [N]
    owner: torch.Tensor  # [N] request index of each target


def pack_batch(rows: list[list[PrefixTree]]) -> PackedBatch:
    width = max(sum(t.n_tokens for t in row) for row in rows)
    n_rows = len(rows)
    tokens = torch.zeros(n_rows, width, dtype=torch.long)
    positions = torch.zeros(n_rows, width, dtype=torch.long)
    tree_id = torch.full((n_rows, width), -1, dtype=torch.long)  # -1: padding
    branch_id = torch.zeros(n_rows, width, dtype=torch.long)  # 0: the shared prefix
    read_at, targets, owner = [], [], []
    for b, row in enumerate(rows):
        at = 0
        for t, tree in enumerate(row):
            n_prefix = len(tree.prefix)
            tokens[b, at : at + n_prefix] = torch.tensor(tree.prefix)
            positions[b, at : at + n_prefix] = torch.arange(n_prefix)
            tree_id[b, at : at + n_prefix] = t
            last_prefix = b * width + at + n_prefix - 1
            at += n_prefix
            for j, (request, scored) in enumerate(tree.branches, start=1):
                inputs = scored[:-1]
                tokens[b, at : at + len(inputs)] = torch.tensor(inputs, dtype=torch.long)
                positions[b, at : at + len(inputs)] = torch.arange(n_prefix, n_prefix + len(inputs))
                tree_id[b, at : at + len(inputs)] = t
                branch_id[b, at : at + len(inputs)] = j
                # The first scored token is predicted by the prefix's last token, each next one by
                # the branch token before it.
                read_at += [last_prefix] + [b * width + at + k for k in range(len(inputs))]
                targets += scored
                owner += [request] * len(scored)
                at += len(inputs)
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]
    same_tree = (tree_id[:, :, None] == tree_id[:, None, :]) & (tree_id[:, :, None] >= 0)
    same_branch = (branch_id[:, None, :] == 0) | (branch_id[:, :, None] == branch_id[:, None, :])
    mask = same_tree & same_branch & causal
    mask |= torch.eye(width, dtype=torch.bool)  # padding sees itself: no empty softmax row
    return PackedBatch(tokens, positions, mask[:, None], torch.tensor(read_at), torch.tensor(targets),
                       torch.tensor(owner))


@torch.inference_mode()
def score_requests(model: Transformer, sequences: list[list[int]], n_scored: list[int],
                   row_tokens: int = 256, batch_tokens: int = 2048) -> tuple[list[float], list[bool]]:
    """For each sequence: the summed log-prob of its last ``n_scored`` tokens given the tokens before
    them, and whether every one of them was the model's greedy choice."""
    row_tokens = min(row_tokens, model.config.max_seq_len)
    logprob = torch.zeros(len(sequences), dtype=torch.float64)
    misses = torch.zeros(len(sequences), dtype=torch.long)
    rows = pack_rows(build_trees(sequences, n_scored), row_tokens)
    for tree in (t for row in rows for t in row):
        longest = len(tree.prefix) + max(len(s) for _, s in tree.branches) - 1
        if longest > model.config.max_seq_len:
            raise ValueError(f"a request of {longest + 1} tokens exceeds the model's max_seq_len "
                             f"({model.config.max_seq_len}): truncate it before scoring")
    per_batch = max(1, batch_tokens // row_tokens)
    for start in range(0, len(rows), per_batch):
        batch = pack_batch(rows[start : start + per_batch])
        hidden = model.hidden_states(batch.tokens, positions=batch.positions, attn_mask=batch.mask)
        logits = model.output(hidden.flatten(0, 1)[batch.read_at]).float()
        logp = logits.log_softmax(-1)
        token_logp = logp.gather(-1, batch.targets[:, None]).squeeze(-1).double()
        hit = logits.argmax(-1) == batch.targets
        logprob.index_add_(0, batch.owner, token_logp)
        misses.index_add_(0, batch.owner, (~hit).long())
    return logprob.tolist(), (misses == 0).tolist()
