"""Items per second of `raylm eval` against lm-evaluation-harness's Hugging Face backend, side by side
in one run: the same multiple-choice task, the same documents, the same checkpoint, the same cores.

    .venv/bin/python benchmarks/eval.py                      # small preset, 200 items, 0-shot
    .venv/bin/python benchmarks/eval.py --preset tiny --num-fewshot 3 --limit 100

raylm's side is the `raylm eval` scoring path (pipelines.eval.evaluate_checkpoint: tokenisation in
the driver, a Ray Data job over log-likelihood actors); lm_eval's is `lm_eval.simple_evaluate` with
`model="hf"`, run at its default batch size 1 and at a batch size equal to raylm's. Both timings
include loading the model; neither includes importing Python packages or starting Ray. Both must
report the same accuracy, or the benchmark fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "examples" / "tasks" / "stdlib_docstring_mc.yaml"


def build_checkpoint(out: Path, preset_name: str, init_std: float) -> Path:
    """A randomly initialised raylm checkpoint of the given size with a BPE tokenizer trained on
    standard-library docstrings (the eval tests' builder)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_eval_fixtures import VOCAB, build_tokenizer

    from raylm.models.config import preset
    from raylm.models.hf_checkpoint import save_checkpoint
    from raylm.models.transformer import Transformer

    tokenizer = build_tokenizer(out / "tokenizer.json")
    # A wider initialisation than training's 0.02: an untrained model at 0.02 gives nearly uniform
    # next-token distributions, so answers of equal length tie to within float rounding and the two
    # systems' accuracies could differ by rounding alone. Throughput does not depend on the weights.
    model = Transformer(preset(preset_name, vocab_size=VOCAB, max_seq_len=1024, initializer_range=init_std))
    model.init_weights(seed=0)
    print(f"model: preset {preset_name}, {model.num_params() / 1e6:.1f}M parameters", flush=True)
    return save_checkpoint(model, out / "checkpoint", tokenizer_file=tokenizer)


def lm_eval_task_copy(out: Path) -> tuple[Path, str]:
    """The shipped task with absolute data paths (lm_eval resolves them against its working directory)."""
    import yaml

    spec = yaml.safe_load(TASK.read_text())
    files = spec["dataset_kwargs"]["data_files"]
    spec["dataset_kwargs"]["data_files"] = {split: str(TASK.parent / f) for split, f in files.items()}
    spec["task"] = name = spec["task"] + "_bench"
    folder = out / "lm_eval_tasks"
    folder.mkdir()
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder, name


def run_raylm(checkpoint: Path, num_fewshot: int, limit: int, actors: int, max_batch: int) -> dict:
    import ray

    from raylm.eval_tasks import load_task
    from raylm.pipelines.eval import Config, ScorerConfig, TaskRef, evaluate_checkpoint, result_key

    if not ray.is_initialized():
        ray.init(num_cpus=actors, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ref = TaskRef(path=str(TASK), num_fewshot=num_fewshot, limit=limit)
    config = Config(checkpoints={"bench": str(checkpoint)}, tasks=[ref],
                    scorer=ScorerConfig(num_actors=actors, max_batch=max_batch))
    tasks = [(ref, load_task(ref.path, ref.limit))]
    start = time.perf_counter()
    results = evaluate_checkpoint("bench", str(checkpoint), tasks, config)
    seconds = time.perf_counter() - start
    metrics = results[result_key(ref, tasks[0][1])]
    return {"system": f"raylm eval ({actors} actors)", "batch": max_batch, "items": metrics["n_items"],
            "seconds": seconds, "acc": metrics["acc"], "acc_norm": metrics["acc_norm"]}


def run_lm_eval(checkpoint: Path, task_dir: Path, task_name: str, num_fewshot: int, limit: int, batch: int,
                threads: int) -> dict:
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(threads)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={checkpoint},dtype=float32", tasks=[task_name],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        num_fewshot=num_fewshot, limit=limit, batch_size=batch, device="cpu", log_samples=False,
    )
    seconds = time.perf_counter() - start
    res = out["results"][task_name]
    return {"system": f"lm_eval hf ({threads} thread{'s' if threads > 1 else ''})", "batch": batch, "items": limit,
            "seconds": seconds,
            "acc": res["acc,none"], "acc_norm": res["acc_norm,none"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--limit", type=int, default=200, help="documents of the task (it has 200)")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--init-std", type=float, default=0.2, help="weight initialisation of the random model")
    parser.add_argument("--actors", type=int, default=2, help="raylm scorer actors, one core each")
    parser.add_argument("--batch", type=int, default=32, help="sequences per forward, both systems")
    parser.add_argument("--lm-eval-batches", default="1,batch",
                        help="lm_eval batch sizes to run, comma-separated ('batch' = --batch; 1 is its default)")
    parser.add_argument("--lm-eval-threads", type=int, default=None,
                        help="torch threads for lm_eval (default: --actors, the cores raylm's actors get)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory(prefix="raylm-bench-eval-") as tmp:
        out = Path(tmp)
        checkpoint = build_checkpoint(out, args.preset, args.init_std)
        task_dir, task_name = lm_eval_task_copy(out)
        rows = [run_raylm(checkpoint, args.num_fewshot, args.limit, args.actors, args.batch)]
        batches = [args.batch if b.strip() == "batch" else int(b) for b in args.lm_eval_batches.split(",")]
        for batch in dict.fromkeys(batches):
            rows.append(run_lm_eval(checkpoint, task_dir, task_name, args.num_fewshot, args.limit, batch,
                                    args.lm_eval_threads or args.actors))
    for row in rows:
        row["items_per_s"] = row["items"] / row["seconds"]
    ours = rows[0]["items_per_s"]
    print(f"\n{args.limit} items of stdlib_docstring_mc, {args.num_fewshot}-shot, preset {args.preset}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end\n")
    print(f"| system | batch | items/s | seconds | acc | acc_norm | raylm speed-up |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['system']} | {row['batch']} | {row['items_per_s']:.1f} | {row['seconds']:.1f} | "
              f"{row['acc']:.4f} | {row['acc_norm']:.4f} | {ours / row['items_per_s']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    mismatched = [r for r in rows[1:] if abs(r["acc"] - rows[0]["acc"]) > 1e-9 or abs(r["acc_norm"] - rows[0]["acc_norm"]) > 1e-9]
    if mismatched:
        print("raylm eval and lm_eval disagree on accuracy: the comparison is void", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
