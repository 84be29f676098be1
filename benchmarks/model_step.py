"""Training-step throughput: raylm's dense model against transformers' LlamaForCausalLM.

Both models get the same architecture, the same weights, batch, dtype and AdamW; their steps
(forward + backward + optimizer) alternate in one process so that both see the same machine
state. Prints tokens/s of each, the ratio, and each side's achieved FLOP/s as a fraction of a
plain matmul's FLOP/s measured in the same run (the physical limit on this device).

    .venv/bin/python benchmarks/model_step.py                      # CPU, 28M model, 8 x 256
    python3 benchmarks/model_step.py --device cuda --preset 1b --batch 4 --seq 2048
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

try:
    from raylm.models.config import preset
    from raylm.models.hf_checkpoint import save_checkpoint
    from raylm.models.transformer import Transformer, flops_per_token
except ImportError:  # a bare checkout (e.g. a GPU box without raylm installed): models/ is plain PyTorch
    import importlib
    import types

    root = Path(__file__).resolve().parents[1]
    package = types.ModuleType("raylm")
    package.__path__ = [str(root / "raylm")]
    sys.modules["raylm"] = package
    models = importlib.util.spec_from_file_location("raylm.models", root / "models" / "__init__.py",
                                                    submodule_search_locations=[str(root / "models")])
    sys.modules["raylm.models"] = importlib.util.module_from_spec(models)
    from raylm.models.config import preset
    from raylm.models.hf_checkpoint import save_checkpoint
    from raylm.models.transformer import Transformer, flops_per_token


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops_per_s(m: int, k: int, n: int, dtype, device, repeats: int = 20) -> float:
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * m * k * n * repeats / (time.perf_counter() - start)


def build_pair(args, device):
    cfg = preset(args.preset, max_seq_len=max(args.seq, 256))
    raylm_model = Transformer(cfg)
    raylm_model.init_weights(seed=0)
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(raylm_model, folder)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                     attn_implementation="sdpa")
    return cfg, raylm_model.to(device).train(), hf_model.to(device).train()


def make_step(model, is_hf: bool, autocast_dtype, device):
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=None if fused else True)

    def step(tokens, labels):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if is_hf:  # transformers' own training path: it shifts the labels and computes the loss
                loss = model(input_ids=tokens, labels=tokens).loss
            else:
                logits = model(tokens[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        optimizer.step()
        return loss

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of fp32 / bf16 (bf16 = autocast)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile each raylm block (as training does)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for dtype_name in args.dtypes.split(","):
        autocast_dtype = {"fp32": None, "bf16": torch.bfloat16}[dtype_name]
        cfg, ours, theirs = build_pair(args, device)
        if args.compile:
            for block in ours.layers.values():
                block.compile()
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
        steps = {"raylm": make_step(ours, False, autocast_dtype, device),
                 "transformers": make_step(theirs, True, autocast_dtype, device)}
        times = {name: [] for name in steps}
        for i in range(args.warmup + args.steps):
            for name, step in steps.items():  # alternate, so both see the same machine state
                sync(device)
                start = time.perf_counter()
                step(tokens, tokens[:, 1:])
                sync(device)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        n_tokens = args.batch * args.seq
        matmul_dtype = autocast_dtype or torch.float32
        peak = matmul_flops_per_s(n_tokens, cfg.dim, cfg.ffn_dim, matmul_dtype, device)
        flops = flops_per_token(cfg, args.seq)
        print(f"\n[{dtype_name}] {args.preset} ({ours.num_params() / 1e6:.1f}M params), batch {args.batch} x {args.seq}, "
              f"plain matmul {peak / 1e12:.3f} TFLOP/s")
        rates = {}
        for name, ts in times.items():
            rates[name] = n_tokens / statistics.median(ts)
            achieved = rates[name] * flops
            print(f"  {name:13s} {rates[name]:12,.0f} tokens/s   {achieved / 1e12:.3f} TFLOP/s = "
                  f"{achieved / peak:6.1%} of matmul")
        print(f"  ratio raylm / transformers: {rates['raylm'] / rates['transformers']:.2f}x")
        del ours, theirs, steps


if __name__ == "__main__":
    main()
