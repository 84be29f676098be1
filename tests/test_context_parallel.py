"""Context parallelism against one process: two gloo ranks, each holding half of every sequence,
give the logits and the parameter gradients of the whole sequence (causal, and with packed
documents whose boundaries fall on either side of the split)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from raylm.config import ConfigError, load_config
from raylm.models.config import PRESETS, TransformerConfig
from raylm.models.transformer import Transformer, document_causal_mask, document_positions

SEQ, BATCH, CP = 32, 2, 2


def model_and_batch():
    cfg = TransformerConfig(**{**PRESETS["debug"], "vocab_size": 97, "max_seq_len": SEQ, "n_kv_heads": 2})
    model = Transformer(cfg)
    model.init_weights(seed=0)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=generator)
    labels[0, :5] = -100
    # documents: the first sequence's second document starts before the split, the second's after it
    document_ids = torch.tensor([[0] * 10 + [1] * 22, [0] * 20 + [1] * 7 + [2] * 5])
    return model, tokens, labels, document_ids


def full_run(packed: bool):
    model, tokens, labels, document_ids = model_and_batch()
    positions = document_positions(document_ids) if packed else None
    mask = document_causal_mask(document_ids) if packed else None
    logits = model(tokens, positions, mask)
    F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def cp_worker(rank: int, store_path: str, packed: bool, results: dict):
    from torch.distributed.device_mesh import init_device_mesh

    from raylm.distributed.context_parallel import apply_context_parallel, shard_sequence

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, CP), rank=rank, world_size=CP)
    try:
        model, tokens, labels, document_ids = model_and_batch()
        apply_context_parallel(model, init_device_mesh("cpu", (CP,), mesh_dim_names=("cp",)))
        tokens, labels, positions, mask = shard_sequence(tokens, labels, document_ids if packed else None, rank, CP)
        logits = model(tokens, positions, mask)
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").backward()
        grads = {}
        for name, param in model.named_parameters():
            dist.all_reduce(param.grad)  # the ranks' gradients of their chunks add up to the whole sequence's
            grads[name] = param.grad
        results[rank] = {"logits": logits.detach(), "grads": grads}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed-documents"])
def test_two_rank_context_parallel_equals_one_process(packed):
    reference_logits, reference_grads = full_run(packed)
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(cp_worker, args=(os.path.join(tmp, "store"), packed, results), nprocs=CP, join=True)
        results = dict(results)
    half = SEQ // CP
    for rank in range(CP):
        torch.testing.assert_close(results[rank]["logits"], reference_logits[:, rank * half:(rank + 1) * half],
                                   rtol=1e-5, atol=1e-5)
        for name, grad in reference_grads.items():
            torch.testing.assert_close(results[rank]["grads"][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_cp_degree_is_checked_against_workers_and_sequence(tmp_path):
    from raylm.pipelines import pretrain

    with pytest.raises(ConfigError, match="dp_shard"):
        load_config(pretrain.Config, None, ["parallel.num_workers=3", "parallel.cp=2"])
    config = load_config(pretrain.Config, None, ["parallel.num_workers=2", "parallel.cp=2", "train.seq_len=33",
                                                 "model.max_seq_len=64"])
    with pytest.raises(ConfigError, match="parallel.cp: 2 does not divide train.seq_len"):
        pretrain.check_parallel(config, "cfg.yaml")
