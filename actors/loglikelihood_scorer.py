"""Log-likelihood scoring as a Ray Data ``map_batches`` actor.

``LoglikelihoodScorer`` loads any Hugging Face causal LM (raylm's own checkpoints are Llama/Mixtral/
Qwen2-MoE folders) once per actor and scores rows ``{id, tokens, n_scored}``: the summed log-prob of
the last ``n_scored`` tokens of ``tokens`` given everything before them, and whether each of them was
the greedy choice. Multiple-choice answers and perplexity windows are both such rows. (A reward
model's scores of such rows: ``actors/reward_scorer.py``.)
"""

from __future__ import annotations

import numpy as np

# torch is imported inside the actors' methods: the driver that starts them needs this module for
# the classes alone, and importing torch would cost it 1.5-2.5 s of CPU (the actors' workers have
# it already, raylm.ray_init).


def _micro_batches(lengths: list[int], max_batch: int, max_tokens: int) -> list[list[int]]:
    """Row indices grouped longest first, so each micro-batch pads little and fits ``max_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) >= max_batch or lengths[current[0]] * (len(current) + 1) > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


RAYLM_MODEL_TYPES = ("llama", "mixtral", "qwen2_moe")  # what raylm.models.hf_checkpoint loads


class LoglikelihoodScorer:
    """raylm checkpoints are scored by raylm's own model with shared-prefix packing (the answers of
    one question share one pass over the question: ``raylm.eval.scoring``); any other causal LM
    through transformers, in padded batches of similar length."""

    def __init__(self, checkpoint_dir: str, dtype: str = "float32", max_batch: int = 32, max_tokens: int = 8192,
                 num_threads: int | None = None):
        import torch

        if num_threads is not None:  # torch sizes its thread pool once, when first used, from OMP_NUM_THREADS, which
            torch.set_num_threads(num_threads)  # Ray sets too late for a worker that had torch imported at start
        self.dtype, self.max_batch, self.max_tokens = dtype, max_batch, max_tokens
        self.load(checkpoint_dir)

    def load(self, checkpoint_dir: str) -> None:
        """Score with this checkpoint from now on: one pool of scorers serves an evaluation's checkpoints in turn."""
        import json
        from pathlib import Path

        import torch

        model_type = json.loads((Path(checkpoint_dir) / "config.json").read_text()).get("model_type")
        self.raylm_model = self.model = None
        if model_type in RAYLM_MODEL_TYPES:
            from raylm.models.hf_checkpoint import load_checkpoint

            self.raylm_model = load_checkpoint(checkpoint_dir, dtype=getattr(torch, self.dtype)).eval()
        else:
            import transformers

            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                checkpoint_dir, dtype=getattr(torch, self.dtype), local_files_only=True
            ).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        sequences = [[int(t) for t in seq] for seq in batch["tokens"]]
        n_scored = [int(n) for n in batch["n_scored"]]
        with torch.inference_mode():
            if self.raylm_model is not None:
                from raylm.eval.scoring import score_requests

                logprob, greedy = score_requests(self.raylm_model, sequences, n_scored, batch_tokens=self.max_tokens,
                                                 max_requests=self.max_batch)
                return {"id": batch["id"], "logprob": np.asarray(logprob, dtype=np.float64),
                        "is_greedy": np.asarray(greedy)}
            return self._score_padded(batch["id"], sequences, n_scored)

    def _score_padded(self, ids, sequences: list[list[int]], n_scored: list[int]) -> dict[str, np.ndarray]:
        import torch

        logprob = np.zeros(len(sequences), dtype=np.float64)
        greedy = np.zeros(len(sequences), dtype=bool)
        inputs = [s[:-1] for s in sequences]  # the last token is only ever a target
        for rows in _micro_batches([len(x) for x in inputs], self.max_batch, self.max_tokens):
            width = len(inputs[rows[0]])
            tokens = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):  # right padding: real tokens keep positions 0..n-1
                tokens[r, : len(inputs[i])] = torch.tensor(inputs[i])
                mask[r, : len(inputs[i])] = 1
            logits = self.model(input_ids=tokens, attention_mask=mask).logits.float()
            logp = logits.log_softmax(-1)
            for r, i in enumerate(rows):
                n, k = len(inputs[i]), n_scored[i]
                if k == 0:  # nothing to score: log-prob 0 and greedy, as lm_eval has it
                    greedy[i] = True
                    continue
                targets = torch.tensor(sequences[i][-k:])
                scored = logp[r, n - k : n]
                logprob[i] = scored.gather(-1, targets[:, None]).sum().item()
                greedy[i] = bool((scored.argmax(-1) == targets).all())
        return {"id": ids, "logprob": logprob, "is_greedy": greedy}
