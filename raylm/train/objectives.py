"""What a training stage optimises, one class per objective, for the one Ray Train loop every
training stage runs (``actors/train/train_worker.py:train_loop``: pretraining, SFT, the reward
model, DPO). The loop does the rest the same way for all of them: set-up, resume, gradient
accumulation, the step (clipping, schedule), evaluation, checkpoints, logging and export.

An objective holds one rank's data and, for the loop:

- ``train_data``: this rank's training set (its position is saved in every checkpoint), and
  ``batches(n)``: the next ``n`` micro-batches of a step;
- ``count(batches)``: how many items (labelled tokens, pairs) the step's loss is the mean over,
  every rank's micro-batches together;
- ``loss(batch)``: one micro-batch's summed loss (a loss of ``raylm.train.losses``) and the sums
  of what is logged about it, named by ``logged`` (the loop divides both by ``count``);
  ``pipeline(batch, scale)``: the same through pipeline stages (language modelling only);
- ``evaluate()``: held-out metrics (``evaluates_first``: also before the first step);
- ``step_metrics`` / ``final_metrics``: throughput and what else is logged per step / at the end;
  ``console(metrics)``: the figures of the step line.

Per-run preparation belongs to the objective too: DPO's reference log-probs are computed once on
the driver by ``reference_logprobs`` (Ray tasks) and loaded by every rank.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist

from raylm.data.preferences import PairDataset
from raylm.distributed.context_parallel import shard_sequence
from raylm.models.transformer import document_causal_mask, document_positions, flops_per_token
from raylm.train.engine import Engine, peak_flops
from raylm.train.losses import IGNORE_INDEX, dpo_pair_outputs, reward_pair_outputs, sequence_logprobs
from raylm.train.spec import ConversationData, TokenData, TrainingSpec

# ---- language modelling: pretraining and SFT ------------------------------------------------------


def build_dataset(spec: TrainingSpec, split: str, rank: int, world_size: int, training: bool):
    data, train = spec.data, spec.train
    if isinstance(data, TokenData):
        from raylm.data.token_shards import PackedTokenDataset

        return PackedTokenDataset(data.dir, split=split, seq_len=train.seq_len, seed=spec.seed, rank=rank,
                                  world_size=world_size, shuffle=training, loop=training)
    if isinstance(data, ConversationData):
        from raylm.data.sft import PackedSFTDataset

        return PackedSFTDataset(getattr(data, split), data.tokenizer, seq_len=train.seq_len, seed=spec.seed,
                                rank=rank, world_size=world_size, shuffle=training, loop=training,
                                system_prompt=data.system_prompt)
    raise ValueError(f"{spec.stage}: language modelling reads token shards or conversations, not {type(data).__name__}")


def model_inputs(batch: dict, device, cp: int = 1, cp_rank: int = 0) -> tuple:
    """(tokens, labels, positions, attn_mask) of a batch, or of this rank's chunk of every sequence
    under context parallelism."""
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    doc = batch["document_ids"].to(device) if "document_ids" in batch else None
    if cp > 1:
        return shard_sequence(tokens, labels, doc, cp_rank, cp)
    positions = attn_mask = None
    if doc is not None:  # packed examples: no attention across examples, positions restart
        positions, attn_mask = document_positions(doc), document_causal_mask(doc)
    return tokens, labels, positions, attn_mask


MOE_COLUMNS = ("aux_loss", "load_balance_loss", "z_loss", "forwards")  # after the per-expert token counts


def tally_moe(model, tally: torch.Tensor) -> None:
    """Add the last forward's MoE statistics to ``tally`` [n_layers, n_experts + 4], a row per block
    by its index in the whole model (a pipeline stage holds only some blocks)."""
    n_experts = tally.shape[1] - len(MOE_COLUMNS)
    for name, block in model.layers.items():  # (blocks may be wrapped for checkpointing or compile)
        moe = next((m for m in block.modules() if hasattr(m, "tokens_per_expert")), None)
        if moe is not None:
            row = tally[int(name)]
            row[:n_experts] += moe.tokens_per_expert.to(row)
            # detached tensors, not float(): no host-device sync per layer and micro-batch
            losses = (moe.aux_loss, moe.load_balance_loss, moe.z_loss, torch.ones(()))
            row[n_experts:] += torch.stack([torch.as_tensor(v).detach().to(row) for v in losses])


def moe_metrics(tally: torch.Tensor) -> dict:
    """From every rank's summed tally: each loss's mean per forward (aux summed over layers, the
    others averaged), and each layer's share of tokens per expert."""
    n_experts = tally.shape[1] - len(MOE_COLUMNS)
    rows = [(i, row) for i, row in enumerate(tally) if row[-1] > 0]
    if not rows:
        return {}
    per_forward = {i: row[n_experts:-1] / row[-1] for i, row in rows}
    out = {"moe/aux_loss": sum(float(v[0]) for v in per_forward.values()),
           "moe/load_balance_loss": sum(float(v[1]) for v in per_forward.values()) / len(rows),
           "moe/z_loss": sum(float(v[2]) for v in per_forward.values()) / len(rows)}
    for i, row in rows:
        counts = row[:n_experts]
        for e, fraction in enumerate((counts / counts.sum().clamp(min=1)).tolist()):
            out[f"moe/layer{i}/expert{e}_fraction"] = fraction
    return out


