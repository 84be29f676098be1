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
