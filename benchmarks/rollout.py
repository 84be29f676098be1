"""Rollout tokens/s of raylm's vLLM rollout engine (the ``VLLMEngine`` Ray actor that `raylm rlhf`
uses, called through Ray) against Hugging Face transformers' ``generate`` on the same checkpoint,
side by side in one run; then the weight-sync time of a new policy as a share of a PPO step.

    .venv/bin/python benchmarks/rollout.py                     # the laptop demo's model size
    .venv/bin/python benchmarks/rollout.py --prompts 16 --new-tokens 32 --preset tiny

Both systems get the same prompts (equal length, so transformers needs no padding), the same
sampling (temperature, top-p, no top-k), the same number of new tokens and the same cores (the
engine actor's CPUs = transformers' torch threads). The checkpoint's EOS is made unreachable
(its logit is held far below the others), so neither system stops early: every completion has
exactly ``--new-tokens`` tokens (checked). Timings are the median of ``--repeats`` runs after one
warm-up run each, the two systems alternating.

Weight sync is the path of ``Pools.publish`` in pipelines/rlhf.py without the trainer group:
the Hugging Face state packed into buckets, each ``ray.put`` once, and the engine's
``load_weight_buckets`` (vLLM's layerwise reload), timed from the first pack to the engine's
answer. The PPO step time it is compared with is read from the latest `raylm rlhf` run in the
MLflow store (``--mlflow``, the laptop lifecycle's by default), whose own ``time/weight_sync_s``
is printed beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build_checkpoint(folder: Path, preset_name: str, vocab: int, max_seq_len: int) -> Path:
    """A randomly initialised raylm model exported in Hugging Face format, that never samples EOS:
    its EOS logit is always 0 while the final norm is scaled so that the other logits spread with a
    standard deviation of about 5 (p(EOS) ~ 1e-9 per token at temperature 1). Throughput does not
    depend on the weights; this only keeps every completion at full length in both systems."""
    from raylm.models.config import preset
    from raylm.models.hf_checkpoint import save_checkpoint
    from raylm.models.transformer import Transformer

    model = Transformer(preset(preset_name, vocab_size=vocab, max_seq_len=max_seq_len))
    model.init_weights(seed=0)
    eos = model.config.eos_token_id
    with torch.no_grad():
        model.norm.weight.mul_(25.0)
        model.tok_embeddings.weight[eos] = 0.0
        if model.output is not None:
            model.output.weight[eos] = 0.0
    print(f"model: preset {preset_name}, vocabulary {vocab}, {model.num_params() / 1e6:.2f}M parameters", flush=True)
    return save_checkpoint(model, folder)


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=generator).tolist()


def raylm_rollout(engine, prompts, args):
    """One batch of rollouts from the engine actor, through Ray -> number of new tokens per prompt."""
    import ray

    results = ray.get(engine.generate.remote(prompts, max_new_tokens=args.new_tokens, temperature=args.temperature,
                                             top_p=args.top_p, seed=None), timeout=600)
    return [len(r["tokens"]) for r in results]


def transformers_rollout(model, input_ids, args):
    """The same batch from transformers' ``generate`` in this process -> new tokens per prompt."""
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                                temperature=args.temperature, top_p=args.top_p, top_k=0,
                                max_new_tokens=args.new_tokens, pad_token_id=0)
    return [output.shape[1] - input_ids.shape[1]] * len(input_ids)


def compare(engine, checkpoint: Path, prompts, args) -> dict:
    """One warm-up call each, then ``repeats`` rounds of one call each, alternating (the engine
    actor idles while transformers runs in the driver): load that comes and goes hits both."""
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.cpus)
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    input_ids = torch.tensor(prompts)
    calls = {"raylm": lambda: raylm_rollout(engine, prompts, args),
             "transformers": lambda: transformers_rollout(model, input_ids, args)}
    seconds = {name: [] for name in calls}
    lengths = {name: set(call()) for name, call in calls.items()}
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            lengths[name] |= set(call())
            seconds[name].append(time.perf_counter() - start)
    return {"seconds": seconds, "lengths": lengths}


def weight_sync_seconds(engine, checkpoint: Path, repeats: int, bucket_mb: float) -> tuple[float, int]:
    """Median seconds of packing + ray.put + the engine loading a new policy, and the bytes sent."""
    import ray

    from raylm.actors.generation_engine import pack_weight_buckets
    from raylm.models.hf_checkpoint import load_checkpoint, to_hf_state_dict

    model = load_checkpoint(checkpoint)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    seconds = []
    size = 0
    for version in range(1, repeats + 2):
        with torch.no_grad():  # a different policy every time, as after a PPO update
            for tensor in state.values():
                tensor.mul_(1.0 + 1e-3)
        start = time.perf_counter()
        buckets = pack_weight_buckets(to_hf_state_dict(model.config, state), int(bucket_mb * 2**20))
        refs = [ray.put(b) for b in buckets]
        ray.get(engine.load_weight_buckets.remote(refs, version), timeout=600)
        if version > 1:  # the first one warms up
            seconds.append(time.perf_counter() - start)
        size = sum(b["data"].nbytes for b in buckets)
        assert ray.get(engine.version.remote(), timeout=60) == version
    return statistics.median(seconds), size


