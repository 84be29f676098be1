"""Write the eval tasks of raylm's built-in verifiable task families (raylm.tasks) into this folder:

    python examples/tasks/build_verifiable_tasks.py [OUT_DIR]   (default: examples/tasks)

Each family: FAMILY.yaml (lm-evaluation-harness generate_until, exact match) with its documents
data/FAMILY_test.jsonl (held-out problems) and data/FAMILY_train.jsonl (the few-shot pool). The
SFT, preference and RL files of a family are written by raylm.tasks.files.write_task_files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from raylm.tasks.files import FAMILIES, write_task_files

SEED = 0
N_FEWSHOT_POOL = 100
N_TEST = 200


def build(out_dir: str | Path) -> dict[str, str]:
    written = {}
    for family in FAMILIES:
        files = write_task_files(family, out_dir, n_train=N_FEWSHOT_POOL, n_heldout=N_TEST, seed=SEED, parts=("eval",))
        written.update({f"{family}/{name}": path for name, path in files.items()})
    return written


if __name__ == "__main__":
    for name, path in build(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent).items():
        print(f"{name}: {path}")
