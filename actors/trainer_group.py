"""A trainer group: N Ray actors that form one torch.distributed process group (gloo on CPU, NCCL on
GPU) and train one model, as OpenRLHF's actor groups do. RLHF's policy and critic are each one
group.

``ShardedTrainer`` is what every rank does whatever it trains: join the group, then run the same
training engine as the Ray Train stages (``raylm.train.engine``: build the model, shard it with
FSDP2, step the optimizer with clipping, checkpoint with DCP, export to Hugging Face / PEFT) and
PPO's epochs of minibatch steps (``ppo_epochs``). ``PolicyTrainer`` and ``ValueTrainer`` add their
role's methods and losses. On the driver, ``TrainerGroup`` starts the ranks on the slots the
placement hands it, has rank 0 choose the rendezvous address, and fans a method out to every rank
(each with its own shard of the batch, or all with the same arguments), waiting with a timeout. A
call that finds a rank dead raises ``TrainerRankDied``: the group's survivors are then stuck in (or
failed out of) a collective with it, so the driver replaces the whole group (``raylm.rl.pools``) and
resumes from a checkpoint.
"""

from __future__ import annotations

import os
import socket
import time
from collections import defaultdict
from datetime import timedelta
from typing import Callable

import ray
import torch
import torch.distributed as dist
from ray.actor import ActorHandle

from raylm.distributed.parallel_dims import ParallelDims
from raylm.peft.config import PeftConfig
from raylm.rl.batching import minibatch_rows, shard_batch, trim
from raylm.rl.remote import Pending, wait
from raylm.train.engine import Engine, build_model
from raylm.train.spec import Freeze
from raylm.train.config import OptimConfig


