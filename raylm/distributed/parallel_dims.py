"""The one owner of the device mesh: validates the parallel degrees against the world size and
hands out named sub-meshes. Nothing else in raylm creates process groups."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelDims:
    """Degrees of each kind of parallelism; their product is the world size.

    ``dp_shard`` is FSDP2 (ZeRO-3: parameters, gradients and optimizer state sharded);
    ``dp_replicate`` keeps whole replicas across groups of shards (HSDP); ``tp`` splits attention
    heads and the MLP's hidden units (ranks of one tensor-parallel group read the same batch);
    ``ep`` shards MoE experts over the dp_shard ranks; ``cp`` splits each sequence over its ranks
    (context parallelism: they read the same batch, each a chunk of every sequence, and FSDP2
    shards over dp_shard x cp); ``pp`` splits the blocks into pipeline stages.
    -1 for ``dp_shard`` means "every rank the other degrees leave over". The mesh is laid out
    (pp, dp_replicate, dp_shard, cp, tp), tp innermost: tensor-parallel peers are neighbouring ranks,
    i.e. on the same node, where their per-layer all-reduces belong; pipeline stages outermost,
    where only activations cross between them.
    """

    world_size: int
    dp_shard: int = -1
    dp_replicate: int = 1
    tp: int = 1
    ep: int = 1
    cp: int = 1
    pp: int = 1
    _mesh: DeviceMesh | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.dp_replicate < 1 or self.tp < 1 or self.cp < 1 or self.pp < 1:
            raise ValueError(f"pp ({self.pp}), dp_replicate ({self.dp_replicate}), cp ({self.cp}) and tp ({self.tp}) "
                             f"must be >= 1")
        others = self.pp * self.dp_replicate * self.cp * self.tp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ValueError(f"pp={self.pp} x dp_replicate={self.dp_replicate} x cp={self.cp} x tp={self.tp} "
                                 f"does not divide the world size {self.world_size}")
            self.dp_shard = self.world_size // others
        if self.dp_shard < 1 or self.dp_shard * others != self.world_size:
            raise ValueError(f"pp={self.pp} x dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x "
                             f"cp={self.cp} x tp={self.tp} != world size {self.world_size}")
        if self.ep not in (1, self.dp_shard) or (self.ep > 1 and self.dp_replicate > 1):
            raise ValueError(f"ep: expert parallelism borrows the dp_shard ranks: ep must be 1 or "
                             f"dp_shard ({self.dp_shard}), with dp_replicate 1")

    @property
    def dp_size(self) -> int:
        """How many different batches are consumed per step (the data-parallel degree)."""
        return self.dp_shard * self.dp_replicate

    @property
    def grad_average_size(self) -> int:
        """How many ranks FSDP2 averages gradients over (data-parallel and context-parallel ones)."""
        return self.dp_size * self.cp

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage."""
        return self.world_size // self.pp

    def dp_rank(self, rank: int) -> int:
        """Which slice of the data this rank reads (tensor-, context- and pipeline-parallel peers read
        the same one)."""
        return (rank % self.stage_size) // (self.tp * self.cp)

    def cp_rank(self, rank: int) -> int:
        """Which chunk of each sequence this rank holds."""
        return (rank // self.tp) % self.cp

    def pp_rank(self, rank: int) -> int:
        """Which pipeline stage this rank runs."""
        return rank // self.stage_size

    def build_mesh(self, device_type: str) -> DeviceMesh:
        if self._mesh is None:
            if not dist.is_initialized():
                raise RuntimeError("torch.distributed is not initialized (run inside a Ray Train worker)")
            self._mesh = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp),
                                          mesh_dim_names=("pp", "dp_replicate", "dp_shard", "cp", "tp"))
            if self.cp > 1:  # FSDP2 shards over the context-parallel ranks too
                self._mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        return self._mesh

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """The mesh FSDP2 shards over: 1-D (dp_shard) or 2-D HSDP (dp_replicate, dp_shard)."""
        mesh = self._require_mesh()
        shard = "dp_shard_cp" if self.cp > 1 else "dp_shard"
        return mesh["dp_replicate", shard] if self.dp_replicate > 1 else mesh[shard]

    @property
    def ep_mesh(self) -> DeviceMesh:
        return self._require_mesh()["dp_shard"]

    @property
    def pp_mesh(self) -> DeviceMesh:
        return self._require_mesh()["pp"]

    @property
    def cp_mesh(self) -> DeviceMesh:
        return self._require_mesh()["cp"]

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self._require_mesh()["tp"]

    def _require_mesh(self) -> DeviceMesh:
        if self._mesh is None:
            raise RuntimeError("call build_mesh() first")
        return self._mesh
