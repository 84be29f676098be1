"""Write a small Python string function; checked by running it on hidden inputs in a sandbox.

The prompt describes one or two string operations in order and shows one example; the answer is
the code of ``f(s)``, one line per operation::

    Write a Python function f(s) that reverses s, then makes it upper case. Example: f('kitab') == 'BATIK'.

    def f(s):
        s = s[::-1]
        s = s.upper()
        return s

The checker runs the completion's code (in a ```python fence or bare) in a child process
(``raylm.tasks.sandbox``: isolated, time- and memory-limited, in a temporary directory) on the
problem's test inputs and compares what comes back with the expected outputs, which never enter
the child. A program's behaviour on fixed probe strings is its canonical form, so two wordings of
the same function (``upper then reverse``, ``reverse then upper``) always share a split.
"""

from __future__ import annotations

import functools
import json
import random
import re
import secrets
import string
from dataclasses import dataclass

from raylm.tasks.common import Problem, RewardResult, generate
from raylm.tasks.sandbox import Limits, run_python

FAMILY = "string_transform"
REWARD = {"rule": "string_transform"}
N_TESTS = 5
PROBES = ("abcdef", "Hello World", "aAbBcC", "racecar", "xyz", "Mississippi", "a", "Tea Pot 42")


@functools.lru_cache(maxsize=None)
def _compiled(line: str):
    return compile(line, "<op>", "exec")


@dataclass(frozen=True)
class Op:
    name: str
    text: str      # what the prompt says
    line: str      # the line of code

    def __call__(self, s: str) -> str:
        scope = {"s": s}
        exec(_compiled(self.line), {}, scope)  # our own fixed lines, never a model's
        return scope["s"]


def _ops() -> list[Op]:
    ops = [
        Op("reverse", "reverses s", "s = s[::-1]"),
        Op("upper", "makes it upper case", "s = s.upper()"),
        Op("lower", "makes it lower case", "s = s.lower()"),
        Op("swapcase", "swaps the case of every letter", "s = s.swapcase()"),
        Op("sort", "sorts its characters", "s = ''.join(sorted(s))"),
        Op("dedupe", "keeps only the first of each repeated character", "s = ''.join(dict.fromkeys(s))"),
        Op("novowels", "removes the vowels", "s = ''.join(c for c in s if c.lower() not in 'aeiou')"),
        Op("double", "doubles every character", "s = ''.join(c * 2 for c in s)"),
        Op("nospace", "removes the spaces", "s = s.replace(' ', '')"),
    ]
    for k in (1, 2, 3, 4):
        chars = "character" if k == 1 else f"{k} characters"
        ops += [Op(f"first{k}", f"keeps its first {chars}", f"s = s[:{k}]"),
                Op(f"last{k}", f"keeps its last {chars}", f"s = s[-{k}:]"),
                Op(f"drop{k}", f"drops its first {chars}", f"s = s[{k}:]"),
                Op(f"rotate{k}", f"moves its first {chars} to the end", f"s = s[{k}:] + s[:{k}]")]
    for k in (2, 3):
        ops.append(Op(f"repeat{k}", f"repeats it {k} times", f"s = s * {k}"))
    for a, b in (("a", "o"), ("e", "i"), ("o", "0"), ("s", "z"), ("i", "1"), ("t", "7"), ("l", "L"), ("n", "m")):
        ops.append(Op(f"replace_{a}{b}", f"replaces every '{a}' with '{b}'", f"s = s.replace('{a}', '{b}')"))
    for fix in ("!", "ing", "xy", "-"):
        ops.append(Op(f"suffix_{fix}", f"adds '{fix}' at the end", f"s = s + '{fix}'"))
        ops.append(Op(f"prefix_{fix}", f"adds '{fix}' at the start", f"s = '{fix}' + s"))
    return ops


OPS = _ops()


def program_code(ops: list[Op]) -> str:
    return "def f(s):\n" + "".join(f"    {op.line}\n" for op in ops) + "    return s\n"


def apply(ops: list[Op], s: str) -> str:
    for op in ops:
        s = op(s)
    return s


def _word(rng: random.Random) -> str:
    letters = string.ascii_lowercase
    word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))
    if rng.random() < 0.3:
        word = word.capitalize()
    if rng.random() < 0.3:
        word += " " + "".join(rng.choice(letters) for _ in range(rng.randint(2, 5)))
    return word


