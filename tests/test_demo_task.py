"""The laptop demo's task files (examples/laptop/tool_use/) are what build_demo_task.py writes, and no
held-out problem reaches any file the stages train on (pretraining transcripts included)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

DEMO = Path(__file__).parents[1] / "examples" / "laptop"


def load_builder():
    spec = importlib.util.spec_from_file_location("build_demo_task", DEMO / "build_demo_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_task_files_are_the_builders_output(tmp_path):
    written = load_builder().build(tmp_path)
    for path in map(Path, written.values()):
        shipped = DEMO / "tool_use" / path.relative_to(tmp_path)
        assert shipped.read_bytes() == path.read_bytes(), f"{shipped} is stale: python {DEMO / 'build_demo_task.py'}"


def test_no_held_out_problem_is_in_a_training_file():
    from raylm.tasks import tool_use

    held_out = tool_use.problems("heldout", 200, 0)
    questions = {p.prompt for p in held_out}
    eval_contexts = {json.loads(line)["prompt"] for line in (DEMO / "tool_use/sft/heldout.jsonl").read_text().splitlines()}
    assert all(any(c.startswith(f"User: {q}\n") for q in questions) for c in eval_contexts)  # the same problems
    for name in ("sft/train.jsonl", "preference/slip_train.jsonl", "preference/guess_train.jsonl", "rl/train.jsonl"):
        for line in (DEMO / "tool_use" / name).read_text().splitlines():
            record = json.loads(line)
            assert record["prompt"] not in eval_contexts, name
            assert not any(record["prompt"].startswith(f"User: {q}\n") for q in questions), name
    transcripts = (DEMO / "tool_use/pretrain/transcripts.jsonl").read_text()
    assert transcripts.count("User: ") == 3000
    for q in questions:
        assert f"User: {q}\n" not in transcripts, q


def test_each_slip_is_one_plausible_mistake_of_its_turn():
    """Rejected = chosen with one mistake: a look-up of another item (the question's other item as it
    writes it, or one it does not name in the chosen one's number), one number of the calculator's expression off, or an answer
    that is not the calculator's result."""
    from raylm.tasks import tool_use

    kinds = {"price": 0, "calculator": 0, "answer": 0}
    for line in (DEMO / "tool_use/preference/slip_heldout.jsonl").read_text().splitlines():
        record = json.loads(line)
        chosen, rejected = record["chosen"], record["rejected"]
        assert chosen != rejected
        if chosen.startswith("Answer: "):
            kinds["answer"] += 1
            assert rejected.startswith("Answer: ") and int(rejected[8:]) != int(chosen[8:])
            continue
        chosen_call = json.loads(chosen.removeprefix("<tool_call>").removesuffix("</tool_call>"))
        rejected_call = json.loads(rejected.removeprefix("<tool_call>").removesuffix("</tool_call>"))
        assert chosen_call["name"] == rejected_call["name"]
        kinds[chosen_call["name"]] += 1
        if chosen_call["name"] == "price":
            item, other = chosen_call["arguments"]["item"], rejected_call["arguments"]["item"]
            question = record["prompt"].split("\n")[0]
            assert f" {item} " in question or f" {item}?" in question  # copied from the question
            assert tool_use.price(other) is not None and other.removesuffix("s") != item.removesuffix("s")
            if " and " in question:  # the question's other item, as it writes it
                assert f" {other} " in question or f" {other}?" in question
            else:  # an item the question does not name, in the same number
                assert (item in tool_use.PRICES) == (other in tool_use.PRICES)
        else:
            a, b = chosen_call["arguments"]["expression"], rejected_call["arguments"]["expression"]
            assert len(a.split("+")) == len(b.split("+"))
            assert sum(x != y for x, y in zip(a.replace("+", "*").split("*"), b.replace("+", "*").split("*"))) == 1
    assert min(kinds.values()) > 100, kinds
