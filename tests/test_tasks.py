"""The verifiable task families (raylm.tasks): deterministic generation, train/held-out splits
disjoint by construction, every family's reference scoring 1.0 and a plausible wrong answer 0.0,
sandboxed code execution, multi-turn tool use, the files raylm's own readers take, and rule and
function rewards, in process and in the Ray actor pool (a user function that raises, hangs or
returns no number is a scored failure)."""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path

import pytest

from raylm.tasks import arithmetic, rules, string_transform, tool_use
from raylm.tasks.common import split_of
from raylm.tasks.files import FAMILIES, write_task_files
from raylm.tasks.reward_functions import FunctionReward, RewardFunctionError
from raylm.tasks.rewards import Reward
from raylm.tasks.sandbox import Limits, run_python

pytestmark = pytest.mark.timeout(300)
TASKS = Path(__file__).resolve().parents[1] / "examples" / "tasks"
FAST = Limits(timeout_s=2.0, cpu_s=2, memory_mb=256)


# ---- generation and splits -----------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generation_is_deterministic(family):
    module = FAMILIES[family]
    a, b = module.problems("train", 50, seed=3), module.problems("train", 50, seed=3)
    assert [(p.key, p.prompt, p.solution, p.wrong_solution, p.data) for p in a] == \
           [(p.key, p.prompt, p.solution, p.wrong_solution, p.data) for p in b]
    other = module.problems("train", 50, seed=4)
    assert [p.key for p in other] != [p.key for p in a]
    assert len({p.key for p in a}) == 50  # distinct problems


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_and_heldout_never_share_a_problem_whatever_the_seeds(family):
    module = FAMILIES[family]
    train = {p.key for seed in (0, 1) for p in module.problems("train", 600, seed)}
    for seed in (0, 1, 7):
        heldout = module.problems("heldout", 150, seed)
        assert all(split_of(family, p.key) == "heldout" for p in heldout)
        assert not train & {p.key for p in heldout}
    assert all(split_of(family, k) == "train" for k in train)


def test_canonical_forms_put_equivalent_problems_in_one_split():
    """The split key is the problem, not its wording: a sum either way round, a word problem about
    anyone, a string function by what it does (``upper then reverse`` is ``reverse then upper``)."""
    for p in arithmetic.problems("train", 400, 0) + arithmetic.problems("heldout", 100, 0):
        if p.key.startswith("word:"):
            assert not any(name in p.key for name in arithmetic.NAMES + arithmetic.THINGS)
        else:
            a, op, b = p.prompt.removeprefix("What is ").removesuffix("?").split()
            if op in "+*":
                assert p.key == f"{min(int(a), int(b))}{op}{max(int(a), int(b))}"
    by_name = {op.name: op for op in string_transform.OPS}
    for p in string_transform.problems("train", 200, 0):
        ops = [by_name[name] for name in p.data["ops"]]
        assert p.key == json.dumps([string_transform.apply(ops, s) for s in string_transform.PROBES])
    upper, reverse = by_name["upper"], by_name["reverse"]
    assert [string_transform.apply([upper, reverse], s) for s in string_transform.PROBES] == \
           [string_transform.apply([reverse, upper], s) for s in string_transform.PROBES]


# ---- rules ------------------------------------------------------------------------------------------
def test_answer_extraction_and_rules():
    assert rules.extract_answer("3 + 4 = 7.\nAnswer: 7") == "7"
    assert rules.extract_answer("Answer: 5\nno wait\nFinal answer: 1,234.") == "1,234."
    assert rules.extract_answer("so #### 42") == "42"
    assert rules.extract_answer("\\boxed{3/4}") == "3/4"
    assert rules.extract_answer("just 42") is None
    assert rules.numeric_match("Answer: 1,234.", "1234") == 1.0
    assert rules.numeric_match("#### 0.75", "3/4") == 1.0
    assert rules.numeric_match("Answer: 41", "42") == 0.0
    assert rules.numeric_match("Answer: 41.99", "42", abs_tol=0.05) == 1.0
    assert rules.numeric_match("Answer: 104", "100", rel_tol=0.05) == 1.0
    assert rules.numeric_match("42", "42") == 0.0  # no final-answer format
    assert rules.numeric_match("it is 42", "42", extract=False) == 1.0
    assert rules.exact_match("Answer: Paris", "paris") == 0.0
    assert rules.exact_match("Answer: Paris", "paris", ignore_case=True) == 1.0
    assert rules.regex_match("the answer is (b)", "b", pattern=r"\({reference}\)") == 1.0
    assert rules.regex_match("the answer is (c)", "b", pattern=r"\({reference}\)") == 0.0
    assert rules.regex_match("Answer: a.b", "a.b", extract=True, fullmatch=True) == 1.0
    assert rules.regex_match("Answer: axb", "a.b", extract=True, fullmatch=True) == 0.0  # the reference is escaped


