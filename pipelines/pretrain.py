"""`raylm pretrain`: train a dense or MoE model from scratch on the token shards of `raylm data`,
as a Ray Train worker group (FSDP2 over gloo on CPU, NCCL on GPU).

Checkpoints are sharded (DCP) and reported to Ray Train every ``train.checkpoint_every`` steps under
``<output_dir>/ray_train/<stage>``; a worker that dies is replaced and the group resumes from the
latest one (``train.max_failures``), and running the same config again resumes there too. The
final model is written to ``<output_dir>/hf`` in Hugging Face format and logged to MLflow.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from pydantic import Field

from raylm.config import ConfigError, ModelStageConfig
from raylm.tracking import StageRun
from raylm.train.spec import TokenData, TrainingSpec
from raylm.train.config import OptimConfig, ParallelConfig, TrainConfig


class Config(ModelStageConfig):
    data_dir: str = "out/data"  # `raylm data`'s output_dir (shards in tokens/), or a folder holding index.json
    tokenizer: str | None = None  # shipped with the exported model; None: the data stage's tokenizer.json
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)


def check(config: Config, config_path) -> None:
    from raylm.data.token_shards import read_index

    try:
        index = read_index(shard_dir(config.data_dir))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{config_path}: data_dir: {e}") from None
    if config.model.vocab_size < index["vocab_size"]:
        raise ConfigError(f"{config_path}: model.vocab_size: {config.model.vocab_size} is smaller than the data's "
                          f"vocabulary ({index['vocab_size']} in {Path(config.data_dir) / 'index.json'})")
    if config.train.seq_len > config.model.max_seq_len:
        raise ConfigError(f"{config_path}: train.seq_len: {config.train.seq_len} exceeds model.max_seq_len "
                          f"({config.model.max_seq_len})")
    if config.tokenizer and not Path(config.tokenizer).exists():
        raise ConfigError(f"{config_path}: tokenizer: {config.tokenizer} does not exist")
    check_parallel(config, config_path)


def check_parallel(config, config_path, model=None, model_key: str = "model") -> None:
    """The parallel section against the workers, the sequence and the model (a TransformerConfig;
    default ``config.model``; ``model_key`` names where it comes from in errors: ``model.<field>``
    for pretraining, ``checkpoint`` for a fine-tuning start)."""
    if config.train.fail_at_step is not None and config.train.fail_rank >= config.parallel.num_workers:
        raise ConfigError(f"{config_path}: train.fail_rank: {config.train.fail_rank} is not a rank of "
                          f"{config.parallel.num_workers} workers")
    parallel = config.parallel
    if parallel.cp > 1 and config.train.seq_len % parallel.cp:
        raise ConfigError(f"{config_path}: parallel.cp: {parallel.cp} does not divide train.seq_len "
                          f"({config.train.seq_len})")
    if parallel.pp > 1:
        model = model if model is not None else config.model
        field = (lambda name: f"model.{name}") if model_key == "model" else (lambda name: model_key)
        problems = [
            (field("tie_embeddings"), model.tie_embeddings and "tied embeddings would span the first and last stage; "
                                                              "pretrain with model.tie_embeddings=false"),
            (field("n_layers"), model.n_layers < parallel.pp and f"{model.n_layers} blocks for {parallel.pp} stages"),
            ("train.batch_size", config.train.batch_size % parallel.pp_microbatches
                                and f"{config.train.batch_size} is not divisible by parallel.pp_microbatches "
                                    f"({parallel.pp_microbatches})"),
        ]
        for key, problem in problems:
            if problem:
                raise ConfigError(f"{config_path}: {key}: {problem} (parallel.pp={parallel.pp})")


def training_spec(config, stage: str, stage_run: StageRun, **fields) -> TrainingSpec:
    """What every worker needs (pickled once into the worker group): the config's ``train``,
    ``optim`` and ``parallel`` sections, and the stage's own ``fields`` of ``TrainingSpec``."""
    return TrainingSpec(stage=stage, seed=config.seed, train=config.train.model_copy(), optim=config.optim.model_copy(),
                        parallel=config.parallel.model_copy(), stage_run=stage_run,
                        export_dir=str((config.output_path / "hf").resolve()), **fields)


