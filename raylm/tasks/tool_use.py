"""A tool-use task over several turns: look prices up, compute the total, answer from the results.

The conversation, as OpenAI-style messages that any chat template can render::

    user:      How much do 3 apples and 2 pears cost? Use the tools.
    assistant: <tool_call>{"name": "price", "arguments": {"item": "apples"}}</tool_call>   (+ tool_calls)
    tool:      4
    assistant: <tool_call>{"name": "price", "arguments": {"item": "pears"}}</tool_call>
    tool:      7
    assistant: <tool_call>{"name": "calculator", "arguments": {"expression": "3*4+2*7"}}</tool_call>
    tool:      26
    assistant: Answer: 26

The call is JSON inside ``<tool_call>...</tool_call>`` in the assistant's text (what a model
generates); the same call is also given as ``tool_calls`` for templates that render those. A
template with only system/user/assistant roles (raylm's today) gets the result as a user turn
``<tool_result>26</tool_result>`` (``to_basic_roles``): SFT then trains on the calls and the answer,
never on the results.

``run_episode`` plays a policy against the real tools; ``check_transcript`` scores a whole
transcript: every tool result must be what the tool returns for that call (no invented results),
every item the question names must have been looked up, and the final answer must be right.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from raylm.tasks.common import Problem, RewardResult, generate
from raylm.tasks.rules import extract_answer, parse_number

FAMILY = "tool_use"
REWARD = {"rule": "tool_use"}
MAX_TURNS = 8  # assistant turns in one episode
PRICES = {
    "apple": 4, "pear": 7, "plum": 3, "lemon": 5, "mango": 9, "melon": 12, "onion": 2, "carrot": 1,
    "bagel": 6, "cookie": 2, "egg": 3, "candle": 8, "pencil": 1, "notebook": 5, "eraser": 2, "cup": 6,
    "plate": 9, "spoon": 4, "towel": 11, "bottle": 3, "lamp": 19, "sock": 2, "glove": 7, "hat": 15,
}
TOOLS = [  # OpenAI function schemas, for templates that list the tools
    {"type": "function", "function": {"name": "price", "description": "The price of one item.",
                                      "parameters": {"type": "object", "properties": {"item": {"type": "string"}},
                                                     "required": ["item"]}}},
    {"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic expression.",
                                      "parameters": {"type": "object",
                                                     "properties": {"expression": {"type": "string"}},
                                                     "required": ["expression"]}}},
]
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_RESULT = re.compile(r"<tool_result>(.*)</tool_result>", re.DOTALL)


# ---- the tools --------------------------------------------------------------------------------
class ToolError(ValueError):
    pass


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> float:
    """Arithmetic on numbers only (+ - * / // % ** and parentheses), walked over its ``ast``: no
    names, calls or attributes, so nothing but arithmetic can run. Exponents and sizes are capped."""
    if not isinstance(expression, str) or len(expression) > 200:
        raise ToolError("expression must be text of at most 200 characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 10 or abs(left) > 1e6):
                raise ToolError("exponent too large")
            try:
                value = _BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
            if abs(value) > 1e15:
                raise ToolError("result too large")
            return value
        raise ToolError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")

    return walk(tree)


def format_number(value: float) -> str:
    if isinstance(value, complex) or not math.isfinite(value):
        raise ToolError("result is not a finite real number")
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def item_named(word: str) -> str:
    """The item a word names: ``"Gloves"`` -> ``glove`` (the price tool's reading of its argument)."""
    return word.strip().lower().removesuffix("s")


def written(item: str, count: int) -> str:
    """An item as a question writes it after its count: ``gloves`` for several, ``glove`` for one."""
    return f"{item}s" if count > 1 else item


def price(item: str) -> int:
    if not isinstance(item, str) or item_named(item) not in PRICES:
        raise ToolError(f"unknown item {item!r}")
    return PRICES[item_named(item)]


TOOL_FUNCTIONS: dict[str, Callable[..., object]] = {
    "price": lambda item: str(price(item)),
    "calculator": lambda expression: format_number(calculate(expression)),
}


@dataclass
class ToolCall:
    name: str | None  # None: the call could not be read
    arguments: dict
    result: str       # what the tool returned, or "error: ..."


def run_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>`` block of an assistant message, run: a block that is not a valid call
    (bad JSON, an unknown tool, wrong arguments) gets an ``error: ...`` result the model can read."""
    calls = []
    for block in _CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError as e:
            calls.append(ToolCall(None, {}, f"error: tool call is not valid JSON ({e.msg})"))
            continue
        if not isinstance(call, dict) or not isinstance(call.get("arguments", {}), dict):
            calls.append(ToolCall(None, {}, 'error: a tool call is {"name": ..., "arguments": {...}}'))
            continue
        name, arguments = call.get("name"), call.get("arguments", {})
        if name not in TOOL_FUNCTIONS:
            calls.append(ToolCall(None, arguments, f"error: unknown tool {name!r} (tools: {', '.join(TOOL_FUNCTIONS)})"))
            continue
        try:
            result = TOOL_FUNCTIONS[name](**arguments)
        except TypeError:
            result = f"error: wrong arguments {sorted(arguments)} for {name}"
        except ToolError as e:
            result = f"error: {e}"
        calls.append(ToolCall(name, arguments, result))
    return calls


# ---- messages ---------------------------------------------------------------------------------
def call_message(name: str, arguments: dict, call_id: str) -> dict:
    payload = json.dumps({"name": name, "arguments": arguments})
    return {"role": "assistant", "content": f"<tool_call>{payload}</tool_call>",
            "tool_calls": [{"id": call_id, "type": "function",
                            "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def result_message(result: str, call_id: str, name: str | None) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "name": name or "invalid", "content": result}


def to_basic_roles(messages: list[dict]) -> list[dict]:
    """The conversation with system/user/assistant roles only: a tool result becomes a user turn
    ``<tool_result>...</tool_result>``; ``tool_calls`` are dropped (the call is in the text)."""
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_result>{m['content']}</tool_result>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def render_plain(messages: list[dict]) -> str:
    """Plain text for base-model prompts (the eval task): ``User: ...``, ``Assistant: ...``, ``Tool: ...``."""
    names = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
    return "".join(f"{names[m['role']]}: {m['content']}\n" for m in messages)


# ---- problems ---------------------------------------------------------------------------------
def sample(rng: random.Random) -> Problem:
    n_items = rng.choice((1, 2))
    items = rng.sample(sorted(PRICES), n_items)
    counts = [rng.randint(1, 9) for _ in items]
    # The item as the question writes it ("gloves", "1 glove"): the look-up copies that word, and the
    # price tool reads a plural as its item.
    words = [written(item, c) for c, item in zip(counts, items)]
    phrase = " and ".join(f"{c} {word}" for c, word in zip(counts, words))
    verb = "cost" if n_items > 1 or counts[0] > 1 else "costs"
    prompt = f"How much do {phrase} {verb}? Use the tools." if verb == "cost" else f"How much does {phrase} cost? Use the tools."
    expression = "+".join(f"{c}*{PRICES[item]}" for c, item in zip(counts, items))
    total = sum(c * PRICES[item] for c, item in zip(counts, items))
    solution, turn = [], 0
    for item, word in zip(items, words):
        turn += 1
        solution += [call_message("price", {"item": word}, f"call_{turn}"),
                     result_message(str(PRICES[item]), f"call_{turn}", "price")]
    turn += 1
    solution += [call_message("calculator", {"expression": expression}, f"call_{turn}"),
                 result_message(str(total), f"call_{turn}", "calculator"),
                 {"role": "assistant", "content": f"Answer: {total}"}]
    # The plausible failure: answering at once, with a guessed total and no look-up.
    wrong = [{"role": "assistant", "content": f"Answer: {total + rng.choice((-3, -2, -1, 1, 2, 3))}"}]
    key = ",".join(f"{item}x{c}" for item, c in sorted(zip(items, counts)))
    return Problem(FAMILY, key, prompt, str(total), solution, wrong,
                   {"items": items, "counts": counts, "tools": TOOLS})


def problems(split: str, n: int, seed: int = 0) -> list[Problem]:
    return generate(FAMILY, sample, split, n, seed)


# ---- playing and checking episodes ------------------------------------------------------------
def run_episode(prompt: str, policy: Callable[[list[dict]], str], max_turns: int = MAX_TURNS) -> list[dict]:
    """The conversation a ``policy`` (messages so far -> the next assistant text) has with the real
    tools, from the user's ``prompt``: each of its tool calls is run and answered with a tool
    message; it ends at an assistant turn without a tool call, or after ``max_turns`` turns."""
    messages = [{"role": "user", "content": prompt}]
    n_calls = 0
    for _ in range(max_turns):
        text = policy(messages)
        calls = run_tool_calls(text)
        message = {"role": "assistant", "content": text}
        ids = [f"call_{n_calls + i + 1}" for i in range(len(calls))]
        n_calls += len(calls)
        if calls:
            message["tool_calls"] = [{"id": i, "type": "function",
                                      "function": {"name": c.name or "invalid", "arguments": json.dumps(c.arguments)}}
                                     for i, c in zip(ids, calls)]
        messages.append(message)
        if not calls:
            break
        messages += [result_message(c.result, i, c.name) for i, c in zip(ids, calls)]
    return messages


def _call_text(call: dict) -> str:
    """An OpenAI ``tool_calls`` entry as the ``<tool_call>`` text a model writes."""
    function = call.get("function", {}) if isinstance(call, dict) else {}
    try:
        arguments = json.loads(function.get("arguments", "{}"))
    except (TypeError, json.JSONDecodeError):
        return f"<tool_call>{function.get('arguments')!r}</tool_call>"  # unreadable: run_tool_calls says so
    return f"<tool_call>{json.dumps({'name': function.get('name'), 'arguments': arguments})}</tool_call>"


def _transcript(messages) -> list[dict]:
    if isinstance(messages, str):
        try:
            parsed = json.loads(messages)
        except json.JSONDecodeError:
            parsed = None
        messages = parsed if isinstance(parsed, list) else [{"role": "assistant", "content": messages}]
    out = []
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "assistant" and m.get("content") is None and m.get("tool_calls"):
            m = {"role": "assistant", "content": "".join(_call_text(c) for c in m["tool_calls"])}  # OpenAI: calls only
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool") \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"not a message: {str(m)[:200]}")
        result = _RESULT.fullmatch(m["content"].strip()) if m["role"] == "user" else None
        out.append({"role": "tool", "content": result.group(1)} if result else m)
    return out


def check_transcript(problem: Problem | dict, messages: list[dict] | str, max_turns: int = MAX_TURNS) -> RewardResult:
    """Score a whole episode (with or without the opening user turn; tool results as ``tool``
    messages or as ``<tool_result>`` user turns): 1.0 when every tool result is what the tool
    returns, a tool was used (every item of the question looked up, where the record names its
    ``items``), and the final answer is the total (the record's ``reference``)."""
    data = problem.data if isinstance(problem, Problem) else problem
    answer = problem.answer if isinstance(problem, Problem) else problem["reference"]
    try:
        messages = _transcript(messages)
    except ValueError as e:  # not a transcript at all: the caller's error, not the model's
        return RewardResult(0.0, False, str(e))
    start = 0
    while start < len(messages) and messages[start]["role"] in ("system", "user"):
        start += 1
    looked_up, used_tools, turns, i = set(), False, 0, start
    while i < len(messages):
        m = messages[i]
        if m["role"] != "assistant":
            return RewardResult(0.0, True, f"messages[{i}]: a {m['role']} turn where the assistant's was due")
        turns += 1
        if turns > max_turns:
            return RewardResult(0.0, True, f"more than {max_turns} assistant turns")
        calls = run_tool_calls(m["content"])
        if not calls:
            if i != len(messages) - 1:
                return RewardResult(0.0, True, f"messages[{i}]: the assistant answered, but the conversation goes on")
            missing = [item for item in data.get("items", []) if item not in looked_up]
            if not used_tools:
                return RewardResult(0.0, True, "no tool was used: the answer is not from the tools")
            if missing:
                return RewardResult(0.0, True, f"no price look-up for {', '.join(missing)}: the answer is not from the tools")
            got = extract_answer(m["content"])
            value = parse_number(got) if got is not None else None
            if value is None:
                return RewardResult(0.0, True, f"messages[{i}]: no final answer ('Answer: N')")
            if not math.isclose(value, float(answer), abs_tol=1e-6):
                return RewardResult(0.0, True, f"messages[{i}]: answer {got} is wrong")
            return RewardResult(1.0)
        for k, call in enumerate(calls):
            j = i + 1 + k
            if j >= len(messages) or messages[j]["role"] != "tool":
                return RewardResult(0.0, True, f"messages[{j}]: the result of tool call {k + 1} of messages[{i}] is missing")
            if messages[j]["content"].strip() != call.result:
                return RewardResult(0.0, True, f"messages[{j}]: tool result {messages[j]['content']!r} is not what "
                                            f"the tool returns ({call.result!r})")
            used_tools = used_tools or not call.result.startswith("error")
            if call.name == "price" and not call.result.startswith("error"):
                looked_up.add(item_named(str(call.arguments.get("item", ""))))
        i += 1 + len(calls)
    return RewardResult(0.0, True, "the conversation ends without a final answer")


def score(problem: Problem, completion: list[dict] | str) -> float:
    return check_transcript(problem, completion).score


# ---- the eval task: each assistant turn of the reference episode, given the turns before it ----
# lm-evaluation-harness runs one generation per document, so the episode is scored turn by turn
# (the tool calls, then the answer from the tool results); run_episode + check_transcript score
# whole episodes a model plays itself.
EVAL_SPEC = {
    "doc_to_text": "{{context}}",
    "doc_to_target": "target",
    "generation_kwargs": {"until": ["\n"], "max_gen_toks": 48, "do_sample": False},
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                     "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
}


def eval_docs(problem: Problem) -> list[dict]:
    messages = problem.messages
    docs = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            docs.append({"id": f"{problem.id}-turn{len(docs) + 1}", "context": render_plain(messages[:i]) + "Assistant:",
                         "target": m["content"], "answer": problem.answer})
    return docs