class LanguageModelling:
    """Next-token cross-entropy over packed sequences: token shards (pretraining) or conversations
    with the loss on the answers only (SFT). The step's loss is the mean over every labelled token
    of every rank's micro-batches; throughput in tokens/s and MFU; a Mixture-of-Experts model's
    expert loads and auxiliary losses per step."""

    logged = ("loss",)
    evaluates_first = False

    def __init__(self, spec: TrainingSpec, engine: Engine, rank: int):
        self.spec, self.engine, self.rank = spec, engine, rank
        dims, device, cfg = engine.dims, engine.device, engine.config
        self.train_data = build_dataset(spec, "train", dims.dp_rank(rank), dims.dp_size, training=True)
        self.loader = None  # made at the first step, from the position a resume has set
        self.flops_token = (engine.model.flops_per_token(spec.train.seq_len) if engine.transformers
                            else flops_per_token(cfg, spec.train.seq_len))
        self.peak = peak_flops(device, engine.autocast_dtype or torch.float32)
        self.step_tokens, self.timed_tokens, self.timed_seconds = 0, 0, 0.0
        self.moe_tally = None
        if engine.is_moe:  # every training forward's expert loads and auxiliary losses, summed over the step
            self.moe_tally = torch.zeros(cfg.n_layers, cfg.n_experts + len(MOE_COLUMNS), dtype=torch.float64,
                                         device=device)
            engine.model.register_forward_hook(
                lambda module, args, output: tally_moe(module, self.moe_tally) if module.training else None)

    def batches(self, n: int) -> list[dict]:
        if self.loader is None:
            self.loader = iter(torch.utils.data.DataLoader(self.train_data, batch_size=self.spec.train.batch_size))
        return [next(self.loader) for _ in range(n)]

    def count(self, batches: list[dict]) -> torch.Tensor:
        dims = self.engine.dims
        labelled = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches)
        n_tokens = torch.tensor(float(labelled), device=self.engine.device)
        dist.all_reduce(n_tokens)
        n_tokens /= dims.tp * dims.cp * dims.pp  # tensor-, context- and pipeline-parallel peers hold the same batch
        return n_tokens.clamp(min=1)

    def inputs(self, batch: dict) -> tuple:
        dims = self.engine.dims
        return model_inputs(batch, self.engine.device, dims.cp, dims.cp_rank(self.rank))

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ce = self.engine.lm_loss_sum(*self.inputs(batch))
        return ce, ce.detach().double().reshape(1)

    def pipeline(self, batch: dict, scale: float):
        """The schedule's forward and backward over the batch's micro-batches, each loss times
        ``scale``. -> the unscaled summed loss on the last stage, 0 on the others."""
        losses = self.engine.pipeline_lm(*self.inputs(batch), scale=scale)
        return sum(loss.detach().double() for loss in losses) / scale if losses else 0.0

    def evaluate(self) -> dict:
        """Mean token loss over the first ``eval_batches`` batches of every rank's validation slice."""
        engine, spec = self.engine, self.spec
        dims, device = engine.dims, engine.device
        dataset = build_dataset(spec, "validation", dims.dp_rank(self.rank), dims.dp_size, training=False)
        # Pipeline stages exchange activations of one fixed micro-batch shape: no short last batch.
        loader = torch.utils.data.DataLoader(dataset, batch_size=spec.train.batch_size,
                                             drop_last=engine.pipeline is not None)
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        engine.model.eval()
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i == spec.train.eval_batches:
                    break
                tokens, labels, positions, attn_mask = self.inputs(batch)
                n_labels = (labels != IGNORE_INDEX).sum().double()
                if engine.pipeline is not None:  # only the last stage has losses: it alone counts the tokens
                    losses = engine.pipeline_lm(tokens, labels, positions, attn_mask, scale=1.0, train=False)
                    if not losses:
                        continue
                    loss = sum(losses)
                else:
                    loss = engine.lm_loss_sum(tokens, labels, positions, attn_mask)
                totals += torch.stack([loss.double(), n_labels])
        engine.model.train()
        dist.all_reduce(totals)
        return {"val_loss": (totals[0] / totals[1].clamp(min=1)).item()}

    def step_metrics(self, batches: list[dict], step_time: float, timed: bool) -> dict:
        """Tokens/s and MFU of the step (``timed``: counted in the run's means), and MoE statistics."""
        dims = self.engine.dims
        self.step_tokens = sum(b["tokens"].numel() for b in batches) * dims.dp_size
        tokens_per_s = self.step_tokens / step_time
        if timed:
            self.timed_tokens, self.timed_seconds = self.timed_tokens + self.step_tokens, self.timed_seconds + step_time
        out = {"tokens_per_s": tokens_per_s, "mfu": self.flops_token * tokens_per_s / dims.world_size / self.peak}
        if self.moe_tally is not None:
            dist.all_reduce(self.moe_tally)
            out.update(moe_metrics(self.moe_tally))
            self.moe_tally.zero_()
        return out

    def final_metrics(self) -> dict:
        """The steady-state throughput (after the warm-up steps), if the run was long enough."""
        if not self.timed_seconds:
            return {}
        mean = self.timed_tokens / self.timed_seconds
        mfu = self.flops_token * mean / self.engine.dims.world_size / self.peak
        return {"mean_tokens_per_s": mean, "mean_mfu": mfu, "peak_flops_per_device": self.peak}

    def console(self, metrics: dict) -> dict:
        return {"tokens": self.step_tokens, "loss": metrics["loss"], "gnorm": metrics["grad_norm"], "lr": metrics["lr"],
                "mfu": metrics["mfu"], **({"val": metrics["val_loss"]} if "val_loss" in metrics else {})}