def launch(config, spec: TrainingSpec, loop=None) -> dict:
    """Run the worker group to the end (through failures, up to ``max_failures``); returns the
    final metrics rank 0 reported. ``loop``: the worker loop (default: ``train_worker.train_loop``;
    the preference stages bring their own); it gets ``{"spec": spec}``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raylm.actors.train.train_worker import train_loop
    from raylm.ray_init import init_ray

    train_loop = loop or train_loop

    init_ray(config.ray)
    storage = (config.output_path / "ray_train").resolve()
    name = spec.stage if config.train.resume else f"{spec.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    spec.run_dir = str(storage / name)
    parallel = config.parallel
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if parallel.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=parallel.num_workers, use_gpu=parallel.use_gpu,
            resources_per_worker={"CPU": parallel.cpus_per_worker, **({"GPU": 1} if parallel.use_gpu else {}),
                                  **parallel.resources_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            # Ray Train's own INFO lines ("Reporting training result ...") come from every rank at
            # every report; the console shows rank 0's step lines instead.
            **({"logging_config": ray.train.LoggingConfig(log_level="WARNING")}
               if hasattr(ray.train, "LoggingConfig") else {}),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return {**(result.metrics or {}), "checkpoint_dir": result.checkpoint.path if result.checkpoint else None}


def unigram_loss(data_dir: str) -> float:
    """Cross-entropy (nats/token) of the validation tokens under the training split's unigram
    distribution (add-one smoothed): the loss of a model that ignores context."""
    from raylm.data.token_shards import read_index

    index = read_index(data_dir)
    dtype = np.dtype(index["dtype"]).newbyteorder("<")

    def shards(split):
        for entry in index["splits"].get(split, []):
            if entry["tokens"]:
                yield np.memmap(Path(data_dir) / entry["file"], dtype=dtype, mode="r")

    vocab = index["vocab_size"]
    counts = np.ones(vocab, dtype=np.float64)
    for tokens in shards("train"):
        counts += np.bincount(tokens, minlength=vocab)[:vocab]
    logp = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for tokens in shards("validation"):
        total -= logp[tokens].sum()
        n += len(tokens)
    return total / max(n, 1)


def finish(config, stage_run: StageRun, final: dict, started: float) -> dict:
    export_dir = config.output_path / "hf"
    stage_run.log_artifact(export_dir, "model")
    summary = {
        "checkpoint": str(export_dir),
        "steps": final.get("step"),
        "loss": final.get("loss"),
        "val_loss": final.get("val_loss"),
        "tokens_per_s": final.get("mean_tokens_per_s", final.get("tokens_per_s")),
        "mfu": final.get("mean_mfu", final.get("mfu")),
        "wall_s": time.perf_counter() - started,
        "ray_checkpoint": final.get("checkpoint_dir"),
        "resumed_from_step": final.get("resumed_from_step"),  # None: the run started from step 0
    }
    stage_run.log_metrics({"wall_s": summary["wall_s"]})
    return summary


def shard_dir(data_dir: str | Path) -> Path:
    """The folder holding index.json: ``data_dir`` itself, or the ``tokens/`` that `raylm data` writes."""
    data_dir = Path(data_dir)
    if not (data_dir / "index.json").exists() and (data_dir / "tokens" / "index.json").exists():
        return data_dir / "tokens"
    return data_dir


def find_tokenizer(config: Config) -> Path | None:
    """``tokenizer`` if set, else the data stage's: beside the shards or one folder up."""
    if config.tokenizer:
        return Path(config.tokenizer)
    shards = shard_dir(config.data_dir)
    for folder in (shards, shards.parent):
        if (folder / "tokenizer.json").exists():
            return folder / "tokenizer.json"
    return None


def run(config: Config, stage_run: StageRun) -> dict:
    started = time.perf_counter()
    tokenizer = find_tokenizer(config)
    spec = training_spec(config, "pretrain", stage_run, model=config.model.to_dict(),
                         data=TokenData(str(shard_dir(config.data_dir).resolve())),
                         tokenizer_file=str(tokenizer.resolve()) if tokenizer else None)
    final = launch(config, spec)
    summary = finish(config, stage_run, final, started)
    summary["unigram_val_loss"] = unigram_loss(shard_dir(config.data_dir))
    stage_run.log_metrics({"unigram_val_loss": summary["unigram_val_loss"]})
    if summary["val_loss"] is not None:  # None: no validation (train.eval_every=0)
        print(f"raylm pretrain: validation loss {summary['val_loss']:.4f} vs unigram baseline "
              f"{summary['unigram_val_loss']:.4f}", flush=True)
    return summary
