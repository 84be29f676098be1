"""What every task family shares: the problem record, the hash split, and the seeded generator."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

SPLITS = ("train", "heldout")
HELD_OUT_PER_MILLE = 200  # a fifth of the problem space is held out


@dataclass
class Problem:
    """One task instance.

    ``key`` is the problem's canonical form (what makes two instances the same problem, e.g. the
    operands and operator, not the names in a word problem); its hash alone decides the split.
    ``solution`` and ``wrong_solution`` are the messages that follow the user's prompt (OpenAI style
    ``{"role", "content"}``, with ``tool_calls`` where a tool is called): the reference and a
    plausible wrong one. ``data`` is what the family's checker needs beyond the answer."""

    family: str
    key: str
    prompt: str
    answer: str
    solution: list[dict]
    wrong_solution: list[dict]
    data: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.family}-{hashlib.sha256(self.key.encode()).hexdigest()[:12]}"

    @property
    def messages(self) -> list[dict]:
        """The whole reference conversation: the user's prompt, then the solution."""
        return [{"role": "user", "content": self.prompt}, *self.solution]


@dataclass
class RewardResult:
    """A reward for one completion. ``ok`` False: the scorer itself failed (a user function that
    raised, hung or returned no number; a record it cannot score): ``score`` is then the failure
    score. A wrong answer, or a model's code that crashed, is ``ok`` with score 0.0. ``reason``
    says why in either case."""

    score: float
    ok: bool = True
    reason: str = "ok"


def split_of(family: str, key: str) -> str:
    """``"train"`` or ``"heldout"``, from a hash of the family and the canonical problem alone, so a
    problem lands in the same split whatever seed, count or order generated it."""
    digest = hashlib.sha256(f"raylm.tasks/{family}/{key}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % 1000 < HELD_OUT_PER_MILLE else "train"


def generate(family: str, sample: Callable[[random.Random], Problem], split: str, n: int, seed: int,
             max_draws_per_problem: int = 200) -> list[Problem]:
    """``n`` distinct problems of ``split``: draws from ``sample`` (seeded by family, split and seed)
    and keeps the first draw of each key that hashes into ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n: expected a non-negative count, got {n}")
    rng = random.Random(f"{family}/{split}/{seed}")  # a str seed hashes the same in every process
    problems, seen, draws = [], set(), 0
    while len(problems) < n:
        if draws >= max_draws_per_problem * max(n, 1):
            raise ValueError(f"{family}: only {len(problems)} distinct {split} problems in {draws} draws; "
                             f"the family's problem space is smaller than the {n} asked for")
        draws += 1
        problem = sample(rng)
        if problem.key in seen or split_of(family, problem.key) != split:
            continue
        seen.add(problem.key)
        problems.append(problem)
    return problems