@pytest.mark.parametrize("spec, message", [
    ({"rule": "fuzzy"}, "reward.rule: 'fuzzy' is not one of"),
    ({"rule": "numeric", "tolerance": 1}, "reward.tolerance: not an option of rule 'numeric'"),
    ({"rule": "numeric", "abs_tol": "big"}, "reward.abs_tol: expected a non-negative number"),
    ({"rule": "regex", "pattern": "("}, "reward.pattern: not a valid regular expression"),
    ({"rule": "exact_match", "ignore_case": "yes"}, "reward.ignore_case: expected true or false"),
    ({"function": "m:f", "timeout_s": 0}, "reward.timeout_s: expected a positive number"),
    ({"rule": "tool_use", "strict": True}, "rule 'tool_use' takes no options"),
])
def test_bad_reward_specs_name_the_key(spec, message):
    from raylm.tasks.rules import RuleError

    with pytest.raises(RuleError, match=message.replace("(", r"\(")):
        Reward(spec)


# ---- every family: reference 1.0, wrong 0.0, through the RL records' own reward specs ---------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reference_scores_one_and_wrong_answers_zero(family, tmp_path):
    module = FAMILIES[family]
    n = 6 if family == "string_transform" else 40  # code runs in a child process per item
    problems = module.problems("heldout", n, seed=11)
    written = write_task_files(family, tmp_path, n_train=5, n_heldout=n, seed=11, parts=("rl",))
    records = [json.loads(line) for line in Path(written["rl_heldout"]).read_text().splitlines()]
    assert [r["id"] for r in records] == [p.id for p in problems]

    def completion(messages):  # one assistant turn is text; a tool-use episode is its messages
        return messages if family == "tool_use" else messages[0]["content"]

    reward = Reward()  # each record's own "reward" spec
    right = reward.score(records, [completion(p.solution) for p in problems])
    wrong = reward.score(records, [completion(p.wrong_solution) for p in problems])
    assert [r.score for r in right] == [1.0] * n, [r.reason for r in right if r.score != 1.0]
    assert [r.score for r in wrong] == [0.0] * n
    assert all(r.ok for r in right + wrong)
    if family == "arithmetic":
        assert {r.reason for r in wrong} == {"wrong answer"}
        silent = reward.score(records[:1], ["936"])[0]
        assert silent.score == 0.0 and silent.reason.startswith("no final answer")
        no_reference = Reward("numeric").score([{"prompt": "p"}], ["Answer: 1"])[0]
        assert not no_reference.ok and no_reference.reason == "the prompt record has no 'reference'"
    assert all(module.score(p, completion(p.solution)) == 1.0 for p in problems)


def test_arithmetic_answers_are_the_arithmetic():
    for p in arithmetic.problems("train", 200, 5):
        if not p.key.startswith("word:"):
            expression = p.prompt.removeprefix("What is ").removesuffix("?")
            assert int(p.answer) == eval(expression)  # our own generated "a op b"
        assert p.solution[0]["content"].endswith(f"Answer: {p.answer}")
        assert rules.numeric_match(p.wrong_solution[0]["content"], p.answer) == 0.0


