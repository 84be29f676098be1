"""The one place that decides where RLHF's actors run: one placement group per set of co-placed roles
(``placement.colocate``) and one per remaining role; actor i of a role takes bundle i, whose size is
the sum of what the co-placed roles' i-th actors ask for. The roles do not know where they run."""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raylm.rl.config import Config


@dataclass
class RoleShape:
    actors: int
    cpus: float
    gpus: float


def role_shapes(config: Config) -> dict[str, RoleShape]:
    shapes = {
        "policy": RoleShape(config.policy.num_workers, config.policy.cpus_per_worker, config.policy.gpus_per_worker),
        "rollout": RoleShape(config.rollout.num_engines, config.rollout.cpus_per_engine, config.rollout.gpus_per_engine),
        "reference": RoleShape(config.reference.num_actors, config.reference.cpus_per_actor,
                               config.reference.gpus_per_actor),
    }
    if config.reward.checkpoint is not None:
        shapes["reward"] = RoleShape(config.reward.num_actors, config.reward.cpus_per_actor, config.reward.gpus_per_actor)
    if config.uses_critic:
        shapes["critic"] = RoleShape(config.critic.num_workers, config.critic.cpus_per_worker,
                                     config.critic.gpus_per_worker)
    return shapes


@dataclass
class Placement:
    strategies: dict[str, list[PlacementGroupSchedulingStrategy]]  # role -> one per actor index
    groups: list[PlacementGroup]

    def remove(self) -> None:
        for pg in self.groups:
            remove_placement_group(pg)


def place(config: Config) -> Placement:
    shapes = role_shapes(config)
    groups = [[r for r in group if r in shapes] for group in config.placement.colocate]
    placed = {r for group in groups for r in group}
    groups = [g for g in groups if g] + [[r] for r in shapes if r not in placed]
    strategies, pgs = {}, []
    for group in groups:
        bundles = []
        for i in range(max(shapes[r].actors for r in group)):
            cpus = sum(shapes[r].cpus for r in group if i < shapes[r].actors)
            gpus = sum(shapes[r].gpus for r in group if i < shapes[r].actors)
            bundles.append({"CPU": cpus, **({"GPU": gpus} if gpus else {})})
        pg = placement_group(bundles, strategy="PACK")
        try:
            ray.get(pg.ready(), timeout=config.timeouts.startup_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"placement group {'+'.join(group)} ({bundles}) was not placed within "
                               f"{config.timeouts.startup_s:.0f} s: the cluster lacks the resources") from None
        pgs.append(pg)
        for r in group:
            strategies[r] = [PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
                             for i in range(shapes[r].actors)]
    return Placement(strategies, pgs)
