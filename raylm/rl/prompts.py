"""RLHF's prompts: the task (prompts in the policy's chat format, what the reward model reads, the
ground truth where prompts carry a reference), the seeded epoch sampler over them, and one sampling
seed per rollout."""

from __future__ import annotations

import numpy as np

from raylm.config import ConfigError
from raylm.data.jsonl import records
from raylm.rl.config import PER_ITEM, Config


class Task:
    """Prompts in the chat format the policy was fine-tuned on, what the reward model reads, and the
    ground truth (word-overlap F1 with the reference answer, where the prompts carry one)."""

    def __init__(self, config: Config):
        from raylm.data.chat_template import ChatTemplate
        from raylm.models.hf_checkpoint import load_config

        self.template = ChatTemplate(config.tokenizer_file)
        # What ends an answer: the template's end-of-turn token, then every end id of the policy's
        # config, which the engines stop on too (Qwen2.5's <|endoftext|> beside <|im_end|>, Llama 3's
        # <|end_of_text|> and <|eom_id|> beside <|eot_id|>).
        end_ids = load_config(config.policy.checkpoint)[0].end_token_ids
        self.stop_ids = list(dict.fromkeys([self.template.end_id, *end_ids]))
        self.train, self.held_out = self.load(config)
        if not self.train:
            raise ConfigError(f"data: no prompt of at most {config.data.max_prompt_tokens} tokens")

    def load(self, config: Config) -> tuple[list[dict], list[dict]]:
        data = config.data
        if data.prompts is not None:
            items = read_prompts(data.prompts, config.reward.rule == PER_ITEM)
            held_out = read_prompts(data.held_out, config.reward.rule == PER_ITEM) if data.held_out else []
        else:
            from raylm.data.stdlib_task import stdlib_prompts

            items = stdlib_prompts("train", data.limit, data.validation_fraction, config.seed)
            held_out = stdlib_prompts("validation", data.limit, data.validation_fraction, config.seed)
        keep = []
        for subset in (items, held_out):
            out = []
            for item in subset:
                ids = self.prompt_ids(item)
                if len(ids) <= data.max_prompt_tokens:
                    out.append({**item, "ids": ids})
            keep.append(out)
        return keep[0], keep[1]

    def prompt_ids(self, item: dict) -> list[int]:
        return self.template.prompt([{"role": "user", "content": item["prompt"]}])

    def reward_sequence(self, prompt_ids: list[int], response: list[int]) -> list[int]:
        """The conversation as the reward model was trained on it, closed as the chat template closes
        an assistant message (raylm's: ... response <|end|> <|eos|>). An answer the model ended with
        another end id (EOS) is closed as the template closes it: that id gives way to the end of turn."""
        if response and response[-1] in self.stop_ids and response[-1] != self.template.end_id:
            response = response[:-1]
        return self.template.close(prompt_ids, response)

    def text(self, response: list[int]) -> str:
        return self.template.tokenizer.decode([t for t in response if t != self.template.end_id])

    def ground_truth(self, item: dict, response: list[int]) -> float | None:
        from raylm.data.stdlib_task import reference_score

        if not item.get("reference"):
            return None
        return reference_score(self.text(response), item["reference"])


def read_prompts(path: str, needs_reward: bool) -> list[dict]:
    """A JSONL file of prompt records; ``needs_reward``: each must carry its own ``reward`` spec."""
    items = []
    with open(path, "rb") as f:
        for number, item in records(f, path, error=ConfigError):
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise ConfigError(f"{path}:{number}: 'prompt': must be a string")
            if needs_reward and "reward" not in item:
                raise ConfigError(f"{path}:{number}: 'reward': missing (reward.rule: per_item reads each record's own)")
            items.append(item)
    return items


class PromptSampler:
    """Epochs over the prompts, each a fresh seeded shuffle."""

    def __init__(self, items: list[dict], seed: int):
        self.items, self.rng = items, np.random.default_rng(seed)
        self.order, self.position = self.rng.permutation(len(items)), 0

    def next(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.position == len(self.order):
                self.order, self.position = self.rng.permutation(len(self.items)), 0
            out.append(self.items[self.order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"order": self.order.tolist(), "position": self.position, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if len(state["order"]) != len(self.items):
            raise ValueError(f"prompt sampler: the checkpoint shuffled {len(state['order'])} prompts, this run has "
                             f"{len(self.items)} (data: changed since the checkpoint was written)")
        self.order, self.position = np.array(state["order"]), int(state["position"])
        self.rng.bit_generator.state = state["rng"]


def rollout_seeds(seed: int, step: int, n: int, start: int = 0) -> list[int]:
    """One sampling seed per rollout of a step (``start``: past those of the step's earlier rounds):
    a resumed run samples what the uninterrupted one did."""
    return [(seed * 1_000_003 + step) * 100_003 + start + i for i in range(n)]