# ---- the sandbox --------------------------------------------------------------------------------------
def test_sandbox_isolates_and_limits(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLM_SECRET_TOKEN", "hunter2")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    result = run_python("import os, sys\nprint(sorted(os.environ))\nprint(os.getcwd())\nprint(sys.flags.isolated)",
                        limits=FAST)
    assert result.ok, result.stderr
    env, cwd, isolated = result.stdout.splitlines()
    assert "RAYLM_SECRET_TOKEN" not in env and "PYTHONPATH" not in env
    assert "raylm-sandbox-" in cwd and not Path(cwd).exists()  # its own temporary directory, deleted
    assert isolated == "1"
    hang = run_python("while True: pass", limits=Limits(timeout_s=1.0, cpu_s=5))
    assert hang.timed_out and not hang.ok and hang.reason() == "timed out"
    crash = run_python("raise KeyError('gone')", limits=FAST)
    assert crash.returncode == 1 and crash.reason() == "exited with status 1: KeyError: 'gone'"
    memory = run_python("x = bytearray(512 * 1024 * 1024)", limits=FAST)
    assert not memory.ok and "MemoryError" in memory.reason()
    cpu = run_python("while True: pass", limits=Limits(timeout_s=30.0, cpu_s=1))
    assert not cpu.timed_out and cpu.reason() == "killed by signal SIGXCPU"
    big_file = run_python("open('f', 'wb').write(bytes(2 * 1024 * 1024))", limits=Limits(timeout_s=5.0, file_size_mb=1))
    assert not big_file.ok


def test_code_checker_scores_crashes_and_timeouts_as_failures():
    p = string_transform.problems("train", 1, seed=2)[0]
    tests = p.data["tests"]
    limits = Limits(timeout_s=1.5, cpu_s=3, memory_mb=256)
    cases = {
        "def f(s):\n    while True:\n        pass\n": "timed out",
        "def f(s):\n    raise ValueError('boom')\n": "exited with status 1: ValueError: boom",
        "import os\ndef f(s):\n    os._exit(0)\n": "no result came back",
        "def g(s):\n    return s\n": "defines no function f",
        "def f(s)\n    return s\n": "SyntaxError",
        "def f(s):\n    return len(s)\n": "returned {'type': 'int'",
    }
    for code, reason in cases.items():
        result = string_transform.check_code(code, tests, limits)
        assert result.score == 0.0 and reason in result.reason, (code, result)
    fenced = f"Here it is:\n```python\n{p.answer}```\nDone."
    assert string_transform.check_code(fenced, tests, limits).score == 1.0
    # printing the expected outputs does not pass: only f's return values count
    cheat = "print(" + repr(json.dumps([t[1] for t in tests])) + ")\ndef f(s):\n    return s\n"
    assert string_transform.check_code(cheat, tests, limits).score == 0.0


# ---- tool use over several turns ------------------------------------------------------------------------
def tool_policy(problem, lie_about: str | None = None, skip_lookup: bool = False, malformed_first: bool = False):
    """A scripted model that really uses the tools: it looks each item up, computes with the
    prices the tool returned, and answers with the calculator's result."""
    items, counts = problem.data["items"], problem.data["counts"]

    def policy(messages):
        results = [m["content"] for m in messages if m["role"] == "tool"]
        assistant_turns = sum(m["role"] == "assistant" for m in messages)
        if malformed_first and assistant_turns == 0:
            return '<tool_call>{"name": "price", "arguments": {"item": </tool_call>'
        if malformed_first:
            results = results[1:]
        wanted = [] if skip_lookup else items
        if len(results) < len(wanted):
            return tool_use.call_message("price", {"item": wanted[len(results)]}, "x")["content"]
        prices = [int(r) for r in results[:len(wanted)]] if wanted else [tool_use.PRICES[i] for i in items]
        if len(results) == len(wanted):
            expression = "+".join(f"{c}*{p}" for c, p in zip(counts, prices))
            return tool_use.call_message("calculator", {"expression": expression}, "x")["content"]
        return f"The total is {results[-1]}.\nAnswer: {results[-1]}"

    return policy


