"""A trainer group: N Ray actors that form one torch.distributed process group (gloo on CPU, NCCL on
GPU) and train one model with FSDP2 applied from outside, as OpenRLHF's actor groups do. RLHF's
policy and critic are each one group.

``ShardedTrainer`` is what every rank does whatever it trains (join the group, build and shard the
model, step the optimizer, gather the full weights); ``PolicyTrainer`` and ``ValueTrainer`` add
their role's methods. On the driver, ``TrainerGroup`` starts the ranks on the slots the placement
hands it, has rank 0 choose the rendezvous address, and fans a method out to every rank (each with
its own shard of the batch, or all with the same arguments), waiting with a timeout.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import ray
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from raylm.distributed.checkpoint import full_model_state_dict
from raylm.distributed.parallel_dims import ParallelDims
from raylm.distributed.parallelize import clean_state_dict_key, parallelize
from raylm.optim import build_optimizer


class ShardedTrainer:
    """One rank. Not a Ray actor by itself: subclasses are decorated with ``@ray.remote``."""

    def __init__(self, rank: int, world_size: int, threads: int = 1, use_gpu: bool = False, seed: int = 0):
        torch.set_num_threads(max(1, threads))
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")  # Ray sets CUDA_VISIBLE_DEVICES
        self.model = self.optimizer = self.dims = None
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

    def build_model(self, checkpoint: str) -> torch.nn.Module:
        raise NotImplementedError

    def setup(self, checkpoint: str, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8,
              grad_clip: float = 1.0, peft: dict | None = None, freeze: dict | None = None) -> dict:
        """Load the full weights on every rank, shard them with FSDP2, build AdamW (over the
        parameters that train: with ``peft``, a ``peft:`` section, only the adapters; with
        ``freeze``, a ``freeze:`` section, only some blocks). -> ``{"params", "trainable_params"}``."""
        self.peft, self.freeze = peft, freeze
        model = self.build_model(checkpoint).to(self.device)
        counts = {"params": sum(p.numel() for p in model.parameters()),
                  "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        if hasattr(model, "score"):
            # A scalar-head model keeps its transformer in .model and runs it through hidden_states(),
            # not forward(): the blocks are FSDP2 units, the root unit is the whole model (embeddings,
            # final norm and head), so every parameter is gathered by a forward that is called.
            for block in model.model.layers.values():
                fully_shard(block, mesh=self.dims.fsdp_mesh)
            fully_shard(model, mesh=self.dims.fsdp_mesh)
        else:
            parallelize(model, self.dims)
        self.model = model
        self.optimizer = build_optimizer(self.model, lr, weight_decay, tuple(betas), eps)
        self.grad_clip = grad_clip
        self.model.train()
        return counts

    def optimizer_step(self) -> float:
        """Clip the gradients (global norm across ranks), step, zero. -> the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or float("inf"), foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the unsharded weights (raylm names) on rank 0, an empty dict elsewhere."""
        state = full_model_state_dict(self.model)
        return {clean_state_dict_key(k): v for k, v in state.items()}

    def save(self, folder: str, tokenizer_file: str | None = None) -> str | None:
        """Collective: write the current weights as a Hugging Face checkpoint from rank 0."""
        from raylm.models.hf_checkpoint import save_checkpoint

        state = self.full_state_dict()
        if self.rank != 0:
            return None
        plain = self.plain_model()
        plain.load_state_dict(state, strict=False)
        return str(save_checkpoint(plain, folder, tokenizer_file=tokenizer_file))

    def plain_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def save_state(self, folder: str) -> None:
        """Collective: the model and optimizer shards (torch DCP, one file per rank) and this rank's
        RNG states, as the pretrain stage checkpoints (``raylm.distributed.checkpoint``)."""
        from raylm.distributed import checkpoint

        checkpoint.save(folder, self.rank, self.model, self.optimizer, trainer_state={}, rank_state={})

    def load_state(self, folder: str) -> None:
        """Collective: the inverse of ``save_state``, into the model and optimizer built by ``setup``."""
        from raylm.distributed import checkpoint

        checkpoint.load(folder, self.rank, self.model, self.optimizer)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class TrainerGroup:
    """The driver's handle on one trainer group."""

    def __init__(self, name: str, actor_cls, world_size: int, strategies: list, num_cpus: float, num_gpus: float,
                 timeout_s: float, seed: int = 0):
        self.name, self.timeout_s = name, timeout_s
        threads = max(1, int(num_cpus))
        self.actors = [
            actor_cls.options(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=strategies[rank]).remote(
                rank, world_size, threads=threads, use_gpu=num_gpus > 0, seed=seed)
            for rank in range(world_size)
        ]
        address, port = self.wait(self.actors[0].rendezvous_address.remote(), "rendezvous_address")
        self.wait([a.join.remote(address, port, timeout_s) for a in self.actors], "join")

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def wait(self, refs, what: str):
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"{self.name}.{what}: no answer within {self.timeout_s:.0f} s") from None

    def run(self, method: str, *args, **kwargs) -> list:
        """Every rank runs ``method`` with the same arguments; -> every rank's result."""
        return self.wait([getattr(a, method).remote(*args, **kwargs) for a in self.actors], method)

    def submit_sharded(self, method: str, shards: list, **kwargs) -> list:
        """Rank i runs ``method(shards[i], **kwargs)``; -> the futures (wait on them with ``wait``)."""
        if len(shards) != len(self.actors):
            raise ValueError(f"{self.name}: {len(shards)} shards for {len(self.actors)} ranks")
        return [getattr(a, method).remote(shard, **kwargs) for a, shard in zip(self.actors, shards)]

    def run_sharded(self, method: str, shards: list, **kwargs) -> list:
        return self.wait(self.submit_sharded(method, shards, **kwargs), method)

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
