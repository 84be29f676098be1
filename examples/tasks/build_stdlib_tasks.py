"""Build the shipped evaluation tasks' JSONL data from this interpreter's standard library.

    python examples/tasks/build_stdlib_tasks.py [OUT_DIR]   (default: examples/tasks/data)

Modules are split by a hash of their top-level package name, so test items come from packages
whose functions never appear in the few-shot (train) split: a held-out split, not a shuffled one.
- stdlib_docstring_mc: the first line of a function's docstring; pick the function among 4 names.
- stdlib_funcname_gen: the same docstring line; generate the function's name (exact match, F1...).
- stdlib_docs_ppl: whole docstrings of held-out packages, for perplexity and bits per byte.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

from raylm.data.stdlib_corpus import iter_stdlib_functions

SIZES = {"train": 64, "test": 200}


def split_of(qualified_name: str) -> str:
    package = qualified_name.split(".", 1)[0]
    return "test" if int(hashlib.sha1(package.encode()).hexdigest(), 16) % 5 == 0 else "train"


def summary(docstring: str) -> str:
    first = docstring.strip().split("\n\n", 1)[0]
    return " ".join(first.split())


def build(out_dir: Path) -> dict[str, int]:
    out_dir.mkdir(parents=True, exist_ok=True)
    seen, functions = set(), {"train": [], "test": []}
    for fn in iter_stdlib_functions():
        short = fn.qualified_name.rsplit(".", 1)[1]
        text = summary(fn.docstring)
        # One item per distinct summary and name; skip dunders and one-word summaries.
        if short.startswith("__") or len(text.split()) < 4 or len(text) > 300 or text in seen:
            continue
        seen.add(text)
        functions[split_of(fn.qualified_name)].append((fn.qualified_name, text, fn.docstring))
    rng = random.Random(0)
    counts = {}
    for split, items in functions.items():
        rng.shuffle(items)
        items = items[: SIZES[split]]
        names = [q for q, _, _ in functions[split]]
        mc, gen = [], []
        for qualified, text, _ in items:
            distractors = rng.sample([n for n in names if n.rsplit(".", 1)[1] != qualified.rsplit(".", 1)[1]], 3)
            answer = rng.randrange(4)
            choices = distractors[:answer] + [qualified] + distractors[answer:]
            mc.append({"docstring": text, "choices": choices, "answer": answer})
            gen.append({"docstring": text, "name": qualified.rsplit(".", 1)[1]})
        write(out_dir / f"docstring_mc_{split}.jsonl", mc)
        write(out_dir / f"funcname_gen_{split}.jsonl", gen)
        counts[f"docstring_mc_{split}"] = len(mc)
    held_out = [{"text": doc} for _, _, doc in functions["test"] if len(doc) > 400][:40]
    write(out_dir / "docs_ppl_test.jsonl", held_out)
    counts["docs_ppl_test"] = len(held_out)
    return counts


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "data"
    print(build(out))