def test_tool_use_episodes_are_played_and_checked_over_several_turns():
    problems = tool_use.problems("heldout", 20, seed=4)
    assert any(len(p.data["items"]) == 2 for p in problems)
    for p in problems:
        transcript = tool_use.run_episode(p.prompt, tool_policy(p))
        n_items = len(p.data["items"])
        assert [m["role"] for m in transcript] == ["user"] + ["assistant", "tool"] * (n_items + 1) + ["assistant"]
        assert transcript[-2]["content"] == p.answer  # the calculator's result ...
        assert tool_use.check_transcript(p, transcript).score == 1.0  # ... is the answer
        assert tool_use.check_transcript(p, tool_use.to_basic_roles(transcript)).score == 1.0
        assert tool_use.check_transcript(p, json.dumps(transcript[1:])).score == 1.0
        # a malformed call gets an error result, and a model that recovers still succeeds
        recovered = tool_use.run_episode(p.prompt, tool_policy(p, malformed_first=True))
        assert recovered[2]["content"].startswith("error: tool call is not valid JSON")
        assert tool_use.check_transcript(p, recovered).score == 1.0
    # the reference looks each item up as the question writes it (a copy: "3 gloves" -> "gloves")
    for p in tool_use.problems("train", 50, seed=4):
        words = [json.loads(m["content"].removeprefix("<tool_call>").removesuffix("</tool_call>"))["arguments"]["item"]
                 for m in p.solution if m["role"] == "assistant" and '"price"' in m["content"]]
        assert words == [f"{i}s" if c > 1 else i for i, c in zip(p.data["items"], p.data["counts"])]
        assert all(f"{c} {w}" in p.prompt for c, w in zip(p.data["counts"], words))
        assert [tool_use.price(w) for w in words] == [tool_use.PRICES[i] for i in p.data["items"]]
    p = next(p for p in problems if len(p.data["items"]) == 2)
    transcript = tool_use.run_episode(p.prompt, tool_policy(p))
    forged = [dict(m) for m in transcript]
    forged[4] = dict(forged[4], content="1000")
    check = tool_use.check_transcript(p, forged)
    assert check.score == 0.0 and check.reason.startswith("messages[4]: tool result '1000' is not what the tool returns")
    skipped = tool_use.run_episode(p.prompt, tool_policy(p, skip_lookup=True))
    check = tool_use.check_transcript(p, skipped)
    assert check.score == 0.0 and check.reason.startswith("no price look-up for")
    wrong = transcript[:-1] + [{"role": "assistant", "content": "Answer: 1"}]
    assert tool_use.check_transcript(p, wrong).reason == f"messages[{len(wrong) - 1}]: answer 1 is wrong"
    endless = tool_use.run_episode(p.prompt, lambda m: tool_use.call_message("price", {"item": "egg"}, "x")["content"])
    assert len(endless) == 1 + 2 * tool_use.MAX_TURNS
    assert tool_use.check_transcript(p, endless).reason == "the conversation ends without a final answer"
    assert tool_use.check_transcript(p, transcript[:3]).score == 0.0
    # OpenAI-style assistant turns that carry only tool_calls (content None) are read as the same calls
    calls_only = [dict(m, content=None) if m.get("tool_calls") else m for m in transcript]
    assert tool_use.check_transcript(p, calls_only).score == 1.0
    not_messages = tool_use.check_transcript(p, [{"role": "robot", "content": "hi"}])
    assert not not_messages.ok and not_messages.reason.startswith("not a message")
    # a record of one's own: no items named, so any successful tool use counts, and the answer
    own = {"prompt": "What is 6 times 7? Use the tools.", "reference": "42"}
    calc = tool_use.run_episode(own["prompt"], lambda m: "Answer: 42" if m[-1]["role"] == "tool" else
                                tool_use.call_message("calculator", {"expression": "6*7"}, "x")["content"])
    assert [m["role"] for m in calc] == ["user", "assistant", "tool", "assistant"]
    assert Reward({"rule": "tool_use"}).score([own], [calc])[0].score == 1.0
    guess = Reward({"rule": "tool_use"}).score([own], ["Answer: 42"])[0]
    assert guess.score == 0.0 and guess.reason == "no tool was used: the answer is not from the tools"


