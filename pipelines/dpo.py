"""`raylm dpo`: Direct Preference Optimisation of a Hugging Face checkpoint on preference pairs,
against a frozen reference model, on a Ray Train worker group (the one training loop,
``actors/train/train_worker.py``, on ``raylm.train.objectives.DirectPreference``).

The reference's log-probs of every pair are computed once, before training, by plain Ray tasks
(``<output_dir>/reference_logprobs.safetensors``, reused when the same run is resumed); the
reference model is never held during training. Loss ``sigmoid`` (DPO) or ``ipo`` on the summed
log-probs of the answer tokens, ``beta`` configurable. Data as `raylm reward` (pairs, rankings or
``data.builtin: stdlib-docstrings``).

Reported, on training batches and on the held-out pairs (before training and every
``train.eval_every`` steps): the policy's chosen-minus-rejected log-prob margin and how often it
prefers the chosen answer (``accuracy``), and the implicit rewards beta * log(pi / ref) of chosen and
rejected answers, their margin and accuracy. The policy goes to ``<output_dir>/hf``.

``peft:`` as in `raylm sft` (LoRA / QLoRA, bottleneck adapters, prompt tuning; ``freeze:`` trains
only some blocks). With LoRA the reference is the base with the adapters off, which is the starting
checkpoint itself (quantized like the policy's base under QLoRA), so it still costs one pass before
training. Outputs as `raylm sft`'s: LoRA's adapter in ``hf/adapter`` beside the merged ``hf/``;
bottleneck adapters and soft prompts only in ``hf/adapter``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from raylm.config import ConfigError, InputPath, Section, StageConfig
from raylm.peft.config import PeftConfig
from raylm.tracking import StageRun
from raylm.train.config import FreezeConfig, OptimConfig, ParallelConfig
from raylm.train.launcher import check_peft, finish, launch, tokenizer_path
from raylm.train.preference_stage import (PreferenceDataConfig, PreferenceTrainConfig, check_preference_stage,
                                          load_pairs, preference_spec)


class DPOLossConfig(Section):
    kind: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid: DPO; ipo: squared distance to 1 / (2 beta)
    beta: float = Field(default=0.1, gt=0)  # strength of the pull toward the reference
    # RPO (Pang et al. 2024): weight of the chosen answer's per-token negative log-likelihood added to
    # each pair's loss; 0 is plain DPO / IPO. It keeps the chosen answers likely as the pair is pushed apart.
    nll_weight: float = Field(default=0.0, ge=0)


class DPOOptimConfig(OptimConfig):
    lr: float = Field(default=1e-4, gt=0)
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)


class Config(StageConfig):
    checkpoint: InputPath = "out/sft/hf"  # the policy starts here (`raylm sft` output)
    reference: InputPath | None = None  # the frozen reference; None: the starting checkpoint
    data: PreferenceDataConfig = Field(default_factory=PreferenceDataConfig)
    epochs: float | None = Field(default=None, gt=0)  # sets train.steps from the training pairs; None: train.steps
    # the preference loss against the frozen reference (DPO or IPO)
    loss: DPOLossConfig = Field(default_factory=DPOLossConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)  # LoRA / QLoRA, bottleneck adapters, prompt tuning
    # the training loop over preference pairs: steps, batch, evaluation, checkpoints
    train: PreferenceTrainConfig = Field(default_factory=PreferenceTrainConfig)
    # AdamW and its warmup + cosine learning-rate schedule
    optim: DPOOptimConfig = Field(default_factory=DPOOptimConfig)
    # Ray Train workers and how the model is split over them (FSDP, TP, EP, CP, PP)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)


def check(config: Config, config_path) -> None:
    check_preference_stage(config, config_path)
    if config.reference is not None and not (Path(config.reference) / "config.json").exists():
        raise ConfigError(f"{config_path}: reference: {Path(config.reference) / 'config.json'} not found "
                          "(a Hugging Face folder)")
    for key in ("checkpoint", "reference"):
        path = getattr(config, key)
        if path is not None:
            hf = json.loads((Path(path) / "config.json").read_text())
            if any(a.endswith("ForSequenceClassification") for a in hf.get("architectures", [])):
                raise ConfigError(f"{config_path}: {key}: {path} is a reward model; DPO needs a language model")
    check_peft(config, config_path, json.loads((Path(config.checkpoint) / "config.json").read_text()))


def reference_quantization(config: Config) -> tuple[str, int, bool] | None:
    """QLoRA's frozen reference is the policy's own base with the adapters off: the starting
    checkpoint quantized as the policy's base is (unless a separate ``reference`` is given)."""
    peft = config.peft
    if config.reference is None and peft.method == "lora" and peft.quantize != "none":
        return peft.quantize, peft.block_size, peft.double_quant
    return None


