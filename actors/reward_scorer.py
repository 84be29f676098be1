"""A frozen reward model (``*ForSequenceClassification``, raylm's ``TransformerWithScalarHead``) that
scores whole conversations at their last token, in its two forms:

- ``RewardScorer``: a Ray actor (RLHF's reward pool, synthetic-data filtering) with ``score(sequences)``;
- ``RewardRowScorer``: a Ray Data ``map_batches`` class (eval's win rates) over rows ``{id, tokens}``
  -> ``{id, score}``.

Both score with ``reward_scores``.
"""

from __future__ import annotations

import numpy as np
import ray

# torch is imported inside the functions: a driver that starts the actors needs this module for the
# classes alone (raylm.ray_init preloads torch into the workers).


def load_reward_model(checkpoint: str, device=None):
    from raylm.models.hf_checkpoint import load_checkpoint, load_config

    _, is_scalar = load_config(checkpoint)
    if not is_scalar:
        raise ValueError(f"{checkpoint}: not a reward model (config.json's architecture is not "
                         "*ForSequenceClassification)")
    model = load_checkpoint(checkpoint, scalar_head=True)
    return (model.to(device) if device is not None else model).eval()


def reward_scores(model, sequences: list[list[int]], device=None) -> list[float]:
    """Scores of one batch of token sequences (right-padded, masked)."""
    import torch

    width = max(len(s) for s in sequences)
    tokens = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, seq in enumerate(sequences):
        tokens[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    with torch.inference_mode():
        if device is not None:
            tokens, mask = tokens.to(device), mask.to(device)
        return model.sequence_scores(tokens, mask).cpu().tolist()


@ray.remote
class RewardScorer:
    def __init__(self, checkpoint: str, threads: int = 1, use_gpu: bool = False, batch_size: int = 64):
        import torch

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.model = load_reward_model(checkpoint, self.device)
        self.batch_size = batch_size

    def ready(self) -> bool:
        return True

    def score(self, sequences: list[list[int]]) -> list[float]:
        """One score per token sequence (the whole conversation, as the reward model was trained on)."""
        scores = []
        for start in range(0, len(sequences), self.batch_size):
            scores += reward_scores(self.model, sequences[start:start + self.batch_size], self.device)
        return scores


class RewardRowScorer:
    def __init__(self, checkpoint_dir: str, max_batch: int = 16):
        self.model = load_reward_model(checkpoint_dir)
        self.max_batch = max_batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows ``{id, tokens}`` -> ``{id, score}``; the longest rows are batched together (little padding)."""
        sequences = [list(t) for t in batch["tokens"]]
        scores = np.zeros(len(sequences), dtype=np.float64)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        for start in range(0, len(order), self.max_batch):
            rows = order[start:start + self.max_batch]
            for r, value in zip(rows, reward_scores(self.model, [sequences[i] for i in rows])):
                scores[r] = value
        return {"id": batch["id"], "score": scores}
