"""Write the laptop demo's task files (examples/laptop/tool_use/) from raylm's built-in `tool_use`
family (raylm.tasks.tool_use), one record per assistant turn, in the eval task's own format:

    python examples/laptop/build_demo_task.py [OUT_DIR]      (default: examples/laptop/tool_use)

Every turn of a problem is an item: its context is the conversation so far, rendered as the eval
task renders it (``User: ...\\nAssistant: <tool_call>...</tool_call>\\nTool: 19\\nAssistant:``), and its
target is the reference's next assistant message (a price look-up, the calculator call, or the
answer). The eval task is examples/tasks/tool_use.yaml (the same held-out problems: seed 0, 200
problems, 763 turns), run with `chat: true`. The files:

    sft/{train,heldout}.jsonl        {"prompt": context, "response": target} (raylm sft)
    preference/slip_{train,heldout}.jsonl   {"prompt", "chosen", "rejected"} (raylm dpo): every turn
                                     (train: the first 1,200 train turns);
                                     chosen is the target, rejected a plausible slip of the same turn:
                                     the wrong item looked up, a count or price miscopied into the
                                     calculator, an answer that is not the calculator's result
    preference/guess_{train,heldout}.jsonl  the family's own pairs (raylm reward): the first turn, the
                                     first look-up (chosen) against answering at once with a guessed
                                     total (rejected)
    rl/{train,heldout}.jsonl         {"prompt", "reference"}: the target, scored by exact match (train:
                                     the first 600 train turns)
    pretrain/transcripts.jsonl       {"id", "text"}: whole solved conversations of 3,000 other train
                                     problems, in the eval's plain format, 10 to a document: the
                                     pretraining mix's in-domain part (examples/laptop/data.yaml), as
                                     real mixes hold tool-use transcripts

Train records come from the family's train problems, held-out ones from its held-out problems
(a hash of the problem decides, raylm.tasks.common.split_of): no held-out problem is in any train file.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from raylm.tasks import tool_use

SEED = 0
N_TRAIN = 800  # problems (about 3.8 turns each)
N_HELDOUT = 200
N_RL_TRAIN = 600  # RL prompts: 20 GRPO steps x 8 prompts use 160 of them
N_SLIP_TRAIN = 1200  # DPO's training pairs (the first train turns): 60 steps x 32 pairs see each ~1.6 times
N_PRETRAIN = 3000  # problems in the pretraining transcripts (from the train split, another seed)
PER_DOCUMENT = 10


def slip(target: str, problem, rng: random.Random) -> str:
    """The target with one plausible mistake, always different from it."""
    call = re.fullmatch(r"<tool_call>(.*)</tool_call>", target, re.DOTALL)
    if call is None:  # "Answer: N": not the calculator's result
        total = int(target.split(":", 1)[1])
        return f"Answer: {max(0, total + rng.choice((-10, -3, -2, -1, 1, 2, 3, 10))) or total + 1}"
    payload = json.loads(call.group(1))
    if payload["name"] == "price":  # another item than this turn's, written as the question writes it
        word = payload["arguments"]["item"]
        count = 1 if word in tool_use.PRICES else 2  # the number the question writes this item in
        words = [tool_use.written(i, c) for i, c in zip(problem.data["items"], problem.data["counts"])]
        others = [w for w in words if w != word] or [tool_use.written(i, count) for i in tool_use.PRICES
                                                     if i != tool_use.item_named(word)]
        payload["arguments"]["item"] = rng.choice(others)
    else:  # one number of the expression miscopied
        expression = payload["arguments"]["expression"]
        numbers = list(re.finditer(r"\d+", expression))
        m = rng.choice(numbers)
        value = int(m.group())
        wrong = value + rng.choice([d for d in (-2, -1, 1, 2) if value + d > 0])
        payload["arguments"]["expression"] = expression[: m.start()] + str(wrong) + expression[m.end():]
    return f"<tool_call>{json.dumps(payload)}</tool_call>"


def turn_records(problems, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    records = {"sft": [], "preference/slip": [], "preference/guess": [], "rl": []}
    for problem in problems:
        for turn, doc in enumerate(tool_use.eval_docs(problem)):
            records["sft"].append({"id": doc["id"], "prompt": doc["context"], "response": doc["target"]})
            records["preference/slip"].append({"id": doc["id"], "prompt": doc["context"], "chosen": doc["target"],
                                               "rejected": slip(doc["target"], problem, rng)})
            if turn == 0:
                records["preference/guess"].append({"id": doc["id"], "prompt": doc["context"], "chosen": doc["target"],
                                                    "rejected": problem.wrong_solution[0]["content"]})
            records["rl"].append({"id": doc["id"], "prompt": doc["context"], "reference": doc["target"]})
    return records


def build(out_dir: str | Path) -> dict[str, str]:
    out = Path(out_dir)
    written = {}
    for split in ("train", "heldout"):
        problems = tool_use.problems(split, N_TRAIN if split == "train" else N_HELDOUT, SEED)
        for part, records in turn_records(problems, SEED + (split == "heldout")).items():
            if part == "rl" and split == "train":
                records = records[:N_RL_TRAIN]
            if part == "preference/slip" and split == "train":
                records = records[:N_SLIP_TRAIN]
            folder, _, kind = part.partition("/")
            path = out / folder / (f"{kind}_{split}.jsonl" if kind else f"{split}.jsonl")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
            written[f"{part}_{split}"] = str(path)
    problems = tool_use.problems("train", N_PRETRAIN, SEED + 1)
    documents = [{"id": f"tool_use_transcripts_{i // PER_DOCUMENT}",
                  "text": "\n".join(tool_use.render_plain([{"role": "user", "content": p.prompt}] + p.solution)
                                    for p in problems[i:i + PER_DOCUMENT])}
                 for i in range(0, len(problems), PER_DOCUMENT)]
    path = out / "pretrain" / "transcripts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in documents), encoding="utf-8")
    written["pretrain"] = str(path)
    return written


if __name__ == "__main__":
    for name, path in build(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "tool_use").items():
        print(f"{name}: {path}")
