"""`raylm pretrain`: train a dense or MoE model from scratch on the token shards of `raylm data`,
as a Ray Train worker group (FSDP2 over gloo on CPU, NCCL on GPU; ``raylm.train.launcher``).

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

from raylm.config import InputPath, ModelStageConfig
from raylm.data.token_shards import data_tokenizer, shard_dir
from raylm.tracking import StageRun
from raylm.train.config import OptimConfig, ParallelConfig, TrainConfig
from raylm.train.launcher import check_parallel, check_token_data, finish, launch, lm_results, training_spec
from raylm.train.spec import TokenData


class Config(ModelStageConfig):
    data_dir: InputPath = "out/data"  # `raylm data`'s output_dir (shards in tokens/), or a folder holding index.json
    tokenizer: str | None = None  # shipped with the exported model; None: the data stage's tokenizer.json
    # the training loop: steps, batch, sequence length, evaluation, checkpoints, fault drills
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)  # AdamW and its warmup + cosine learning-rate schedule
    # Ray Train workers and how the model is split over them (FSDP, TP, EP, CP, PP)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)


def check(config: Config, config_path) -> None:
    check_token_data(config, config_path)
    check_parallel(config, config_path)


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


def run(config: Config, stage_run: StageRun) -> dict:
    started = time.perf_counter()
    tokenizer = Path(config.tokenizer) if config.tokenizer else data_tokenizer(config.data_dir)
    spec = training_spec(config, "pretrain", stage_run, model=config.model.to_dict(),
                         data=TokenData(str(shard_dir(config.data_dir).resolve())),
                         tokenizer_file=str(tokenizer.resolve()) if tokenizer else None)
    final = launch(config, spec)
    summary = finish(config, stage_run, final, started, lm_results(final))
    summary["unigram_val_loss"] = unigram_loss(shard_dir(config.data_dir))
    stage_run.log_metrics({"unigram_val_loss": summary["unigram_val_loss"]})
    if summary["val_loss"] is not None:  # None: no validation (train.eval_every=0)
        print(f"raylm pretrain: validation loss {summary['val_loss']:.4f} vs unigram baseline "
              f"{summary['unigram_val_loss']:.4f}", flush=True)
    return summary