# ---- preference pairs: the reward model and DPO -----------------------------------------------------


class PreferencePairs:
    """(prompt, chosen, rejected) pairs, each batch's chosen rows first, then its rejected ones. The
    step's loss is the mean over every pair of every rank's micro-batches. Held-out pairs are scored
    before the first step too, so a run shows where it started and where it got to."""

    logged: dict[str, str]  # metric name -> the per-pair output it averages (``outputs``)
    evaluates_first = True
    SHOWN = ("loss", "accuracy", "margin", "logp_margin", "val_accuracy", "val_margin", "val_logp_margin")

    def __init__(self, spec: TrainingSpec, engine: Engine, rank: int):
        self.spec, self.engine = spec, engine
        dims, data, seq_len = engine.dims, spec.data, spec.train.seq_len
        dp_rank, dp_size = dims.dp_rank(rank), dims.dp_size
        self.train_data = PairDataset(data.train, data.tokenizer, seq_len, seed=spec.seed, rank=dp_rank,
                                      world_size=dp_size, default_margin=spec.reward_margin)
        self.val_data = PairDataset(data.validation, data.tokenizer, seq_len, rank=dp_rank, world_size=dp_size,
                                    shuffle=False, default_margin=spec.reward_margin, drop_remainder=False)

    def outputs(self, batch: dict, split: str) -> dict:
        """Per-pair loss and what is logged about it, for one batch of ``split``'s pairs."""
        raise NotImplementedError

    def batches(self, n: int) -> list[dict]:
        return [self.train_data.next_batch(self.spec.train.batch_size) for _ in range(n)]

    def count(self, batches: list[dict]) -> int:
        return self.spec.train.batch_size * len(batches) * self.engine.dims.dp_size

    def sums(self, outputs: dict) -> torch.Tensor:
        sums = [outputs[key].detach().double().sum() for key in self.logged.values()]
        return torch.stack(sums).to(self.engine.device)

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.outputs(batch, "train")
        return outputs["loss"].sum(), self.sums(outputs)

    def pipeline(self, batch: dict, scale: float):
        raise NotImplementedError(f"{self.spec.stage}: preference training runs no pipeline stages")

    def evaluate(self) -> dict:
        """Means over the held-out pairs of this rank's slice, combined over the ranks (every rank runs
        the same number of batches, since FSDP2 needs every rank in every forward)."""
        engine, data, device = self.engine, self.val_data, self.engine.device
        totals = torch.zeros(len(self.logged) + 1, dtype=torch.float64, device=device)
        size = self.spec.train.batch_size
        per_rank = math.ceil(len(data.pairs) / data.world_size)  # the largest slice: every rank runs its batch count
        engine.model.eval()
        with torch.no_grad():
            for i in range(min(self.spec.train.eval_batches, math.ceil(per_rank / size))):
                indices = data.mine[i * size : (i + 1) * size]
                weight = 1.0 if indices else 0.0  # a rank past the end of its slice joins the forward, counts nothing
                batch = data.batch(indices or [0])
                outputs = self.outputs(batch, "validation")
                totals += weight * torch.cat([self.sums(outputs),
                                              torch.tensor([float(len(batch["index"]))], dtype=torch.float64,
                                                           device=device)])
        engine.model.train()
        dist.all_reduce(totals)
        return {f"val_{name}": (totals[i] / totals[-1].clamp(min=1)).item() for i, name in enumerate(self.logged)}

    def step_metrics(self, batches: list[dict], step_time: float, timed: bool) -> dict:
        return {"pairs_per_s": self.count(batches) / step_time}

    def final_metrics(self) -> dict:
        return {}

    def console(self, metrics: dict) -> dict:
        return {"lr": metrics["lr"], **{k: metrics[k] for k in self.SHOWN if k in metrics}}


