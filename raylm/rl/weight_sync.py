"""Weight sync: the policy's trainer ranks publish the new weights once into the object store (in
buckets of ``rollout.bucket_mb``), every rollout engine loads the same buckets and then serves the
new policy version. Full weights, or with ``peft:`` only the adapter: LoRA in PEFT's names (vLLM's
LoRA support on its base), bottleneck adapters or a soft prompt in raylm's."""

from __future__ import annotations

from pathlib import Path

import ray
from ray.actor import ActorHandle

from raylm.actors.policy_trainer import PolicyGroup
from raylm.rl.actor_pool import ActorPool
from raylm.rl.config import Config
from raylm.rl.remote import wait


class WeightSync:
    def __init__(self, config: Config):
        self.config = config
        self.lora_config = None
        if config.uses_lora:
            from raylm.peft.lora import adapter_config, settings_of

            self.lora_config = adapter_config(settings_of(config.peft), str(Path(config.policy.checkpoint).resolve()),
                                              list(config.peft.target_modules))
        # The last publication ({"buckets", "version"}), kept (and with it the buckets in the object
        # store) until the next one, for an engine that replaces a dead one.
        self.published: dict | None = None

    def load(self, engine: ActorHandle, buckets: list, version: int) -> ray.ObjectRef:
        """The engine loads published buckets: full weights, a LoRA adapter, or another method's adapter."""
        if self.config.uses_adapter:
            return engine.load_adapter_buckets.remote(bucket_refs=buckets, version=version)
        if self.config.uses_lora:
            return engine.load_lora_buckets.remote(bucket_refs=buckets, adapter_config=self.lora_config,
                                                   version=version)
        return engine.load_weight_buckets.remote(bucket_refs=buckets, version=version)

    def reload(self, engine: ActorHandle) -> ray.ObjectRef | None:
        """A fresh engine gets the weights last published, so that it serves the current version."""
        if self.published is None:
            return None
        return self.load(engine, self.published["buckets"], self.published["version"])

    def publish(self, policy: PolicyGroup, rollout: ActorPool, version: int) -> dict:
        """Publish the policy's weights as ``version``; every engine loads them. -> timings and sizes."""
        published = policy.publish_weights(int(self.config.rollout.bucket_mb * 2**20))
        self.published = {"buckets": published["buckets"], "version": version}
        load_s = rollout.fan_out(lambda engine, _: self.load(engine, published["buckets"], version),
                                 [True] * len(rollout), "weight sync")
        versions = wait([e.version.remote() for e in rollout.actors], self.config.timeouts.remote_s, "engine versions")
        if any(v != version for v in versions):
            raise RuntimeError(f"weight sync: engines serve versions {versions}, expected {version}")
        return {"time/publish_s": published["seconds"], "time/engine_load_s": max(load_s),
                "weight_sync/bucket_count": len(published["buckets"]), "weight_sync/bytes": published["bytes"]}