def sample(rng: random.Random) -> Problem:
    ops = rng.sample(OPS, rng.choice((1, 2, 2, 2, 3)))
    key = json.dumps([apply(ops, p) for p in PROBES])  # the behaviour, not the wording
    inputs = []
    while len(inputs) < N_TESTS:
        word = _word(rng)
        if word not in inputs:
            inputs.append(word)
    tests = [[s, apply(ops, s)] for s in inputs]
    description = ", then ".join(op.text for op in ops)
    example_in, example_out = tests[0]
    prompt = f"Write a Python function f(s) that {description}. Example: f({example_in!r}) == {example_out!r}."
    code = program_code(ops)
    # The plausible failure: the operations in the wrong order, or one of them left out.
    wrong_ops = ops[::-1] if len(ops) == 2 and any(apply(ops[::-1], s) != o for s, o in tests) else ops[:-1] or [OPS[0]]
    if all(apply(wrong_ops, s) == o for s, o in tests):
        wrong_ops = [op for op in OPS if any(apply([op], s) != o for s, o in tests)][:1]
    return Problem(FAMILY, key, prompt, code, [{"role": "assistant", "content": code}],
                   [{"role": "assistant", "content": program_code(wrong_ops)}],
                   {"tests": tests, "ops": [op.name for op in ops]})


def problems(split: str, n: int, seed: int = 0) -> list[Problem]:
    return generate(FAMILY, sample, split, n, seed)


# ---- checking by execution --------------------------------------------------------------------
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)

# Runs in the child: the candidate's code, then f on each input; the outputs go back on one line
# behind a marker drawn per run, so nothing the candidate prints is taken for them. The expected
# outputs stay in the parent.
_HARNESS = '''
import json, sys
_inputs = json.loads(sys.stdin.readline())
_marker = sys.stdin.readline().strip()
_scope = {"__name__": "candidate"}
exec(compile(open("candidate.py", encoding="utf-8").read(), "candidate.py", "exec"), _scope)
_f = _scope.get("f")
if not callable(_f):
    raise SystemExit("the code defines no function f")
_out = []
for _s in _inputs:
    _r = _f(_s)
    _out.append(_r if isinstance(_r, str) else {"type": type(_r).__name__, "repr": repr(_r)[:80]})
sys.stdout.write("\\n" + _marker + json.dumps(_out) + "\\n")
'''


def extract_code(completion: str) -> str:
    """The code of a completion: the first ```python fenced block, else the whole text."""
    fenced = _FENCE.search(completion)
    return fenced.group(1) if fenced else completion


def check_code(completion: str, tests: list[list[str]], limits: Limits | None = None) -> RewardResult:
    """1.0 when the completion's ``f`` returns the expected output for every test input; a crash, a
    timeout, a missing ``f`` or a wrong output is 0.0 with the reason."""
    code = extract_code(completion)
    marker = "@@raylm-result-" + secrets.token_hex(8) + "@@"
    program = ("import os, sys\n"
               f"open('candidate.py', 'w', encoding='utf-8').write({code!r})\n" + _HARNESS)
    result = run_python(program, stdin=json.dumps([t[0] for t in tests]) + "\n" + marker + "\n",
                        limits=limits or Limits(timeout_s=5.0, cpu_s=5, memory_mb=512))
    if not result.ok:
        return RewardResult(0.0, True, result.reason())
    lines = [line for line in result.stdout.splitlines() if line.startswith(marker)]
    if not lines:
        return RewardResult(0.0, True, "no result came back (the code ended the process early)")
    outputs = json.loads(lines[-1][len(marker):])
    for (given, want), got in zip(tests, outputs):
        if got != want:
            return RewardResult(0.0, True, f"f({given!r}) returned {got!r}, expected {want!r}")
    return RewardResult(1.0)


def score(problem: Problem, completion: str) -> float:
    return check_code(completion, problem.data["tests"]).score


# ---- the eval task: exact match with the reference code (a lower bound on correctness: another
# correct program scores 0 here; check_code on the documents' tests runs the code itself) -----------
EVAL_SPEC = {
    "doc_to_text": "{{prompt}}",
    "doc_to_target": "code",
    "target_delimiter": "\n",
    "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 96, "do_sample": False},
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                     "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
}


def eval_docs(problem: Problem) -> list[dict]:
    return [{"id": problem.id, "prompt": problem.prompt, "code": problem.answer, "tests": problem.data["tests"]}]
