"""What a training stage's driver hands every rank: one typed ``TrainingSpec``, built once by the
stage (``pipelines/pretrain.py``, ``sft.py``, ``reward.py``, ``dpo.py``) and pickled into the Ray
Train worker group. Its sections are the stage's own validated config sections, so a worker reads
``spec.train.steps``, never a string key that may be missing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from raylm.peft.config import PeftConfig
from raylm.train.config import OptimConfig, ParallelConfig, TrainConfig


@dataclass(frozen=True)
class TokenData:
    """Pretraining: the packed token shards of `raylm data` (the folder holding index.json)."""

    dir: str


@dataclass(frozen=True)
class ConversationData:
    """SFT: JSONL conversations, packed into sequences with the loss on the answers only."""

    train: str
    validation: str
    tokenizer: str
    system_prompt: str | None = None


@dataclass(frozen=True)
class PairData:
    """Reward modelling and DPO: (prompt, chosen, rejected) pairs, already read and validated."""

    train: list[dict]
    validation: list[dict]
    tokenizer: str


@dataclass(frozen=True)
class Freeze:
    """Train only ``train_layers`` blocks (plus the final norm and head), counted from ``train_from``."""

    train_layers: int | None = None  # None: every block trains
    train_from: Literal["last", "early", "intermediate"] = "last"


@dataclass(frozen=True)
class DPOLoss:
    beta: float
    kind: Literal["sigmoid", "ipo"]
    reference_logprobs: str  # safetensors: {"train", "validation"} [N, 2] reference log-probs
    nll_weight: float = 0.0  # RPO: weight of the chosen answer's per-token NLL in each pair's loss


Objective = Literal["lm", "reward", "dpo"]


@dataclass
class TrainingSpec:
    stage: str  # the console and MLflow name: pretrain, sft, reward, dpo
    seed: int
    train: TrainConfig
    optim: OptimConfig
    parallel: ParallelConfig
    data: TokenData | ConversationData | PairData
    export_dir: str  # the final Hugging Face folder
    objective: Objective = "lm"  # lm: next-token cross-entropy; reward: Bradley-Terry; dpo: DPO / IPO
    model: dict | None = None  # a fresh model's TransformerConfig fields (pretraining)
    init_checkpoint: str | None = None  # else: start from this Hugging Face folder
    implementation: Literal["raylm", "transformers"] = "raylm"  # which code runs the checkpoint (transformers_model)
    freeze: Freeze = field(default_factory=Freeze)
    peft: PeftConfig | None = None  # None: full fine-tuning (a ``peft.method: none`` section)
    tokenizer_file: str | None = None  # copied beside the exported model
    reward_margin: float = 0.0  # reward: the Bradley-Terry margin of pairs that carry none
    dpo: DPOLoss | None = None
    stage_run: Any = None  # raylm.tracking.StageRun: rank 0 logs to MLflow through it
    run_dir: str | None = None  # Ray Train's folder for this run (set by ``launch``)

    def __post_init__(self):
        if self.peft is not None and self.peft.method == "none":
            self.peft = None
        if (self.model is None) == (self.init_checkpoint is None):
            raise ValueError("TrainingSpec: exactly one of model (a fresh model) and init_checkpoint (a start)")
        if self.objective == "dpo" and self.dpo is None:
            raise ValueError("TrainingSpec: the dpo objective needs its dpo loss settings")