def demo_ppo_step(uri: str) -> dict | None:
    """Mean step and weight-sync seconds of the latest `raylm rlhf` run in an MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(experiments, "metrics.`time/step_s` > 0", order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        return None
    run = runs[0]

    def mean(name):
        return statistics.mean(m.value for m in client.get_metric_history(run.info.run_id, name))

    return {"run": run.info.run_id, "steps": len(client.get_metric_history(run.info.run_id, "time/step_s")),
            "step_s": mean("time/step_s"), "weight_sync_s": mean("time/weight_sync_s"),
            "bytes": run.data.metrics.get("weight_sync/bytes"), "backend": run.data.params.get("rollout.backend")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="debug", help="model size (the laptop demo's: debug)")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary (the laptop demo's: 4096)")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--cpus", type=int, default=2, help="the engine actor's CPUs = transformers' threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.1, help="vLLM on CPU: share of host RAM")
    parser.add_argument("--bucket-mb", type=float, default=64.0, help="weight-sync bucket size (rlhf's default)")
    parser.add_argument("--mlflow", default=f"sqlite:///{ROOT / 'out' / 'laptop' / 'mlflow.db'}",
                        help="MLflow store holding a `raylm rlhf` run (its PPO step time)")
    args = parser.parse_args()
    if args.prompt_tokens + args.new_tokens > args.max_seq_len:
        parser.error("--prompt-tokens + --new-tokens exceed --max-seq-len")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from raylm.actors.generation_engine import make_generation_engine

    with tempfile.TemporaryDirectory(prefix="raylm-bench-rollout-") as tmp:
        checkpoint = build_checkpoint(Path(tmp) / "checkpoint", args.preset, args.vocab, args.max_seq_len)
        prompts = make_prompts(args.prompts, args.prompt_tokens, args.vocab)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            engine = make_generation_engine(checkpoint, backend="vllm", num_cpus=args.cpus,
                                            max_model_len=args.max_seq_len,
                                            gpu_memory_utilization=args.gpu_memory_utilization)
            ray.get(engine.ready.remote(), timeout=600)
            result = compare(engine, checkpoint, prompts, args)
            sync_s, sync_bytes = weight_sync_seconds(engine, checkpoint, args.repeats, args.bucket_mb)
        finally:
            ray.shutdown()

    for name, lengths in result["lengths"].items():
        if lengths != {args.new_tokens}:
            print(f"{name}: completions of {sorted(lengths)} tokens, expected {args.new_tokens}: void", file=sys.stderr)
            return 1
    tokens = args.prompts * args.new_tokens
    ours, theirs = result["seconds"]["raylm"], result["seconds"]["transformers"]
    ratios = [t / o for o, t in zip(ours, theirs)]
    print(f"\n{args.prompts} prompts x {args.prompt_tokens} tokens, {args.new_tokens} new tokens each, temperature "
          f"{args.temperature}, top-p {args.top_p}; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end; {args.repeats} alternating rounds, medians\n")
    print("| system | seconds | new tokens/s |")
    print("|---|---|---|")
    for system, seconds in ((f"raylm VLLMEngine actor ({args.cpus} CPUs), through Ray", ours),
                            (f"transformers generate ({args.cpus} threads)", theirs)):
        print(f"| {system} | {statistics.median(seconds):.2f} | {tokens / statistics.median(seconds):.0f} |")
    # The headline is the median of the per-round ratios: each round's two timings saw the same load.
    print(f"\nraylm / transformers: {statistics.median(ratios):.2f}x, median of the rounds "
          f"({', '.join(f'{r:.2f}' for r in ratios)})")

    print(f"\nweight sync (pack + ray.put + engine reload): {sync_s * 1000:.1f} ms for {sync_bytes / 2**20:.1f} MiB")
    demo = demo_ppo_step(args.mlflow)
    if demo is None:
        print(f"no `raylm rlhf` run in {args.mlflow}: run `raylm run examples/laptop.yaml` for the PPO step time")
        return 0
    print(f"PPO step of the latest `raylm rlhf` run ({demo['run'][:8]}, {demo['steps']} steps, rollout.backend: "
          f"{demo['backend']}, {(demo['bytes'] or 0) / 2**20:.1f} MiB of weights): {demo['step_s']:.3f} s")
    print(f"  this benchmark's sync / that step: {sync_s / demo['step_s']:.1%}")
    print(f"  that run's own time/weight_sync_s ({demo['weight_sync_s'] * 1000:.1f} ms, trainer gather included) "
          f"/ its step: {demo['weight_sync_s'] / demo['step_s']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