class ShardedTrainer:
    """One rank. Not a Ray actor by itself: subclasses are decorated with ``@ray.remote``."""

    role = ""  # "policy" or "critic": the prefix of its update metrics
    scalar_head = False  # a policy: the causal LM; the critic: a scalar head per token

    def __init__(self, rank: int, world_size: int, threads: int = 1, use_gpu: bool = False, seed: int = 0):
        torch.set_num_threads(max(1, threads))
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")  # Ray sets CUDA_VISIBLE_DEVICES
        self.engine = self.model = self.dims = self.config = self.peft = None
        torch.manual_seed(seed + rank)

    def rendezvous_address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, address: str, port: int, timeout_s: float) -> None:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=self.rank,
                                world_size=self.world_size, timeout=timedelta(seconds=timeout_s))
        self.dims = ParallelDims(self.world_size)  # FSDP2 over every rank of the group
        self.dims.build_mesh(self.device.type)

    def setup(self, checkpoint: str, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8,
              grad_clip: float = 1.0, peft: PeftConfig | None = None, freeze: Freeze | None = None) -> dict:
        """Load the full weights on every rank, shard them with FSDP2, build AdamW at a constant
        ``lr`` (over the parameters that train: with ``peft``, only the adapters; with ``freeze``,
        only some blocks).
        -> ``{"params", "trainable_params"}``."""
        self.peft = peft if peft is not None and peft.method != "none" else None
        freeze = freeze or Freeze()
        model = build_model(checkpoint=checkpoint, scalar_head=self.scalar_head, seed=self.seed,
                            train_layers=freeze.train_layers, train_from=freeze.train_from, peft=self.peft)
        counts = {"params": sum(p.numel() for p in model.parameters()),
                  "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        optim = OptimConfig(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, grad_clip=grad_clip)
        self.engine = Engine(model, self.dims, self.device, optim, peft=self.peft, base_checkpoint=checkpoint)
        self.model, self.config = self.engine.model, self.engine.config
        return counts

    def optimizer_step(self) -> float:
        """Clip the gradients (global norm across ranks), step, zero. -> the norm before clipping."""
        return float(self.engine.step()[0])

    def ppo_epochs(self, batch: dict, epochs: int, minibatches: int, step: int,
                   loss: Callable[[dict], tuple[torch.Tensor, dict]]) -> dict:
        """PPO's update of this rank's rollouts, whatever the role's loss: ``epochs`` passes, each a
        fresh permutation of the rows (seeded by the step) cut into ``minibatches`` optimizer steps
        on ``loss(minibatch) -> (loss, numbers)``, every minibatch trimmed to its longest row.
        -> the mean of each number over the optimizer steps, ``<role>/grad_norm`` (before clipping)
        and ``time/<role>_update_s``."""
        generator = torch.Generator().manual_seed(self.seed * 100003 + step)
        stats = defaultdict(list)
        start = time.perf_counter()
        for _ in range(epochs):
            for rows in minibatch_rows(len(batch["tokens"]), minibatches, generator):
                value, numbers = loss(trim(batch, rows))
                value.backward()
                stats[f"{self.role}/grad_norm"].append(self.optimizer_step())
                for key, number in numbers.items():
                    stats[key].append(number)
        metrics = {k: sum(v) / len(v) for k, v in stats.items()}
        metrics[f"time/{self.role}_update_s"] = time.perf_counter() - start
        return metrics

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the unsharded weights (raylm names) on rank 0, an empty dict elsewhere."""
        return self.engine.full_state_dict()

    def save(self, folder: str, tokenizer_file: str | None = None) -> str | None:
        """Collective: a Hugging Face checkpoint of the current weights from rank 0; with PEFT the
        adapter goes to ``<folder>/adapter`` (PEFT's format) and the merged model, where the method
        merges (LoRA), to ``folder``. -> where it was written, on rank 0."""
        written = self.engine.export(folder, tokenizer_file)
        return str(written) if written is not None else None

    def save_state(self, folder: str) -> None:
        """Collective: the model and optimizer shards (torch DCP, one file per rank) and this rank's
        RNG states, as the Ray Train stages checkpoint."""
        self.engine.save(folder, self.rank)

    def load_state(self, folder: str) -> None:
        """Collective: the inverse of ``save_state``, into the model and optimizer built by ``setup``."""
        self.engine.load(folder, self.rank)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def exit_process(self) -> None:
        """Fault injection (``faults.kill_trainer_at_step``): this rank's process ends at once, as a crash would."""
        os._exit(1)


class TrainerRankDied(RuntimeError):
    """A rank of a trainer group died during (or before) a call to the group."""

    def __init__(self, group: str, rank: int, what: str):
        super().__init__(f"{group} rank {rank} died ({what})")
        self.group, self.rank, self.what = group, rank, what


class GroupCall(Pending):
    """A call fanned out to a group's ranks. A dead rank fails it at once (Ray answers a dead actor's
    call without waiting for the others, which hang in a collective with it) as ``TrainerRankDied``."""

    def __init__(self, group: "TrainerGroup", refs: list, what: str, timeout_s: float, combine=list):
        super().__init__(refs, what, timeout_s, combine)
        self.group = group

    def result(self):
        try:
            return super().result()
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
            rank = self.group.dead_rank(self.refs, error)
            if rank is None:
                raise
            raise TrainerRankDied(self.group.name, rank, self.what) from error


class TrainerGroup:
    """The driver's handle on one trainer group: typed calls fanned out to every rank, in flight
    (``Pending``) until the driver waits on them (each wait with a timeout)."""

    def __init__(self, name: str, actor_cls, world_size: int, strategies: list, num_cpus: float, num_gpus: float,
                 startup_s: float, remote_s: float, seed: int = 0):
        self.name, self.startup_s, self.remote_s = name, startup_s, remote_s
        threads = max(1, int(num_cpus))
        self.actors = [
            actor_cls.options(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=strategies[rank]).remote(
                rank, world_size, threads=threads, use_gpu=num_gpus > 0, seed=seed)
            for rank in range(world_size)
        ]
        address, port = wait(self.actors[0].rendezvous_address.remote(), startup_s, f"{name}.rendezvous_address")
        wait([a.join.remote(address, port, startup_s) for a in self.actors], startup_s, f"{name}.join")

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def each(self, call: Callable[[ActorHandle], ray.ObjectRef], what: str, combine=list,
             timeout_s: float | None = None) -> GroupCall:
        """Every rank runs the same call."""
        return GroupCall(self, [call(a) for a in self.actors], f"{self.name}.{what}", timeout_s or self.remote_s,
                         combine)

    def sharded(self, call: Callable[[ActorHandle, dict], ray.ObjectRef], batch: dict, what: str,
                combine=list) -> GroupCall:
        """Rank i runs the call on its contiguous slice of the batch's rows."""
        shards = shard_batch(batch, self.world_size)
        return GroupCall(self, [call(a, s) for a, s in zip(self.actors, shards)], f"{self.name}.{what}",
                         self.remote_s, combine)

    def dead_rank(self, refs: list, error: Exception, settle_s: float = 30.0) -> int | None:
        """The rank whose death failed a call (``refs``: one per rank), or None when every rank lives.
        A survivor may fail first (gloo sees the dead peer's socket close before Ray reports the
        death), so the ranks' calls get up to ``settle_s`` to fail too."""
        ids = [a._actor_id.hex() for a in self.actors]
        if isinstance(error, ray.exceptions.RayActorError) and getattr(error, "actor_id", None) in ids:
            return ids.index(error.actor_id)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=settle_s)
        for rank, ref in enumerate(refs):
            if ref in ready:
                try:
                    ray.get(ref, timeout=0)
                except ray.exceptions.RayActorError:
                    return rank
                except Exception:  # a survivor's own error: not what is looked for
                    pass
        return None

    def crash(self, rank: int) -> None:
        """Fault injection: rank ``rank`` exits before its next call."""
        self.actors[rank].exit_process.remote()

    def setup(self, checkpoint: str, lr: float, weight_decay: float = 0.0, grad_clip: float = 1.0,
              peft: PeftConfig | None = None, freeze: Freeze | None = None) -> Pending:
        """Every rank loads the checkpoint (see ``ShardedTrainer.setup``); -> rank 0's parameter counts."""
        return self.each(lambda a: a.setup.remote(checkpoint, lr, weight_decay, grad_clip=grad_clip, peft=peft,
                                                  freeze=freeze), "setup", combine=lambda counts: counts[0],
                         timeout_s=self.startup_s)

    def save(self, folder: str, tokenizer_file: str | None = None) -> str | None:
        """A Hugging Face checkpoint of the current weights (see ``ShardedTrainer.save``)."""
        return self.each(lambda a: a.save.remote(folder, tokenizer_file), "save").result()[0]

    def save_state(self, folder: str) -> None:
        self.each(lambda a: a.save_state.remote(folder), "save_state").result()

    def load_state(self, folder: str) -> None:
        self.each(lambda a: a.load_state.remote(folder), "load_state").result()

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


def mean_dicts(parts: list[dict]) -> dict:
    """The ranks' metrics, averaged key by key."""
    return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
