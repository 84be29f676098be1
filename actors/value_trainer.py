"""The PPO critic: one rank of the value trainer group (see ``actors/trainer_group.py``).

A scalar-head transformer (``TransformerWithScalarHead``) gives a value per token; the value of
response token t is read where the policy's log-probability of t is: at position
``prompt_len - 1 + t``, the state before t is generated. It starts from the reward model's
weights (its scalar head included) unless another checkpoint is given; a causal-LM checkpoint
gets a fresh zero head.
"""

from __future__ import annotations

import ray
import torch

from raylm.actors.trainer_group import ShardedTrainer, TrainerGroup, mean_dicts
from raylm.rl.batching import cat_padded
from raylm.rl.ppo import response_index
from raylm.rl.remote import Pending
from raylm.train.losses import clipped_value_loss


@ray.remote
class ValueTrainer(ShardedTrainer):
    role = "critic"
    scalar_head = True

    def forward(self, batch: dict) -> torch.Tensor:
        tokens = batch["tokens"].to(self.device)
        index = response_index(batch["prompt_lens"].to(self.device), batch["response_mask"].shape[1], tokens.shape[1])
        return self.model(tokens).gather(1, index)

    @torch.no_grad()
    def values(self, batch: dict) -> torch.Tensor:
        """[b, R] values before each response token (0 on padding)."""
        self.model.eval()
        values = self.forward(batch)
        self.model.train()
        return (values * batch["response_mask"].to(values.device)).cpu()

    def update(self, batch: dict, epochs: int, minibatches: int, value_clip_eps: float | None, step: int = 0) -> dict:
        """``epochs`` passes in ``minibatches`` steps each of the (clipped) value loss against ``returns``."""
        def loss(mb: dict) -> tuple[torch.Tensor, dict]:
            value_loss, clipped = clipped_value_loss(self.forward(mb), mb["old_values"].to(self.device),
                                                     mb["returns"].to(self.device),
                                                     mb["response_mask"].to(self.device), value_clip_eps)
            return value_loss, {"critic/value_loss": value_loss.item(), "critic/value_clip_fraction": float(clipped)}

        return self.ppo_epochs(batch, epochs, minibatches, step, loss)


class CriticGroup(TrainerGroup):
    """The driver's handle on the critic's ranks."""

    def __init__(self, world_size: int, strategies: list, num_cpus: float, num_gpus: float, startup_s: float,
                 remote_s: float, seed: int = 0):
        super().__init__("critic", ValueTrainer, world_size, strategies, num_cpus, num_gpus, startup_s, remote_s, seed)

    def values(self, batch: dict) -> Pending[torch.Tensor]:
        """-> [B, R] values before each response token."""
        return self.sharded(lambda a, shard: a.values.remote(shard), batch, "values", combine=cat_padded)

    def update(self, batch: dict, epochs: int, minibatches: int, value_clip_eps: float | None,
               step: int) -> Pending[dict]:
        return self.sharded(lambda a, shard: a.update.remote(shard, epochs=epochs, minibatches=minibatches,
                                                             value_clip_eps=value_clip_eps, step=step),
                            batch, "update", combine=mean_dicts)
