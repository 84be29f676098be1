"""Items per second of `raylm eval` against lm-evaluation-harness's Hugging Face backend, side by side
in one run: the same multiple-choice task, the same documents, the same checkpoint, the same cores.

    .venv/bin/python benchmarks/eval.py --lm-eval-batches batch --repeat 3   # small preset, 200 items, 0-shot
    .venv/bin/python benchmarks/eval.py --preset tiny --num-fewshot 3 --limit 100

raylm's side is `raylm eval`'s path for one checkpoint (raylm.eval.evaluate.evaluate_checkpoint: the
scorer actors start on Ray's workers and load the model while the driver tokenises; then the actors
score); lm_eval's is `lm_eval.simple_evaluate` with `model="hf"` (loading the model and the task's
data, tokenising, scoring), run at its default batch size 1 and at raylm's batch size.

What is timed for both: everything from the call to the accuracy. Not timed: what each does once
per process before that. For lm_eval, importing the Python packages it uses (torch, transformers,
datasets, lm_eval) in this process; for raylm, starting Ray as `raylm eval` starts it
(raylm.ray_init: a local Ray whose first workers import torch as they start, `--preload-modules`).
Ray is started afresh before every raylm round, so each round's scorers start as a `raylm eval`
run's do, and every timed run of either system begins once the machine is idle again. With
``--repeat`` the systems take turns, the order reversed every round, and the table shows each
one's median; the speed-up of every round is printed too (on a machine shared with other jobs the
ratio within a round is steadier than either rate). Both must report the same accuracy, or the
benchmark fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    spec.pop("num_fewshot", None)  # lm_eval ignores --num_fewshot for a task whose YAML sets one
    folder = out / "lm_eval_tasks"
    folder.mkdir()
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder, name


def run_raylm(checkpoint: Path, num_fewshot: int, limit: int, actors: int, max_batch: int, dtype: str) -> dict:
    from raylm.eval.tasks import load_task
    from raylm.eval.evaluate import evaluate_checkpoint
    from raylm.eval.tasks import result_key
    from raylm.pipelines.eval import Config, ScorerConfig, TaskRef

    ref = TaskRef(path=str(TASK), num_fewshot=num_fewshot, limit=limit)
    config = Config(checkpoints={"bench": str(checkpoint)}, tasks=[ref],
                    scorer=ScorerConfig(num_actors=actors, max_batch=max_batch, dtype=dtype))
    start = time.perf_counter()
    tasks = [(ref, load_task(ref.path, ref.limit))]
    results = evaluate_checkpoint("bench", str(checkpoint), tasks, config.scorer, config.generation, config.seed)
    seconds = time.perf_counter() - start
    metrics = results[result_key(ref, tasks[0][1])]
    return {"system": f"raylm eval ({actors} actors)", "batch": max_batch, "items": metrics["n_items"],
            "seconds": seconds, "acc": metrics["acc"], "acc_norm": metrics["acc_norm"]}


def run_lm_eval(checkpoint: Path, task_dir: Path, task_name: str, num_fewshot: int, limit: int, batch: int,
                threads: int, dtype: str) -> dict:
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(threads)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={checkpoint},dtype={dtype}", tasks=[task_name],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        num_fewshot=num_fewshot, limit=limit, batch_size=batch, device="cpu", log_samples=False,
    )
    seconds = time.perf_counter() - start
    res = out["results"][task_name]
    return {"system": f"lm_eval hf ({threads} thread{'s' if threads > 1 else ''})", "batch": batch, "items": limit,
            "seconds": seconds,
            "acc": res["acc,none"], "acc_norm": res["acc_norm,none"]}


def start_ray(cpus: int, preload_modules: list[str]) -> None:
    """A fresh local Ray, started as `raylm eval` starts it."""
    import ray

    from raylm.config import RayConfig
    from raylm.ray_init import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(RayConfig(num_cpus=cpus, preload_modules=preload_modules))


def wait_until_idle(max_seconds: float = 30.0) -> None:
    """Until the CPUs were at least 90% idle over half a second (Ray's workers done importing, the last
    run's processes gone), or ``max_seconds``."""
    def idle_and_total() -> tuple[int, int]:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all

    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        idle0, total0 = idle_and_total()
        time.sleep(0.5)
        idle1, total1 = idle_and_total()
        if idle1 - idle0 >= 0.9 * (total1 - total0):
            return


def import_packages() -> None:
    """What both sides import lazily on their first call, imported before either is timed."""
    import datasets  # noqa: F401  lm_eval's task data
    import lm_eval.models.huggingface  # noqa: F401
    import transformers

    transformers.AutoTokenizer, transformers.AutoModelForCausalLM  # resolves transformers' lazy modules


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
    parser.add_argument("--repeat", type=int, default=1, help="rounds, the systems taking turns")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights and compute of both systems")
    parser.add_argument("--preload-modules", default=None,
                        help="comma-separated modules Ray's workers import as they start (default: what `raylm eval` "
                             "has them import, pipelines.eval.WORKER_MODULES; '' for none)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import_packages()
    from raylm.pipelines.eval import WORKER_MODULES

    preload = list(WORKER_MODULES) if args.preload_modules is None else [m for m in args.preload_modules.split(",") if m]

    batches = [args.batch if b.strip() == "batch" else int(b) for b in args.lm_eval_batches.split(",")]
    runs = {}  # system label -> the rows of its rounds
    with tempfile.TemporaryDirectory(prefix="raylm-bench-eval-") as tmp:
        out = Path(tmp)
        checkpoint = build_checkpoint(out, args.preset, args.init_std)
        task_dir, task_name = lm_eval_task_copy(out)

        def raylm_round():
            start_ray(args.actors, preload)
            wait_until_idle()
            return run_raylm(checkpoint, args.num_fewshot, args.limit, args.actors, args.batch, args.dtype)

        def lm_eval_round(batch):
            wait_until_idle()
            return run_lm_eval(checkpoint, task_dir, task_name, args.num_fewshot, args.limit, batch,
                               args.lm_eval_threads or args.actors, args.dtype)

        systems = [raylm_round] + [lambda b=b: lm_eval_round(b) for b in dict.fromkeys(batches)]
        for round_ in range(args.repeat):
            for system in systems if round_ % 2 == 0 else systems[::-1]:
                load = os.getloadavg()[0]
                row = system()
                row["items_per_s"] = row["items"] / row["seconds"]
                runs.setdefault((row["system"], row["batch"]), []).append(row)
                print(f"round {round_ + 1}: {row['system']} batch {row['batch']}: {row['items_per_s']:.1f} items/s "
                      f"(load average {load:.1f} before)", flush=True)
    rows = [dict(rounds[0], items_per_s=statistics.median(r["items_per_s"] for r in rounds),
                 seconds=statistics.median(r["seconds"] for r in rounds)) for rounds in runs.values()]
    ours = rows[0]["items_per_s"]
    print(f"\n{args.limit} items of stdlib_docstring_mc, {args.num_fewshot}-shot, preset {args.preset}, "
          f"{args.dtype}, {os.cpu_count()} cores, Ray workers preloading {','.join(preload) or 'nothing'}, "
          f"load average {os.getloadavg()[0]:.1f} at the end, "
          f"median of {args.repeat} round{'s' if args.repeat > 1 else ''}\n")
    print("| system | batch | items/s | seconds | acc | acc_norm | raylm speed-up |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['system']} | {row['batch']} | {row['items_per_s']:.1f} | {row['seconds']:.1f} | "
              f"{row['acc']:.4f} | {row['acc_norm']:.4f} | {ours / row['items_per_s']:.2f}x |")
    raylm_rounds = list(runs.values())[0]
    for rounds in list(runs.values())[1:]:
        ratios = [a["items_per_s"] / b["items_per_s"] for a, b in zip(raylm_rounds, rounds)]
        print(f"raylm speed-up over {rounds[0]['system']} batch {rounds[0]['batch']}, round by round: "
              + ", ".join(f"{r:.2f}x" for r in ratios) + f" (median {statistics.median(ratios):.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(list(runs.values()), indent=2))
    all_rows = [r for rounds in runs.values() for r in rounds]
    mismatched = [r for r in all_rows if abs(r["acc"] - rows[0]["acc"]) > 1e-9 or abs(r["acc_norm"] - rows[0]["acc_norm"]) > 1e-9]
    if mismatched:
        print("raylm eval and lm_eval disagree on accuracy: the comparison is void", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
