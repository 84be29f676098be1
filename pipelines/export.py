"""`raylm export`: build (or load) a model, write it as a Hugging Face checkpoint, and prove the
checkpoint is what raylm computes: transformers' logits, raylm's cached and uncached generation,
and a vLLM engine's greedy continuation and log-probs are compared against raylm's own.
"""

from __future__ import annotations

import time
from typing import Literal

import torch

from raylm.config import ConfigError, InputPath, ModelStageConfig
from raylm.models.generate import SamplingParams, generate
from raylm.models.hf_checkpoint import load_checkpoint, save_checkpoint
from raylm.models.transformer import Transformer, flops_per_token
from raylm.tracking import StageRun


class Config(ModelStageConfig):
    checkpoint: InputPath | None = None  # a Hugging Face folder to load instead of building `model`
    tokenizer: InputPath | None = None  # a tokenizer.json to ship with the checkpoint
    dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the weights written to the checkpoint
    verify_transformers: bool = True  # compare transformers' logits with raylm's on the first test prompt
    verify_vllm: bool = True  # skipped, and said so, where vLLM is not installed
    n_prompts: int = 4  # random test prompts for the checks (lengths prompt_len, prompt_len - 1, ...)
    prompt_len: int = 8  # tokens in the longest test prompt
    max_new_tokens: int = 16  # tokens generated greedily per test prompt (cache vs no cache, and vLLM)


def check(config: Config, config_path) -> None:
    from pathlib import Path

    for key in ("checkpoint", "tokenizer"):
        value = getattr(config, key)
        if value is not None and not Path(value).exists():
            raise ConfigError(f"{config_path}: {key}: {value} does not exist")


def build_model(config: Config) -> Transformer:
    if config.checkpoint:
        return load_checkpoint(config.checkpoint)
    model = Transformer(config.model)
    model.init_weights(seed=config.seed)
    return model


def sample_prompts(config: Config, vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(config.seed)
    lengths = [max(1, config.prompt_len - i) for i in range(config.n_prompts)]  # ragged: left padding
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def transformers_logits_diff(folder, model: Transformer, prompts) -> float:
    import transformers

    # its "Loading weights" bar ignores TQDM_DISABLE when tqdm was imported before raylm set it
    transformers.utils.logging.disable_progress_bar()
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = torch.tensor([prompts[0]])
    with torch.no_grad():
        return (reference(tokens).logits - model(tokens)).abs().max().item()


def vllm_agreement(folder, model: Transformer, prompts, config: Config) -> dict:
    import ray

    from raylm.actors.generation_engine import make_generation_engine, vllm_available
    from raylm.ray_init import init_ray

    if not vllm_available():
        print("raylm export: vLLM is not installed here; skipping the vLLM check", flush=True)
        return {}
    init_ray(config.ray)
    start = time.perf_counter()
    max_len = config.prompt_len + config.max_new_tokens + 8
    engine = make_generation_engine(folder, backend="vllm", dtype="float32", max_model_len=max_len, seed=config.seed)
    ray.get(engine.ready.remote(), timeout=600)
    startup = time.perf_counter() - start
    ours = generate(model, prompts, SamplingParams(max_new_tokens=config.max_new_tokens, temperature=0.0))
    theirs = [r["tokens"] for r in ray.get(engine.generate.remote(prompts, config.max_new_tokens), timeout=600)]
    sequences = [p + c for p, c in zip(prompts, ours)]
    vllm_logprobs = ray.get(engine.prompt_logprobs.remote(sequences), timeout=600)
    diffs = []
    with torch.no_grad():
        for seq, lp in zip(sequences, vllm_logprobs):
            tokens = torch.tensor([seq])
            ref = model(tokens).float().log_softmax(-1)[0, :-1].gather(-1, tokens[0, 1:, None]).squeeze(-1)
            diffs.append((ref - torch.tensor(lp)).abs().mean().item())
    ray.kill(engine)
    matched = sum(a == b for a, b in zip(ours, theirs))
    return {
        "vllm_startup_s": startup,
        "vllm_greedy_sequences_equal": matched / len(prompts),
        "vllm_logprob_mean_abs_diff": sum(diffs) / len(diffs),
    }


def run(config: Config, stage_run: StageRun) -> dict:
    model = build_model(config).eval()
    cfg = model.config
    folder = config.output_path / "hf"
    save_checkpoint(model, folder, tokenizer_file=config.tokenizer, dtype=getattr(torch, config.dtype))
    print(f"raylm export: wrote {folder} ({model.num_params() / 1e6:.2f}M parameters)", flush=True)
    model = load_checkpoint(folder).eval()  # from here on, the weights as written (and read back)
    prompts = sample_prompts(config, cfg.vocab_size)
    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=0.0)
    metrics = {
        "params_millions": model.num_params() / 1e6,
        "active_params_millions": model.num_params(active=True) / 1e6,
        "flops_per_token": flops_per_token(cfg, cfg.max_seq_len),
        "kv_cache_generation_equal": float(generate(model, prompts, params) == generate(model, prompts, params, use_cache=False)),
    }
    if config.verify_transformers:
        metrics["transformers_logits_max_abs_diff"] = transformers_logits_diff(folder, model, prompts)
    if config.verify_vllm:
        metrics.update(vllm_agreement(folder, model, prompts, config))
    stage_run.log_metrics(metrics)
    stage_run.log_artifact(folder, "checkpoint")
    for key, value in metrics.items():
        print(f"raylm export: {key} = {value:.6g}", flush=True)
    return {"checkpoint": str(folder), **metrics}