def reference_logprobs_file(config: Config, pairs: dict, tokenizer: str) -> Path:
    """Compute the reference's log-probs of every pair once (Ray tasks); a file made for the same
    reference weights, data and sequence length is reused."""
    from safetensors.torch import save_file

    from raylm.train.objectives import reference_logprobs

    reference = Path(config.reference or config.checkpoint).resolve()
    quantize = reference_quantization(config)
    key = hashlib.sha256()
    for part in (json.dumps(pairs, sort_keys=True), str(config.train.seq_len),
                 (reference / "config.json").read_text(), json.dumps(quantize)):
        key.update(part.encode())
    key.update(str((reference / "model.safetensors").stat().st_mtime_ns if (reference / "model.safetensors").exists()
                   else "").encode())
    path = config.output_path / "reference_logprobs.safetensors"
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") == key.hexdigest():
                print(f"[dpo] reference log-probs reused from {path}", flush=True)
                return path
    started = time.perf_counter()
    tensors = {}
    for name in ("train", "validation"):
        tensors[name] = reference_logprobs(str(reference), pairs[name], tokenizer, config.train.seq_len,
                                           config.train.batch_size, num_tasks=config.parallel.num_workers,
                                           cpus_per_task=config.parallel.cpus_per_worker,
                                           quantize=quantize).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"key": key.hexdigest(), "reference": str(reference)})
    print(f"[dpo] reference log-probs of {sum(len(t) for t in tensors.values())} pairs in "
          f"{time.perf_counter() - started:.1f}s -> {path}", flush=True)
    return path


def run(config: Config, stage_run: StageRun) -> dict:
    from raylm.data.preferences import PreferenceDataError
    from raylm.train.spec import DPOLoss, Freeze

    started = time.perf_counter()
    tokenizer = str(tokenizer_path(config).resolve())
    try:
        pairs = load_pairs(config, stage_run, "dpo")
    except PreferenceDataError as e:
        raise ConfigError(str(e)) from None
    reference_file = reference_logprobs_file(config, pairs, tokenizer)
    stage_run.log_metrics({"reference_logprobs_s": time.perf_counter() - started})
    spec = preference_spec(config, "dpo", stage_run, pairs, tokenizer, objective="dpo",
                           dpo=DPOLoss(config.loss.beta, config.loss.kind, str(reference_file.resolve()),
                                       config.loss.nll_weight),
                           freeze=Freeze(config.freeze.train_layers, config.freeze.train_from),
                           peft=config.peft.model_copy())
    final = launch(config, spec)
    summary = finish(config, stage_run, final, started, {k: final.get(k) for k in (
        "loss", "initial_val_accuracy", "val_accuracy", "initial_val_logp_margin", "val_logp_margin",
        "val_reward_accuracy", "val_reward_margin")})
    print(f"raylm dpo: held-out preference accuracy {summary['initial_val_accuracy']} -> {summary['val_accuracy']}, "
          f"chosen-minus-rejected log-prob margin {summary['initial_val_logp_margin']} -> {summary['val_logp_margin']}",
          flush=True)
    preferences = held_out_preferences(config, pairs["validation"], tokenizer, reference_file)
    if preferences is not None:
        stage_run.log_artifact(preferences)
        summary["held_out_preferences"] = str(preferences)
    return summary


def held_out_preferences(config: Config, pairs: list[dict], tokenizer: str, reference_file: Path) -> Path | None:
    """Each held-out pair's log-probs (chosen, rejected) under the starting checkpoint and the trained
    model, to <output_dir>/held_out_preferences.jsonl: which pairs DPO turned, and the per-pair
    outcomes a paired interval of the accuracy gain needs (raylm.eval.gains). The starting
    checkpoint's are the reference file's when the reference is that checkpoint, unquantized. None
    when the export is an adapter alone (the model is the base plus it) or there are no pairs."""
    from safetensors.torch import load_file

    from raylm.train.objectives import reference_logprobs

    trained = config.output_path / "hf"
    if not pairs or not (trained / "config.json").exists() or (trained / "adapter").exists() \
            and not any(trained.glob("model*.safetensors")):
        return None
    tasks = dict(num_tasks=config.parallel.num_workers, cpus_per_task=config.parallel.cpus_per_worker)
    args = (pairs, tokenizer, config.train.seq_len, config.train.batch_size)
    if config.reference is None and reference_quantization(config) is None:
        before = load_file(str(reference_file))["validation"]
    else:
        before = reference_logprobs(str(Path(config.checkpoint).resolve()), *args, **tasks)
    after = reference_logprobs(str(trained.resolve()), *args, **tasks)
    path = config.output_path / "held_out_preferences.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, pair in enumerate(pairs):
            f.write(json.dumps({"id": pair.get("id", i), "before": before[i].tolist(), "after": after[i].tolist(),
                                "before_prefers_chosen": bool(before[i, 0] > before[i, 1]),
                                "after_prefers_chosen": bool(after[i, 0] > after[i, 1])}) + "\n")
    return path
