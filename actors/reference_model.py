"""The reference-model pool's actor: the frozen starting policy (usually the SFT checkpoint), whose
log-probabilities of the rollouts' response tokens anchor the KL penalty."""

from __future__ import annotations

import ray
import torch

from raylm.rl.ppo import response_index, response_logits_and_logprobs


@ray.remote
class ReferenceModel:
    def __init__(self, checkpoint: str, threads: int = 1, use_gpu: bool = False):
        from raylm.models.hf_checkpoint import load_checkpoint

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.model = load_checkpoint(checkpoint, scalar_head=False).to(self.device).eval()

    def ready(self) -> bool:
        return True

    @torch.no_grad()
    def logprobs(self, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        """[b, R] log-probabilities of the response tokens (same layout as the policy trainer's),
        under softmax(logits / temperature) as the policy's are."""
        tokens = batch["tokens"].to(self.device)
        index = response_index(batch["prompt_lens"].to(self.device), batch["response_mask"].shape[1], tokens.shape[1])
        _, logprobs = response_logits_and_logprobs(self.model(tokens), tokens, index, temperature)
        return (logprobs * batch["response_mask"].to(self.device)).cpu()
