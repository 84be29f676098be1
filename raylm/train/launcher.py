"""What the driver of a Ray Train stage does around its worker group (`raylm pretrain`, `sft`,
`reward`, `dpo`): check the config against the starting checkpoint, the parallel layout and the PEFT
method before any Ray work; build the ``TrainingSpec`` every rank gets; run the group to the end
through failures (``launch``); and sum up its result (``finish``).

Every stage's group runs the one loop, ``raylm.actors.train.train_worker.train_loop``, on the
objective its ``TrainingSpec`` names (``raylm.train.objectives``).
Checkpoints are sharded (DCP) and reported to Ray Train under ``<output_dir>/ray_train/<stage>``; a
worker that dies is replaced and the group resumes from the latest one (``train.max_failures``), and
running the same config again resumes there too. The final model goes to ``<output_dir>/hf``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from raylm.config import ConfigError, where_relative
from raylm.tracking import StageRun
from raylm.train.spec import TrainingSpec

# ---- checks, before any Ray work ------------------------------------------------------------------


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


def check_token_data(config, config_path) -> dict:
    """A from-scratch model's ``data_dir`` (token shards), ``model`` and ``tokenizer`` against each
    other (pretraining, scaling sweeps); returns the shards' index."""
    from raylm.data.token_shards import read_index, shard_dir

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
    return index


def check_start_checkpoint(config, config_path, made_by: str, implementation: str = "raylm") -> dict:
    """The Hugging Face folder a fine-tuning stage starts from (``config.checkpoint``, e.g. the output
    of ``made_by``) against ``train.seq_len`` and ``freeze.train_layers``, and, when it trains through
    transformers (``implementation``: see ``raylm.train.transformers_model``), against the settings
    that path cannot run; returns its config.json."""
    hf_config = Path(config.checkpoint) / "config.json"
    if not hf_config.exists():
        raise ConfigError(f"{config_path}: checkpoint: {hf_config} not found (a Hugging Face folder, e.g. "
                          f"`{made_by}` output's hf/)")
    hf = json.loads(hf_config.read_text())
    from raylm.models.hf_checkpoint import config_from_hf
    from raylm.train.transformers_model import max_positions, resolve_implementation, unsupported_settings

    if resolve_implementation(hf, implementation) == "transformers":
        for key, why in unsupported_settings(config):
            raise ConfigError(f"{config_path}: {key}: {why} (checkpoint {hf_config.parent}: model_type "
                              f"{hf.get('model_type')!r} trains through transformers, implementation: {implementation})")
        longest = max_positions(hf_config.parent)
    else:
        try:  # a family or a field raylm does not implement stops here, named, before any Ray work
            config_from_hf(hf)
        except ValueError as e:
            raise ConfigError(f"{config_path}: checkpoint: {hf_config.parent}/{e}") from None
        longest = hf.get("max_position_embeddings")
    if longest is not None and config.train.seq_len > longest:
        raise ConfigError(f"{config_path}: train.seq_len: {config.train.seq_len} exceeds the checkpoint's "
                          f"max_position_embeddings ({longest})")
    n_layers = hf.get("num_hidden_layers")
    if config.freeze.train_layers is not None and n_layers is not None and config.freeze.train_layers > n_layers:
        raise ConfigError(f"{config_path}: freeze.train_layers: {config.freeze.train_layers} exceeds the "
                          f"checkpoint's {n_layers} layers")
    return hf


