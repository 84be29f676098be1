"""The reward-model pool's actor: a frozen ``*ForSequenceClassification`` checkpoint (raylm's
``TransformerWithScalarHead``) that scores whole conversations at their last token."""

from __future__ import annotations

import ray
import torch


@ray.remote
class RewardScorer:
    def __init__(self, checkpoint: str, threads: int = 1, use_gpu: bool = False, batch_size: int = 64):
        from raylm.models.hf_checkpoint import load_checkpoint, load_config

        torch.set_num_threads(max(1, threads))
        _, is_scalar = load_config(checkpoint)
        if not is_scalar:
            raise ValueError(f"{checkpoint}: not a reward model (config.json's architecture is not "
                             "*ForSequenceClassification)")
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.model = load_checkpoint(checkpoint, scalar_head=True).to(self.device).eval()
        self.batch_size = batch_size

    def ready(self) -> bool:
        return True

    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> list[float]:
        """One score per token sequence (the whole conversation, as the reward model was trained on)."""
        scores = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start:start + self.batch_size]
            width = max(len(s) for s in chunk)
            tokens = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, seq in enumerate(chunk):
                tokens[i, :len(seq)] = torch.tensor(seq)
                mask[i, :len(seq)] = 1
            scores += self.model.sequence_scores(tokens.to(self.device), mask.to(self.device)).cpu().tolist()
        return scores
