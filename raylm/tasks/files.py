"""A task family written as files every raylm stage reads.

``write_task_files(family, out_dir, n_train, n_heldout, seed)`` writes::

    out_dir/FAMILY.yaml                       eval task (lm-evaluation-harness generate_until YAML)
    out_dir/data/FAMILY_{train,test}.jsonl    its documents: test = held-out, train = few-shot pool
    out_dir/sft/FAMILY_{train,heldout}.jsonl  {"messages": [...]} for raylm sft (system/user/assistant
                                              roles; tool_use also keeps the OpenAI-style messages,
                                              tool role and tool_calls, as "openai_messages")
    out_dir/preference/FAMILY_{train,heldout}.jsonl  {"prompt", "chosen", "rejected"} for reward/DPO
    out_dir/rl/FAMILY_{train,heldout}.jsonl   {"prompt", "reference", "reward", ...} for RL rollouts

The eval task's test documents are the held-out problems; the train split feeds few-shot examples.
Every file of one call comes from the same problems, so a held-out problem is in no train file.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import yaml

from raylm.data.jsonl import write_jsonl
from raylm.tasks import arithmetic, string_transform, tool_use
from raylm.tasks.common import Problem
from raylm.tasks.tool_use import to_basic_roles

FAMILIES: dict[str, ModuleType] = {m.FAMILY: m for m in (arithmetic, tool_use, string_transform)}
PARTS = ("eval", "sft", "preference", "rl")


def family_module(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"task family {name!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def sft_record(problem: Problem) -> dict:
    record = {"id": problem.id, "messages": to_basic_roles(problem.messages)}
    if any(m["role"] == "tool" for m in problem.messages):
        record["openai_messages"] = problem.messages
        record["tools"] = problem.data.get("tools", [])
    return record


def preference_record(problem: Problem) -> dict:
    """The first assistant turn: the reference's against the plausible wrong one."""
    return {"id": problem.id, "prompt": problem.prompt, "chosen": problem.solution[0]["content"],
            "rejected": problem.wrong_solution[0]["content"]}


def rl_record(problem: Problem, reward: dict) -> dict:
    return {"id": problem.id, "family": problem.family, "prompt": problem.prompt, "reference": problem.answer,
            "reward": reward, **problem.data}


def eval_task_spec(family: str, module: ModuleType) -> dict:
    return {
        "task": f"raylm_{family}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": f"data/{family}_train.jsonl", "test": f"data/{family}_test.jsonl"}},
        "output_type": "generate_until",
        "training_split": "train",
        "test_split": "test",
        "fewshot_split": "train",
        "num_fewshot": 0,
        **module.EVAL_SPEC,
        "metadata": {"version": 1.0},
    }


class _Dumper(yaml.SafeDumper):
    pass


def _represent_str(dumper, value: str):
    # "\n" written as such (double quotes), not as a blank line inside single quotes
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)


_Dumper.add_representer(str, _represent_str)


def write_task_files(family: str, out_dir: str | Path, n_train: int = 2000, n_heldout: int = 200, seed: int = 0,
                     parts: tuple[str, ...] = PARTS) -> dict[str, str]:
    """Generate ``n_train`` train and ``n_heldout`` held-out problems of ``family`` with ``seed`` and
    write the ``parts`` asked for (see the module's docstring); returns ``{name: path}``."""
    module = family_module(family)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"parts: {', '.join(sorted(unknown))} not one of {', '.join(PARTS)}")
    if n_train < 1 or n_heldout < 1:
        raise ValueError(f"n_train and n_heldout must be at least 1, got {n_train} and {n_heldout}")
    out = Path(out_dir)
    splits = {"train": module.problems("train", n_train, seed), "heldout": module.problems("heldout", n_heldout, seed)}
    written = {}
    if "eval" in parts:
        for split, name in (("train", "train"), ("heldout", "test")):
            docs = [doc for p in splits[split] for doc in module.eval_docs(p)]
            written[f"eval_{name}"] = str(write_jsonl(docs, out / "data" / f"{family}_{name}.jsonl"))
        yaml_path = out / f"{family}.yaml"
        header = (f"# raylm's built-in verifiable task '{family}' (raylm.tasks.{family}; written by\n"
                  f"# raylm.tasks.files.write_task_files with seed {seed}): test = held-out problems.\n"
                  f"# Runs unchanged in lm-evaluation-harness, from this folder (where the relative data\n"
                  f"# paths resolve): lm_eval --include_path . --tasks raylm_{family}\n")
        yaml_path.write_text(header + yaml.dump(eval_task_spec(family, module), Dumper=_Dumper, sort_keys=False, width=120),
                             encoding="utf-8")
        written["eval_task"] = str(yaml_path)
    for split, problems in splits.items():
        if "sft" in parts:
            written[f"sft_{split}"] = str(write_jsonl([sft_record(p) for p in problems],
                                                      out / "sft" / f"{family}_{split}.jsonl"))
        if "preference" in parts:
            written[f"preference_{split}"] = str(write_jsonl([preference_record(p) for p in problems],
                                                             out / "preference" / f"{family}_{split}.jsonl"))
        if "rl" in parts:
            written[f"rl_{split}"] = str(write_jsonl([rl_record(p, module.REWARD) for p in problems],
                                                     out / "rl" / f"{family}_{split}.jsonl"))
    return written