def check_peft(config, config_path, hf: dict) -> None:
    """The ``peft:`` section against the rest of a stage config (`raylm sft` and `raylm dpo`)."""
    peft = config.peft
    if peft.quantize != "none" and peft.method != "lora":
        raise ConfigError(f"{config_path}: peft.quantize: {peft.quantize} needs peft.method: lora "
                          "(a quantized base is not trained)")
    if peft.method == "none":
        return
    if config.freeze.train_layers is not None:
        raise ConfigError(f"{config_path}: freeze.train_layers and peft.method: {peft.method} both set; "
                          f"{peft.method} already freezes the whole base: choose one")
    parallel = config.parallel
    for key in ("tp", "pp", "ep"):
        if getattr(parallel, key, 1) > 1:
            raise ConfigError(f"{config_path}: parallel.{key}: peft.method {peft.method} runs with data (FSDP2) "
                              "and context parallelism only")
    if peft.method == "prompt_tuning" and peft.num_virtual_tokens + config.train.seq_len > hf.get(
            "max_position_embeddings", math.inf):
        raise ConfigError(f"{config_path}: peft.num_virtual_tokens: {peft.num_virtual_tokens} soft-prompt positions + "
                          f"train.seq_len {config.train.seq_len} exceed the checkpoint's max_position_embeddings "
                          f"({hf['max_position_embeddings']})")
    if peft.method != "lora":
        return
    mlp = sorted(set(peft.target_modules) & {"gate_proj", "up_proj", "down_proj"})
    if hf.get("model_type", "llama") != "llama" and mlp:
        raise ConfigError(f"{config_path}: peft.target_modules: {mlp} on a Mixture-of-Experts model (its experts "
                          "are not Linear layers); target the attention projections")
    if peft.double_quant and peft.quantize != "nf4":
        raise ConfigError(f"{config_path}: peft.double_quant quantizes NF4's scales: it needs peft.quantize: nf4")
    if peft.quantize == "nf4":
        dims = [hf.get("hidden_size", 0), hf.get("intermediate_size", 0)]
        if any(d * dims[0] % peft.block_size for d in dims):
            raise ConfigError(f"{config_path}: peft.block_size: {peft.block_size} does not divide the weights")


def check_data_files(config, config_path, read, error: type[Exception], separator: str = " ") -> None:
    """A fine-tuning stage's ``data.train`` / ``data.validation`` (unless ``data.builtin``): each a
    file that ``read(path)`` reads without raising ``error``."""
    if config.data.builtin is not None:
        return
    for key in ("train", "validation"):
        path = getattr(config.data, key)
        if path is None or not Path(path).is_file():
            raise ConfigError(f"{config_path}: data.{key}: {path!r} is not a file (or set data.builtin)"
                              + where_relative(path, config_path))
        try:
            read(path)
        except error as e:
            raise ConfigError(f"{config_path}: data.{key}:{separator}{e}") from None


def check_tokenizer(config, config_path) -> None:
    if not tokenizer_path(config).exists():
        raise ConfigError(f"{config_path}: data.tokenizer: no tokenizer.json given or in {config.checkpoint}")


def tokenizer_path(config) -> Path:
    """A fine-tuning stage's tokenizer.json: ``data.tokenizer``, else the starting checkpoint's."""
    return Path(config.data.tokenizer) if config.data.tokenizer else Path(config.checkpoint) / "tokenizer.json"


# ---- the worker group ---------------------------------------------------------------------------


def training_spec(config, stage: str, stage_run: StageRun, **fields) -> TrainingSpec:
    """What every worker needs (pickled once into the worker group): the config's ``train``,
    ``optim`` and ``parallel`` sections, and the stage's own ``fields`` of ``TrainingSpec``."""
    return TrainingSpec(stage=stage, seed=config.seed, train=config.train.model_copy(), optim=config.optim.model_copy(),
                        parallel=config.parallel.model_copy(), stage_run=stage_run,
                        export_dir=str((config.output_path / "hf").resolve()), **fields)


def launch(config, spec: TrainingSpec) -> dict:
    """Run the worker group (``train_worker.train_loop`` on ``{"spec": spec}``) to the end, through
    failures (up to ``max_failures``), on the Ray the stage runs on (``raylm.stages.run_stage``
    starts it); returns the final metrics rank 0 reported."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raylm.actors.train.train_worker import train_loop

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


def lm_results(final: dict) -> dict:
    """A language-model stage's results (pretraining, SFT): losses and throughput, steady-state
    means where the run was long enough to have them."""
    return {"loss": final.get("loss"), "val_loss": final.get("val_loss"),
            "tokens_per_s": final.get("mean_tokens_per_s", final.get("tokens_per_s")),
            "mfu": final.get("mean_mfu", final.get("mfu"))}


def finish(config, stage_run: StageRun, final: dict, started: float, results: dict) -> dict:
    """The stage's summary: the exported model (logged to MLflow), the steps, the stage's own
    ``results``, the wall time and the last Ray Train checkpoint."""
    export_dir = config.output_path / "hf"
    stage_run.log_artifact(export_dir, "model")
    summary = {
        "checkpoint": str(export_dir),
        "steps": final.get("step"),
        **results,
        "wall_s": time.perf_counter() - started,
        "ray_checkpoint": final.get("checkpoint_dir"),
        "resumed_from_step": final.get("resumed_from_step"),  # None: the run started from step 0
    }
    stage_run.log_metrics({"wall_s": summary["wall_s"]})
    return summary
