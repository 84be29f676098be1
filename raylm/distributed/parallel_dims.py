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
    ``dp_replicate`` keeps whole replicas across groups of shards (HSDP; with ``dp_shard == 1`` it is
    plain DDP-style data parallelism through FSDP2's replicate mode). -1 for ``dp_shard`` means
    "every rank the other degrees leave over".
    """

    world_size: int
    dp_shard: int = -1
    dp_replicate: int = 1
    _mesh: DeviceMesh | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.dp_replicate < 1:
            raise ValueError(f"dp_replicate must be >= 1, got {self.dp_replicate}")
        if self.dp_shard == -1:
            if self.world_size % self.dp_replicate:
                raise ValueError(f"dp_replicate={self.dp_replicate} does not divide the world size {self.world_size}")
            self.dp_shard = self.world_size // self.dp_replicate
        if self.dp_shard < 1 or self.dp_shard * self.dp_replicate != self.world_size:
            raise ValueError(f"dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} != world size "
                             f"{self.world_size}")

    @property
    def dp_size(self) -> int:
        """How many different batches are consumed per step (the data-parallel degree)."""
        return self.dp_shard * self.dp_replicate

    def build_mesh(self, device_type: str) -> DeviceMesh:
        if self._mesh is None:
            if not dist.is_initialized():
                raise RuntimeError("torch.distributed is not initialized (run inside a Ray Train worker)")
            self._mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard),
                                          mesh_dim_names=("dp_replicate", "dp_shard"))
        return self._mesh

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """The mesh FSDP2 shards over: 1-D (dp_shard) or 2-D HSDP (dp_replicate, dp_shard)."""
        mesh = self._require_mesh()
        return mesh if self.dp_replicate > 1 else mesh["dp_shard"]

    def dp_rank(self, rank: int) -> int:
        """This rank's data-parallel index: which slice of the data it reads."""
        return rank  # every rank is a data-parallel rank while no model-parallel dim exists

    def _require_mesh(self) -> DeviceMesh:
        if self._mesh is None:
            raise RuntimeError("call build_mesh() first")
        return self._mesh