class BradleyTerry(PreferencePairs):
    """The reward model: a ``TransformerWithScalarHead`` (fresh zero head on a causal-LM checkpoint)
    scores chosen and rejected answers; loss ``-log sigmoid(r_c - r_r - m)``."""

    logged = {"loss": "loss", "accuracy": "correct", "margin": "margin", "chosen_reward": "chosen",
              "rejected_reward": "rejected"}

    def __init__(self, spec: TrainingSpec, engine: Engine, rank: int):
        super().__init__(spec, engine, rank)
        # The scalar head's [B, T] scores are a squeezed view; nothing here modifies them in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    def outputs(self, batch: dict, split: str) -> dict:
        device = self.engine.device
        with self.engine.autocast():
            return reward_pair_outputs(self.engine.model, batch["tokens"].to(device),
                                       batch["attention_mask"].to(device), batch["margin"].to(device))


class DirectPreference(PreferencePairs):
    """DPO / IPO: the policy against a frozen reference whose log-probs of every pair were computed
    once, before training (``reference_logprobs``), and are read from ``spec.dpo.reference_logprobs``."""

    logged = {"loss": "loss", "accuracy": "correct", "logp_margin": "margin", "reward_accuracy": "reward_correct",
              "reward_margin": "reward_margin", "chosen_reward": "chosen", "rejected_reward": "rejected",
              "logp_chosen": "logp_chosen", "logp_rejected": "logp_rejected"}

    def __init__(self, spec: TrainingSpec, engine: Engine, rank: int):
        from safetensors.torch import load_file

        super().__init__(spec, engine, rank)
        self.reference = load_file(spec.dpo.reference_logprobs)  # {"train", "validation"}: [N, 2]

    def outputs(self, batch: dict, split: str) -> dict:
        device = self.engine.device
        labels = batch["labels"].to(device)
        with self.engine.autocast():
            logps = sequence_logprobs(self.engine.model, batch["tokens"].to(device), labels)
        return dpo_pair_outputs(logps, self.reference[split][batch["index"]].to(device), self.spec.dpo.beta,
                                self.spec.dpo.kind, (labels != IGNORE_INDEX).sum(-1), self.spec.dpo.nll_weight)


def reference_logprobs_chunk(checkpoint: str, pairs: list[dict], tokenizer_file: str, seq_len: int,
                             batch_size: int, threads: int = 1,
                             quantize: tuple[str, int, bool] | None = None) -> torch.Tensor:
    """[N, 2] summed log-probs (chosen, rejected) of ``pairs`` under the model at ``checkpoint``
    (quantized first if ``quantize`` = (kind, block size, double quantization): QLoRA's base with
    the adapters off)."""
    from raylm.models.hf_checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint).eval()
    if quantize is not None:
        from raylm.peft.quantize import quantize_model

        quantize_model(model, *quantize)
    data = PairDataset(pairs, tokenizer_file, seq_len, shuffle=False)
    out = []
    with torch.no_grad():
        for batch in data.batches(batch_size):
            logps = sequence_logprobs(model, batch["tokens"], batch["labels"])
            n = len(batch["index"])
            out.append(torch.stack([logps[:n], logps[n:]], dim=1))
    return torch.cat(out)


def reference_logprobs(checkpoint: str, pairs: list[dict], tokenizer_file: str, seq_len: int, batch_size: int,
                       num_tasks: int, cpus_per_task: int = 1,
                       quantize: tuple[str, int, bool] | None = None) -> torch.Tensor:
    """The reference model's log-probs of every pair, once, as ``num_tasks`` Ray tasks over slices."""
    import ray

    task = ray.remote(num_cpus=cpus_per_task)(reference_logprobs_chunk)
    bounds = [round(i * len(pairs) / num_tasks) for i in range(num_tasks + 1)]
    refs = [task.remote(checkpoint, pairs[a:b], tokenizer_file, seq_len, batch_size, cpus_per_task, quantize)
            for a, b in zip(bounds, bounds[1:]) if b > a]
    return torch.cat(ray.get(refs, timeout=3600))


OBJECTIVES = {"lm": LanguageModelling, "reward": BradleyTerry, "dpo": DirectPreference}


def build_objective(spec: TrainingSpec, engine: Engine, rank: int):
    """The objective ``spec.objective`` names, holding this rank's data."""
    return OBJECTIVES[spec.objective](spec, engine, rank)
