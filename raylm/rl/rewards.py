"""What a rollout scores: the reward model's score of the whole conversation, a verifiable reward
(a rule or a user's function, scored on the decoded answer by the rule-reward actors), or both
weighted: ``model_weight * model + rule_weight * rule``. A rule that fails on an item (a crash or a
hang in user code, a record without a reference) scores that item's failure score; the run goes on
and counts the failures."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raylm.rl.config import Config
from raylm.rl.pools import Pools
from raylm.rl.prompts import Task


@dataclass
class Scores:
    total: torch.Tensor  # [B]: what the policy is trained on (before normalisation)
    model: torch.Tensor | None  # the reward model's scores, where there is one
    rule: torch.Tensor | None  # the verifiable reward's, where there is one
    rule_failures: torch.Tensor | None = None  # [B] bool: the rule could not score the item (crash, timeout, bad record)

    @property
    def rule_failed(self) -> int:
        return int(self.rule_failures.sum()) if self.rule_failures is not None else 0

    def rows(self, index: torch.Tensor) -> "Scores":
        pick = lambda x: x[index] if x is not None else None  # noqa: E731
        return Scores(self.total[index], pick(self.model), pick(self.rule), pick(self.rule_failures))

    @staticmethod
    def concat(parts: list["Scores"]) -> "Scores":
        cat = lambda name: (torch.cat([getattr(p, name) for p in parts])  # noqa: E731
                            if getattr(parts[0], name) is not None else None)
        return Scores(cat("total"), cat("model"), cat("rule"), cat("rule_failures"))

    def metrics(self, prefix: str = "reward") -> dict:
        out = {}
        if self.model is not None:
            out[f"{prefix}/model_mean"] = self.model.mean().item()
        if self.rule is not None:
            out[f"{prefix}/rule_mean"] = self.rule.mean().item()
            out[f"{prefix}/rule_failures"] = self.rule_failed
        return out


def score_rollouts(config: Config, pools: Pools, task: Task, owners: list[dict], prompts: list[list[int]],
                   responses: list[list[int]], texts: list[str] | None = None) -> Scores:
    """``owners[i]``: the prompt record rollout i answers; ``texts``: what the rule scores instead of the
    decoded responses (a tool episode's transcript)."""
    model = rule = failed = None
    if pools.reward is not None:
        model = pools.score([task.reward_sequence(p, r) for p, r in zip(prompts, responses)])
    if pools.rules is not None:
        records = [{k: v for k, v in o.items() if k != "ids"} for o in owners]
        out = pools.rules.score(records, texts if texts is not None else [task.text(r) for r in responses])
        rule = torch.tensor(out["scores"], dtype=torch.float32)
        failed = torch.tensor([not ok for ok in out["ok"]])
    if model is not None and rule is not None:
        total = config.reward.model_weight * model + config.reward.rule_weight * rule
    else:
        total = model if model is not None else rule
    return Scores(total, model, rule, failed)
