"""Multi-digit arithmetic and short word problems with a final-answer format.

``What is 347 + 589?`` -> ``Answer: 936``; a word problem's solution shows its steps first
(``3 * 4 = 12. 5 + 12 = 17.``) and ends the same way. The canonical problem (operator and operands,
commutative ones sorted; a word problem's template and numbers, not its names) decides the split,
so a held-out sum is never a training sum written the other way round or about other people.
The checker is the ``numeric`` rule on the final answer.
"""

from __future__ import annotations

import random

from raylm.tasks.common import Problem, generate
from raylm.tasks.rules import numeric_match

FAMILY = "arithmetic"
REWARD = {"rule": "numeric", "abs_tol": 1e-6}

NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Max", "Noor", "Omar", "Pia")
THINGS = ("apple", "book", "coin", "marble", "pencil", "shell", "stamp", "sticker", "card", "egg")
WORD_FRACTION = 0.4


def _answer_messages(steps: str, result: int) -> list[dict]:
    text = f"{steps}\nAnswer: {result}" if steps else f"Answer: {result}"
    return [{"role": "assistant", "content": text}]


def _wrong(rng: random.Random, result: int) -> int:
    """A plausible slip: off by one, by ten, or by a hundred (a dropped carry)."""
    return result + rng.choice([d for d in (-100, -10, -1, 1, 10, 100) if result + d >= 0])


def _sample_expression(rng: random.Random) -> Problem:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 9)
        result = a * b
    else:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        if op == "-" and b > a:
            a, b = b, a
        result = a + b if op == "+" else a - b
    key = f"{min(a, b)}{op}{max(a, b)}" if op in "+*" else f"{a}{op}{b}"
    wrong = _wrong(rng, result)
    return Problem(FAMILY, key, f"What is {a} {op} {b}?", str(result), _answer_messages("", result),
                   _answer_messages("", wrong))


def _sample_word(rng: random.Random) -> Problem:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.choice(("more", "less", "boxes", "bags", "share"))
    if kind == "more":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        text = f"{name} has {a} {thing}s and gets {b} more. How many {thing}s does {name} have now?"
        result, steps, key = a + b, f"{a} + {b} = {a + b}.", f"more:{min(a, b)},{max(a, b)}"
    elif kind == "less":
        a = rng.randint(10, 99)
        b = rng.randint(1, a - 1)
        text = f"{name} has {a} {thing}s and gives away {b}. How many {thing}s are left?"
        result, steps, key = a - b, f"{a} - {b} = {a - b}.", f"less:{a},{b}"
    elif kind == "boxes":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        text = f"{name} buys {a} boxes with {b} {thing}s in each. How many {thing}s is that?"
        result, steps, key = a * b, f"{a} * {b} = {a * b}.", f"boxes:{min(a, b)},{max(a, b)}"
    elif kind == "bags":
        a, b, c = rng.randint(1, 50), rng.randint(2, 9), rng.randint(2, 9)
        text = f"{name} has {a} {thing}s and buys {b} bags of {c}. How many {thing}s does {name} have now?"
        result = a + b * c
        steps, key = f"{b} * {c} = {b * c}. {a} + {b * c} = {result}.", f"bags:{a},{min(b, c)},{max(b, c)}"
    else:
        b, q = rng.randint(2, 9), rng.randint(2, 12)
        a = b * q
        text = f"{a} {thing}s are shared equally by {b} friends. How many {thing}s does each friend get?"
        result, steps, key = q, f"{a} / {b} = {q}.", f"share:{a},{b}"
    wrong = _wrong(rng, result)
    wrong_steps = steps.rsplit("=", 1)[0] + f"= {wrong}."
    return Problem(FAMILY, "word:" + key, text, str(result), _answer_messages(steps, result),
                   _answer_messages(wrong_steps, wrong))


def sample(rng: random.Random) -> Problem:
    return _sample_word(rng) if rng.random() < WORD_FRACTION else _sample_expression(rng)


def problems(split: str, n: int, seed: int = 0) -> list[Problem]:
    return generate(FAMILY, sample, split, n, seed)


def score(problem: Problem, completion: str) -> float:
    return numeric_match(completion, problem.answer)


# ---- the eval task: lm-evaluation-harness generate_until, the bare number after "Answer:" -----
EVAL_SPEC = {
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "answer",
    "generation_kwargs": {"until": ["\n"], "max_gen_toks": 16, "do_sample": False},
    # " 936." and "936" both match 936; a comma as thousands separator too
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                     "regexes_to_ignore": [",", "\\$", "^\\s+", "\\.?\\s*$"]}],
}


def eval_docs(problem: Problem) -> list[dict]:
    return [{"id": problem.id, "question": problem.prompt, "answer": problem.answer}]