def test_calculator_runs_arithmetic_only():
    assert tool_use.calculate("3*4+2*(7-1)") == 24 and tool_use.format_number(tool_use.calculate("7/2")) == "3.5"
    for bad in ("__import__('os').system('true')", "(1).__class__", "2**1000", "9" * 300, "1/0", "a+1"):
        with pytest.raises(tool_use.ToolError):
            tool_use.calculate(bad)
    calls = tool_use.run_tool_calls('<tool_call>{"name": "price", "arguments": {"item": "unobtainium"}}</tool_call>'
                                    '<tool_call>{"name": "rm", "arguments": {}}</tool_call>'
                                    '<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>')
    assert [c.result for c in calls] == ["error: unknown item 'unobtainium'",
                                         "error: unknown tool 'rm' (tools: price, calculator)",
                                         "error: wrong arguments ['expr'] for calculator"]


# ---- the files, read back by raylm's own readers ---------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_written_files_are_read_by_raylm_readers(family, tmp_path):
    from raylm.eval.metrics import exact_match
    from raylm.eval.tasks import load_task
    from raylm.data.preferences import read_preferences
    from raylm.data.sft import read_conversations

    written = write_task_files(family, tmp_path, n_train=30, n_heldout=12, seed=5)
    task = load_task(written["eval_task"])
    assert task.name == f"raylm_{family}" and task.output_type == "generate_until"
    assert task.metrics == ["exact_match"]
    heldout_ids = {json.loads(line)["id"] for line in Path(written["rl_heldout"]).read_text().splitlines()}
    train_ids = {json.loads(line)["id"] for line in Path(written["rl_train"]).read_text().splitlines()}
    assert len(heldout_ids) == 12 and len(train_ids) == 30 and not heldout_ids & train_ids
    docs = task.eval_docs
    assert {d.data["id"].split("-turn")[0] for d in docs} == heldout_ids
    # the reference, generated after the prompt, is an exact match under the task's own metric options
    for doc, context in zip(docs, task.contexts(num_fewshot=2)):
        assert context.endswith(task.text(doc))
        reference = task.references(doc)[0]
        prediction = task.target_delimiter + reference
        for stop in task.until:
            prediction = prediction.split(stop)[0] if stop not in ("\n",) or "\n" not in reference else prediction
        assert exact_match(prediction, reference, **task.metric_kwargs["exact_match"]) == 1.0
        assert exact_match(" 0", reference, **task.metric_kwargs["exact_match"]) == 0.0

    for split, n in (("train", 30), ("heldout", 12)):
        conversations = read_conversations(written[f"sft_{split}"])
        assert len(conversations) == n
        pairs, bad = read_preferences(written[f"preference_{split}"])
        assert len(pairs) == n and not bad
        records = [json.loads(line) for line in Path(written[f"rl_{split}"]).read_text().splitlines()]
        assert all(isinstance(r["prompt"], str) and r["reward"] == FAMILIES[family].REWARD for r in records)
        assert [c[0]["content"] for c in conversations] == [r["prompt"] for r in records] == [p["prompt"] for p in pairs]
    if family == "tool_use":
        sft = [json.loads(line) for line in Path(written["sft_train"]).read_text().splitlines()]
        assert all(tool_use.to_basic_roles(r["openai_messages"]) == r["messages"] for r in sft)
        assert {m["role"] for r in sft for m in r["openai_messages"]} == {"user", "assistant", "tool"}


def test_shipped_task_files_are_what_the_generator_writes(tmp_path):
    """examples/tasks/{arithmetic,tool_use,string_transform}.yaml and their data are what
    examples/tasks/build_verifiable_tasks.py writes, byte for byte."""
    import runpy

    from raylm.eval.tasks import load_task

    build = runpy.run_path(str(TASKS / "build_verifiable_tasks.py"))["build"]
    written = build(tmp_path)
    for family in FAMILIES:
        for rel in (f"{family}.yaml", f"data/{family}_train.jsonl", f"data/{family}_test.jsonl"):
            assert (tmp_path / rel).read_bytes() == (TASKS / rel).read_bytes(), rel
        assert len(load_task(TASKS / f"{family}.yaml").eval_docs) >= 200
    assert len(written) == 9


