"""Reward specs -> scorers of (prompt record, completion) batches.

A spec, in a config or in each RL prompt record's ``"reward"`` field, is one of:

- a rule: ``{"rule": "exact_match" | "regex" | "numeric", ...options}`` (``raylm.tasks.rules``),
  scored against the record's ``"reference"``;
- a built-in family's checker: ``{"rule": "tool_use"}`` (the whole transcript, see
  ``tool_use.check_transcript``) or ``{"rule": "string_transform"}`` (the code run on the record's
  ``"tests"``);
- a user's function: ``{"function": "module:function" | "file.py:function", "timeout_s": 5}``;
- a bare string: a rule's name, or a function reference (it has a ``:`` or ends in ``.py``).

``Reward(None)`` reads each record's own ``"reward"`` spec (a prompt set may mix families).
Every scorer returns one ``RewardResult`` per item and never raises for an item: what goes wrong
with one is that item's failure, with the reason.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable

from raylm.config import ConfigError
from raylm.tasks import string_transform, tool_use
from raylm.tasks.common import RewardResult
from raylm.tasks.reward_functions import FunctionReward
from raylm.tasks.rules import RULES, RuleError, extract_answer, rule_from_config

CHECKERS: dict[str, Callable[[dict, object], RewardResult]] = {
    "tool_use": lambda item, completion: tool_use.check_transcript(item, completion),
    "string_transform": lambda item, completion: string_transform.check_code(completion, item["tests"]),
}
FUNCTION_KEYS = {"function", "timeout_s", "failure_score"}


class RuleReward:
    """A rule or a family's checker, run in this process (our own code: no child needed; the
    string-transformation checker starts its own sandboxed child per item)."""

    def __init__(self, spec: dict, where: str = "reward"):
        self.name = spec["rule"]
        if self.name in CHECKERS:
            if len(spec) > 1:
                raise RuleError(f"{where}: rule {self.name!r} takes no options, got {sorted(set(spec) - {'rule'})}")
            self.checker = CHECKERS[self.name]
            self.rule = None
        else:
            self.rule = rule_from_config(spec, where)
            default = inspect.signature(RULES[self.name]).parameters["extract"].default
            self.extracts = spec.get("extract", default)

    def __call__(self, prompt: str, completion, item: dict) -> RewardResult:
        try:
            if self.rule is None:
                return self.checker(item, completion)
            if "reference" not in item:
                return RewardResult(0.0, ok=False, reason="the prompt record has no 'reference'")
            if not isinstance(completion, str):
                return RewardResult(0.0, ok=False, reason=f"completion is {type(completion).__name__}, not text")
            score = self.rule(completion, str(item["reference"]))
            if score == 0.0 and self.extracts and extract_answer(completion) is None:
                return RewardResult(score, reason="no final answer ('Answer: ...', '#### ...' or '\\boxed{...}')")
            return RewardResult(score, reason="ok" if score else "wrong answer")
        except Exception as e:  # a bad record (no tests, a reference that is no number) fails its item only
            return RewardResult(0.0, ok=False, reason=f"{type(e).__name__}: {e}")

    def close(self) -> None:
        pass


def parse_spec(spec, where: str = "reward") -> dict:
    """Any accepted form of a spec -> its mapping form, checked."""
    if isinstance(spec, str):
        is_function = ":" in spec or spec.endswith(".py")
        spec = {"function": spec} if is_function else {"rule": spec}
    if not isinstance(spec, dict):
        raise RuleError(f"{where}: expected a rule name, a function reference or a mapping, got {spec!r}")
    if "function" in spec:
        unknown = set(spec) - FUNCTION_KEYS
        if unknown:
            raise RuleError(f"{where}.{sorted(unknown)[0]}: not a key of a function reward (keys: {', '.join(sorted(FUNCTION_KEYS))})")
        if not isinstance(spec["function"], str):
            raise RuleError(f"{where}.function: expected 'module:function' or 'file.py:function', got {spec['function']!r}")
        timeout = spec.get("timeout_s", 5.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise RuleError(f"{where}.timeout_s: expected a positive number of seconds, got {timeout!r}")
        return spec
    if "rule" not in spec:
        raise RuleError(f"{where}: give 'rule' (one of {', '.join([*RULES, *CHECKERS])}) or 'function'")
    if spec["rule"] not in RULES and spec["rule"] not in CHECKERS:
        raise RuleError(f"{where}.rule: {spec['rule']!r} is not one of {', '.join([*RULES, *CHECKERS])}")
    return spec


def make_scorer(spec, where: str = "reward", timeout_s: float | None = None):
    """One spec -> a callable ``(prompt, completion, item) -> RewardResult`` with ``close()``."""
    spec = parse_spec(spec, where)
    if "function" in spec:
        return FunctionReward(spec["function"], timeout_s=spec.get("timeout_s", timeout_s or 5.0),
                              failure_score=spec.get("failure_score", 0.0))
    return RuleReward(spec, where)


class Reward:
    """Scores batches of (prompt record, completion) with one spec, or with each record's own. A bad
    spec given here is a ``RuleError`` now, a function that cannot be loaded a
    ``RewardFunctionError``; a bad spec in a record fails that record's items, with the reason."""

    def __init__(self, spec=None, timeout_s: float | None = None):
        self.timeout_s = timeout_s
        self.fixed = make_scorer(spec, timeout_s=timeout_s) if spec is not None else None
        self.per_spec: dict[str, object] = {}

    def _scorer_of(self, item: dict, index: int):
        if self.fixed is not None:
            return self.fixed
        if "reward" not in item:
            raise RuleError(f"item {index}: no 'reward' spec in the prompt record and none given to the scorer")
        key = json.dumps(item["reward"], sort_keys=True)
        if key not in self.per_spec:
            try:
                self.per_spec[key] = make_scorer(item["reward"], "reward", self.timeout_s)
            except ConfigError as e:  # remembered: the spec is not tried again for every item
                self.per_spec[key] = e
        if isinstance(self.per_spec[key], ConfigError):
            raise self.per_spec[key]
        return self.per_spec[key]

    def score(self, items: list[dict], completions: list) -> list[RewardResult]:
        if len(items) != len(completions):
            raise ValueError(f"{len(items)} prompt records but {len(completions)} completions")
        results = []
        for index, (item, completion) in enumerate(zip(items, completions)):
            if not isinstance(item, dict):
                results.append(RewardResult(0.0, ok=False, reason=f"item {index}: not a prompt record"))
                continue
            try:
                scorer = self._scorer_of(item, index)
            except ConfigError as e:  # a bad spec in one record fails that record only
                results.append(RewardResult(0.0, ok=False, reason=str(e)))
                continue
            results.append(scorer(item.get("prompt", ""), completion, item))
        return results

    def close(self) -> None:
        for scorer in [self.fixed, *self.per_spec.values()]:
            if scorer is not None and not isinstance(scorer, ConfigError):
                scorer.close()

