"""Log-likelihood scoring with shared prefixes computed once: pure PyTorch over a raylm ``Transformer``.

A scoring request is a token sequence and how many of its last tokens to score. Requests that share
everything before their scored tokens (the answers of one multiple-choice question: one prompt, four
answers) become one *prefix tree*: the prompt once, then the answers' tokens as a trie, so answers
that begin alike (``os.path.join`` and ``os.path.split``) share those tokens too. Each trie token sees
the prompt, its ancestors and itself, at the position it has in its own request. Trees are packed
whole into rows of up to ``row_tokens`` tokens with a block mask, so a batch carries no padding
inside rows and no token is computed twice, however many answers share it.

The log-probabilities are the ones a separate forward pass per request gives (same positions, same
visible keys); only the order of floating-point sums in the attention may differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from raylm.models.transformer import Transformer


@dataclass
class PrefixTree:
    prefix: list[int]
    tokens: list[int] = field(default_factory=list)  # trie nodes after the prefix, parents first
    parent: list[int] = field(default_factory=list)  # each node's parent node; -1: the prefix's last token
    branches: list[tuple[int, list[int], list[int]]] = field(default_factory=list)  # (request, scored tokens,
    # the node whose output predicts each of them; -1: the prefix's last token)
    _children: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)

    def add(self, request: int, scored: list[int]) -> None:
        node, read = -1, [-1]
        for token in scored[:-1]:  # the last scored token is only a target: nothing reads its output
            child = self._children.get((node, token))
            if child is None:
                child = self._children[(node, token)] = len(self.tokens)
                self.tokens.append(token)
                self.parent.append(node)
            node = child
            read.append(node)
        self.branches.append((request, scored, read))

    @property
    def n_tokens(self) -> int:
        return len(self.prefix) + len(self.tokens)


def build_trees(sequences: list[list[int]], n_scored: list[int]) -> list[PrefixTree]:
    trees: dict[tuple[int, ...], PrefixTree] = {}
    for i, (seq, n) in enumerate(zip(sequences, n_scored)):
        if not 0 <= n < len(seq):
            raise ValueError(f"request {i}: scores {n} of {len(seq)} tokens; need 0 <= n_scored < len(tokens)")
        if n == 0:  # an answer whose tokens all merged into the context's: nothing to score (lm_eval: 0, greedy)
            continue
        prefix = tuple(seq[: len(seq) - n])
        trees.setdefault(prefix, PrefixTree(list(prefix))).add(i, list(seq[len(seq) - n :]))
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
    tokens = np.zeros((len(rows), width), dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width, width), dtype=bool)
    read_at, targets, owner = [], [], []
    for b, row in enumerate(rows):
        at = 0
        for tree in row:
            n_prefix, first = len(tree.prefix), at + len(tree.prefix)  # first: where the trie starts
            tokens[b, at:first] = tree.prefix
            positions[b, at:first] = np.arange(n_prefix)
            mask[b, at:first, at:first] = np.tri(n_prefix, dtype=bool)
            tokens[b, first : first + len(tree.tokens)] = tree.tokens
            for node, parent in enumerate(tree.parent):
                i = first + node
                mask[b, i, at:first] = True  # the whole prefix
                if parent >= 0:  # the parent's ancestors (earlier nodes only), then the parent itself
                    mask[b, i, first:i] = mask[b, first + parent, first:i]
                    positions[b, i] = positions[b, first + parent] + 1
                else:
                    positions[b, i] = n_prefix
                mask[b, i, i] = True
            for request, scored, read in tree.branches:
                read_at += [b * width + (first - 1 if node < 0 else first + node) for node in read]
                targets += scored
                owner += [request] * len(scored)
            at += tree.n_tokens
        mask[b, range(at, width), range(at, width)] = True  # padding sees itself: no empty softmax row
    return PackedBatch(torch.from_numpy(tokens), torch.from_numpy(positions), torch.from_numpy(mask)[:, None],
                       torch.tensor(read_at), torch.tensor(targets), torch.tensor(owner))


def forward_batches(rows: list[list[PrefixTree]], batch_tokens: int, max_requests: int | None) -> list[list[list[PrefixTree]]]:
    """Consecutive rows, as many to a forward pass as fit ``batch_tokens`` (rows padded to the widest)
    and ``max_requests`` requests: a batch of 32 here scores at most 32 sequences, as lm_eval's does."""
    batches, current, width, requests = [], [], 0, 0
    for row in rows:
        row_width, row_requests = sum(t.n_tokens for t in row), sum(len(t.branches) for t in row)
        too_many = max_requests is not None and requests + row_requests > max_requests
        if current and (max(width, row_width) * (len(current) + 1) > batch_tokens or too_many):
            batches.append(current)
            current, width, requests = [], 0, 0
        current.append(row)
        width, requests = max(width, row_width), requests + row_requests
    return batches + [current] if current else batches


@torch.inference_mode()
def score_requests(model: Transformer, sequences: list[list[int]], n_scored: list[int], row_tokens: int | None = None,
                   batch_tokens: int = 2048, max_requests: int | None = None) -> tuple[list[float], list[bool]]:
    """For each sequence: the summed log-prob of its last ``n_scored`` tokens given the tokens before
    them, and whether every one of them was the model's greedy choice.

    ``row_tokens`` defaults to the longest tree: shorter trees share a row only where they fit beside
    each other in that width, so no row is wider than it must be. Wider rows pad less when trees vary
    in size but cost more attention, which spans the whole row (a row of two trees of 100 tokens
    attends over 200 keys per query, where two rows of one tree attend over 100)."""
    logprob = torch.zeros(len(sequences), dtype=torch.float64)
    misses = torch.zeros(len(sequences), dtype=torch.long)
    trees = build_trees(sequences, n_scored)  # none when every answer merged into its context
    row_tokens = min(row_tokens or max((t.n_tokens for t in trees), default=1), model.config.max_seq_len)
    rows = pack_rows(trees, row_tokens)
    dtype = model.output.weight.dtype
    for tree in trees:
        longest = len(tree.prefix) + max(len(s) for _, s, _ in tree.branches) - 1
        if longest > model.config.max_seq_len:
            raise ValueError(f"a request of {longest + 1} tokens exceeds the model's max_seq_len "
                             f"({model.config.max_seq_len}): truncate it before scoring")
    for batch_rows in forward_batches(rows, batch_tokens, max_requests):
        batch = pack_batch(batch_rows)
        # Additive rather than boolean: attention would turn a boolean mask into this in every layer.
        bias = torch.zeros(batch.mask.shape, dtype=dtype).masked_fill_(~batch.mask, float("-inf"))
        # The positions read, each once: a question's answers all read its prompt's last token, and
        # answers that begin alike read their shared trie nodes.
        read_rows, row_of_target = batch.read_at.unique(return_inverse=True)
        hidden = model.hidden_states(batch.tokens, positions=batch.positions, attn_mask=bias, output_rows=read_rows)
        logits = model.output(hidden[0]).float()
        logp = logits.log_softmax(-1)[row_of_target]
        token_logp = logp.gather(-1, batch.targets[:, None]).squeeze(-1).double()
        hit = logits.argmax(-1)[row_of_target] == batch.targets
        logprob.index_add_(0, batch.owner, token_logp)
        misses.index_add_(0, batch.owner, (~hit).long())
    return logprob.tolist(), (misses == 0).tolist()