# ---- user functions: a scored failure, never a dead run --------------------------------------------------
USER_REWARDS = textwrap.dedent("""
    import math, os, sys, time

    def good(prompt, completion, item):
        print("noise on stdout does not break the protocol")
        return 1.0 if item["reference"] in completion else 0.0

    def two_args(prompt, completion):
        return len(completion) / 20

    def raises(prompt, completion):
        raise RuntimeError("user bug")

    def hangs(prompt, completion):
        time.sleep(60)

    def not_a_float(prompt, completion):
        return "1.0"

    def not_finite(prompt, completion):
        return math.nan

    def exits(prompt, completion):
        sys.exit(3)

    def dies(prompt, completion):
        os._exit(9)

    def picky(prompt, completion):
        if completion == "hang":
            time.sleep(60)
        if completion == "die":
            os._exit(1)
        if completion == "raise":
            raise ValueError("bad completion")
        return 0.5

    reward = good
    """)


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def test_user_function_failures_are_scored_with_their_reasons(user_file):
    item = {"prompt": "q", "reference": "42"}
    expected = {
        "good": (1.0, True, "ok"), "two_args": (0.5, True, "ok"),
        "raises": (0.0, False, "raised RuntimeError: user bug"),
        "hangs": (0.0, False, "timed out after 1 s"),
        "not_a_float": (0.0, False, "returned str '1.0', not a number"),
        "not_finite": (0.0, False, "returned nan, not a finite number"),
        "exits": (0.0, False, "raised SystemExit: 3"),
        "dies": (0.0, False, "the reward process died (exit status 9)"),
    }
    for name, want in expected.items():
        reward = FunctionReward(f"{user_file}:{name}", timeout_s=1.0)
        try:
            result = reward("q", "Answer: 42", item)
            assert (result.score, result.ok, result.reason) == want, name
        finally:
            reward.close()
    # one child serves the items in turn; a hang or a death costs that item only
    reward = FunctionReward(f"{user_file}:picky", timeout_s=1.0, failure_score=-1.0)
    try:
        results = [reward("q", c) for c in ("a", "hang", "b", "die", "raise", "c")]
    finally:
        reward.close()
    assert [r.score for r in results] == [0.5, -1.0, 0.5, -1.0, -1.0, 0.5]
    assert results[1].reason == "timed out after 1 s" and results[3].reason.startswith("the reward process died")
    assert results[4].reason == "raised ValueError: bad completion" and reward.restarts == 2
    # the function's file broken after a death: the restart fails that item, not the run
    fragile = user_file.with_name("fragile.py")
    fragile.write_text(USER_REWARDS)
    reward = FunctionReward(f"{fragile}:picky", timeout_s=1.0)
    try:
        assert reward("q", "die").reason.startswith("the reward process died")
        fragile.write_text("def picky(:\n")
        broken = reward("q", "a")
        assert not broken.ok and broken.reason.startswith("could not restart the reward process") and "SyntaxError" in broken.reason
    finally:
        reward.close()


