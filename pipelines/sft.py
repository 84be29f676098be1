"""`raylm sft`: supervised fine-tuning of a Hugging Face checkpoint on instruction data (JSONL), on
the same Ray Train worker loop as pretraining (FSDP2, DCP checkpoints, failure recovery).

The loss covers only the assistant's tokens; several examples share a sequence without attending
to each other (see ``raylm.data.sft``). ``freeze.train_layers`` trains only N blocks (0: only the
head on frozen features): the last ones, or the early / intermediate ones (``freeze.train_from``).
``peft.method: lora`` trains LoRA adapters on the frozen (optionally int8 / NF4-quantized: QLoRA)
model instead (``raylm.peft.lora``); the adapter is written in PEFT's format to ``hf/adapter`` beside the
merged model in ``hf/``. ``peft.method: bottleneck`` (residual adapters after attention / MLP) and
``prompt_tuning`` (a soft prompt) cannot merge: ``hf/`` then holds only ``adapter/`` (the soft
prompt in PEFT's format, the bottleneck adapters in raylm's), applied to the starting checkpoint by
``raylm.peft.lora.load_peft``; the later stages need a full checkpoint, so they do not take it.
``data.builtin: stdlib-instructions`` builds a real instruction set from the running Python ("What
does `json.dumps` do?" -> its docstring's first line).

Defaults suit fine-tuning: LR 3e-4 with a short warmup, ``epochs: 3`` (sets ``train.steps``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from raylm.config import ConfigError, InputPath, Section, StageConfig, check_one_data_source
from raylm.peft.config import PeftConfig
from raylm.tracking import StageRun
from raylm.train.config import FreezeConfig, OptimConfig, ParallelConfig, TrainConfig
from raylm.train.launcher import (check_data_files, check_parallel, check_peft, check_start_checkpoint, check_tokenizer,
                                  finish, launch, lm_results, tokenizer_path, training_spec)


class MixSource(Section):
    path: InputPath  # JSONL of SFT records (e.g. `raylm synth` output's train.jsonl)
    weight: float = Field(gt=0)  # share of the mix: weight / the sum of the weights
    name: str | None = None  # the records' mix_source in the mix; default: the file's stem


class DataConfig(Section):
    """The instruction data: train/validation JSONL files, or a built-in set (not both)."""

    train: InputPath | None = None  # JSONL: {"prompt", "response"[, "system"]} or {"messages": [...]} per line
    validation: InputPath | None = None  # held-out JSONL, the validation (response) loss
    builtin: Literal["stdlib-instructions"] | None = None  # instead of train/validation files
    builtin_limit: int | None = Field(default=None, ge=2)  # examples of the built-in set (None: all)
    validation_fraction: float = Field(default=0.1, gt=0, lt=1)  # of the built-in set's functions (as reward's)
    tokenizer: InputPath | None = None  # tokenizer.json; default: the checkpoint's
    system_prompt: str | None = None  # prepended to conversations that have none
    mix: list[MixSource] | None = None  # instead of train: files mixed by weight (raylm.data.synthetic.mix_records)
    mix_size: int | None = Field(default=None, ge=1)  # records in the mix; None: as many as its files hold together

    @model_validator(mode="after")
    def _one_source(self):
        if self.mix is not None:
            if self.train is not None or self.builtin is not None:
                raise ValueError("mix: data.mix and data.train / data.builtin are both set: give one training set")
            names = [source.name or Path(source.path).stem for source in self.mix]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"mix: needs at least one file and distinct names, got {names}")
        return check_one_data_source(self)


class SFTTrainConfig(TrainConfig):
    """Pretraining's loop settings with defaults for a short fine-tuning run (a subclass, so a partial
    ``train:`` section in YAML keeps these defaults for the keys it leaves out)."""

    steps: int = Field(default=100, ge=1)  # used when epochs is None
    eval_every: int = Field(default=20, ge=0)


class SFTOptimConfig(OptimConfig):
    lr: float = Field(default=3e-4, gt=0)  # a tenth of pretraining's: adapt the weights, do not overwrite them
    warmup_steps: int = Field(default=5, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)


class Config(StageConfig):
    checkpoint: InputPath = "out/pretrain/hf"  # Hugging Face folder (`raylm pretrain` output) to start from
    # Which code trains the checkpoint: raylm's model (exact, every parallelism), transformers' own module
    # (any AutoModelForCausalLM; data parallel / FSDP2 only), or auto: raylm's when it implements the family
    implementation: Literal["auto", "raylm", "transformers"] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    epochs: float | None = Field(default=3.0, gt=0)  # sets train.steps from the packed data; None: use train.steps
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)  # LoRA / QLoRA instead of full fine-tuning
    train: SFTTrainConfig = Field(default_factory=SFTTrainConfig)
    # AdamW and its warmup + cosine learning-rate schedule
    optim: SFTOptimConfig = Field(default_factory=SFTOptimConfig)
    # Ray Train workers and how the model is split over them (FSDP, TP, EP, CP, PP)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    samples: int = Field(default=4, ge=0)  # held-out prompts answered (greedy) by the final model, logged to MLflow


def check(config: Config, config_path) -> None:
    hf = check_start_checkpoint(config, config_path, "raylm pretrain", config.implementation)
    check_peft(config, config_path, hf)
    check_tokenizer(config, config_path)
    from raylm.data.sft import SFTDataError, read_conversations

    if config.data.mix is None:
        check_data_files(config, config_path, read_conversations, SFTDataError)
    for key, path in [(f"mix.{i}.path", s.path) for i, s in enumerate(config.data.mix or [])] + (
            [("validation", config.data.validation)] if config.data.mix is not None else []):
        if path is None:
            raise ConfigError(f"{config_path}: data.{key}: required with data.mix (the held-out JSONL)")
        try:
            read_conversations(path)
        except SFTDataError as e:
            raise ConfigError(f"{config_path}: data.{key}: {e}") from None
    from raylm.models.hf_checkpoint import config_from_hf

    from raylm.train.transformers_model import resolve_implementation

    raylm_model = resolve_implementation(hf, config.implementation) == "raylm"
    check_parallel(config, config_path, config_from_hf(hf) if raylm_model else None, "checkpoint")


def data_files(config: Config) -> dict:
    """The train/validation JSONL paths, building the built-in set into the output folder if asked."""
    if config.data.mix is not None:  # human and synthetic data by weight, written as one training file
        from raylm.data.jsonl import write_jsonl
        from raylm.data.synthetic import mix_records

        sources = [{"name": s.name or Path(s.path).stem, "path": s.path, "weight": s.weight} for s in config.data.mix]
        mixed, counts = mix_records(sources, config.data.mix_size, config.seed)
        train = write_jsonl(mixed, (config.output_path / "instructions" / "train.jsonl").resolve())
        return {"train": str(train), "validation": str(Path(config.data.validation).resolve()), "mix": counts}
    if config.data.builtin is None:
        return {"train": str(Path(config.data.train).resolve()), "validation": str(Path(config.data.validation).resolve())}
    from raylm.data.jsonl import write_jsonl
    from raylm.data.stdlib_task import split_functions, stdlib_functions

    # The preference task's functions and split (same limit, validation_fraction and seed as the
    # reward / DPO / RLHF sections): their held-out functions are never seen in SFT either.
    splits = split_functions(stdlib_functions(config.data.builtin_limit), config.data.validation_fraction, config.seed)
    out = (config.output_path / "instructions").resolve()
    return {split: str(write_jsonl([{"prompt": item["prompt"], "response": item["reference"]} for item in items],
                                   out / f"{split}.jsonl"))
            for split, items in splits.items()}


def steps_for_epochs(config: Config, files: dict, tokenizer: str) -> int:
    from raylm.data.sft import PackedSFTDataset

    dataset = PackedSFTDataset(files["train"], tokenizer, seq_len=config.train.seq_len, seed=config.seed,
                               world_size=config.parallel.num_workers, system_prompt=config.data.system_prompt)
    per_step = config.train.batch_size * config.train.grad_accum
    return max(1, math.ceil(config.epochs * dataset.sequences_per_epoch() / per_step))


def run(config: Config, stage_run: StageRun) -> dict:
    from raylm.data.sft import SFTDataError
    from raylm.train.spec import ConversationData, Freeze

    started = time.perf_counter()
    tokenizer = str(tokenizer_path(config).resolve())
    try:
        files = data_files(config)
        if config.epochs is not None:
            config.train.steps = steps_for_epochs(config, files, tokenizer)
    except SFTDataError as e:
        raise ConfigError(str(e)) from None
    stage_run.log_params({"train.steps_resolved": config.train.steps})
    if "mix" in files:
        stage_run.log_metrics({f"mix.{name}": n for name, n in files["mix"].items()})
    implementation = implementation_of(config)
    spec = training_spec(config, "sft", stage_run, init_checkpoint=str(Path(config.checkpoint).resolve()),
                         implementation=implementation,
                         freeze=Freeze(config.freeze.train_layers, config.freeze.train_from),
                         peft=config.peft.model_copy(), tokenizer_file=tokenizer,
                         data=ConversationData(files["train"], files["validation"], tokenizer, config.data.system_prompt))
    final = launch(config, spec)
    summary = finish(config, stage_run, final, started, lm_results(final))
    summary["train_examples_file"] = files["train"]
    if config.samples and config.peft.method == "prompt_tuning":
        print("raylm sft: no samples: a soft prompt cannot run with the KV-cached generator", flush=True)
    elif config.samples:
        text = answer_samples(final_model(config, implementation), tokenizer, files["validation"], config.samples,
                              config.data.system_prompt)
        stage_run.log_text(text, "samples.txt")
        print(text, flush=True)
    if summary["val_loss"] is not None:  # None: no validation (train.eval_every=0)
        print(f"raylm sft: held-out response loss {summary['val_loss']:.4f}", flush=True)
    return summary


def implementation_of(config: Config) -> str:
    """'raylm' or 'transformers': which code trains the checkpoint."""
    import json

    from raylm.train.transformers_model import resolve_implementation

    return resolve_implementation(json.loads((Path(config.checkpoint) / "config.json").read_text()),
                                  config.implementation)


def final_model(config: Config, implementation: str = "raylm"):
    """The fine-tuned model: the exported checkpoint, or (bottleneck adapters, soft prompt: no merged
    checkpoint) the starting checkpoint with the adapter of ``hf/adapter`` applied; transformers'
    module for a checkpoint trained through transformers."""
    from raylm.models.hf_checkpoint import load_checkpoint

    export = config.output_path / "hf"
    if implementation == "transformers":
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(export, use_safetensors=True)
    if (export / "config.json").exists():
        return load_checkpoint(export)
    from raylm.peft.lora import load_peft

    return load_peft(load_checkpoint(config.checkpoint), export / "adapter")


def answer_samples(model, tokenizer: str, path: str, n: int, system_prompt: str | None,
                   max_new_tokens: int = 48) -> str:
    """The fine-tuned model's greedy answers to the first ``n`` held-out prompts, beside the references."""
    from raylm.models.generate import SamplingParams, generate
    from raylm.models.transformer import Transformer
    from raylm.train.transformers_model import greedy_continuations
    from raylm.data.sft import ChatTemplate, read_conversations

    model = model.eval()
    template = ChatTemplate(tokenizer)
    conversations = read_conversations(path)[:n]
    prompts, references = [], []
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(template.prompt(messages[:last], system_prompt))
        references.append(messages[last]["content"])
    if isinstance(model, Transformer):
        budget = min(max_new_tokens, model.config.max_seq_len - max(map(len, prompts)))
        outputs = generate(model, prompts, SamplingParams(max_new_tokens=max(budget, 1), temperature=0.0))
    else:  # transformers' module (implementation: transformers)
        budget = min(max_new_tokens, model.config.max_position_embeddings - max(map(len, prompts)))
        outputs = greedy_continuations(model, prompts, max(budget, 1), template.stop_ids)
    lines = []
    for messages, reference, output in zip(conversations, references, outputs):
        messages = messages[:max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
        answer = output[:output.index(template.end_id)] if template.end_id in output else output
        question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        lines += [f"prompt:    {question}",
                  f"model:     {template.tokenizer.decode(answer)}", f"reference: {reference}", ""]
    return "\n".join(lines)