def test_user_functions_load_by_module_or_file_and_refuse_clearly(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    reward = Reward("my_rewards:two_args")
    try:
        assert [r.score for r in reward.score([{"prompt": "p"}], ["0123456789"])] == [0.5]
    finally:
        reward.close()
    reward = Reward({"function": str(user_file)})  # the file's `reward`
    try:
        assert reward.score([{"prompt": "p", "reference": "7"}], ["Answer: 7"])[0].score == 1.0
    finally:
        reward.close()
    with pytest.raises(RewardFunctionError, match="has no function 'missing'"):
        FunctionReward(f"{user_file}:missing")
    with pytest.raises(RewardFunctionError, match="is not a file"):
        FunctionReward(f"{user_file.parent / 'nope.py'}:reward")
    with pytest.raises(RewardFunctionError, match="ModuleNotFoundError"):
        FunctionReward("no_such_module_here:reward")


# ---- the Ray actor pool --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def test_rule_reward_pool_under_ray(ray_local, user_file, tmp_path):
    from raylm.actors.rule_reward import RuleRewardPool

    pool = RuleRewardPool(f"{user_file}:picky", num_actors=2, cpus_per_actor=0.25, timeout_s=1.0)
    try:
        items = [{"prompt": f"p{i}"} for i in range(6)]
        out = pool.score(items, ["a", "raise", "hang", "b", "die", "c"])
    finally:
        pool.shutdown()
    assert out["scores"] == [0.5, 0.0, 0.0, 0.5, 0.0, 0.5]
    assert out["ok"] == [True, False, False, True, False, True]
    assert out["reasons"][1] == "raised ValueError: bad completion"
    assert out["reasons"][2] == "timed out after 1 s" and out["reasons"][4].startswith("the reward process died")

    # a mixed prompt set, each record scored by its own spec: the families' rules and checkers, and
    # user functions that raise or return no number, in one actor
    records, completions = [], []
    for family in sorted(FAMILIES):
        written = write_task_files(family, tmp_path / family, n_train=2, n_heldout=3, seed=1, parts=("rl",))
        for line, p in zip(Path(written["rl_heldout"]).read_text().splitlines(),
                           FAMILIES[family].problems("heldout", 3, 1)):
            records.append(json.loads(line))
            completions.append(p.solution if family == "tool_use" else p.solution[0]["content"])
    records += [{"prompt": "p", "reward": {"function": f"{user_file}:{name}", "timeout_s": 1}}
                for name in ("raises", "not_a_float", "hangs")]
    records.append({"prompt": "p", "reward": {"function": f"{user_file}:missing"}})
    completions += ["x"] * 4
    pool = RuleRewardPool(None, num_actors=1, timeout_s=5.0)
    try:
        out = pool.score(records, completions)
    finally:
        pool.shutdown()
    assert out["scores"] == [1.0] * 9 + [0.0] * 4, out["reasons"]
    assert out["ok"] == [True] * 9 + [False] * 4
    assert out["reasons"][9] == "raised RuntimeError: user bug"
    assert out["reasons"][10] == "returned str '1.0', not a number"
    assert out["reasons"][11] == "timed out after 1 s"
    assert "has no function 'missing'" in out["reasons"][12]
    with pytest.raises(RuntimeError, match="has no function 'missing'"):
        RuleRewardPool(f"{user_file}:missing", num_actors=1)
    from raylm.tasks.rules import RuleError

    with pytest.raises(RuleError, match="reward.tolerance: not an option of rule 'numeric'"):
        RuleRewardPool({"rule": "numeric", "tolerance": 1})


@pytest.mark.slow
def test_shipped_tasks_read_the_same_in_lm_eval(tmp_path, monkeypatch):
    """lm-evaluation-harness loads the shipped YAMLs as they are, builds the same prompts and
    targets as raylm's loader, and scores the reference as an exact match (and " 0" as none)."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.chdir(TASKS)  # lm_eval resolves the relative data paths against its working directory
    from lm_eval.tasks import TaskManager, get_task_dict

    from raylm.eval.tasks import load_task

    theirs = get_task_dict([f"raylm_{f}" for f in FAMILIES], TaskManager(include_path=str(TASKS)))
    for family in FAMILIES:
        task, ours = theirs[f"raylm_{family}"], load_task(TASKS / f"{family}.yaml")
        docs = list(task.test_docs())
        assert len(docs) == len(ours.eval_docs)
        assert [task.doc_to_text(d) for d in docs] == [ours.text(d) for d in ours.eval_docs]
        assert [task.doc_to_target(d) for d in docs] == [ours.target_text(d) for d in ours.eval_docs]
        assert task.config.generation_kwargs["until"] == ours.until
        for doc in docs[:20]:
            assert task.process_results(doc, [" " + task.doc_to_target(doc)])["exact_match"] == 1.0
            assert task.process_results(doc, [" 0"])["exact_match"] == 0.0
