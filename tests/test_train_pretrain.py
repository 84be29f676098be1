"""`raylm pretrain` on a real local Ray with 1 and 2 gloo workers, on token shards built from the
standard library's docstrings (tokenizer trained here): FSDP2 against a single process, a worker
SIGKILLed mid-run against an uninterrupted run (bit-identical weights in deterministic mode), resume
on rerun, MoE metrics with bf16 + activation checkpointing + accumulation, and the config checks.
Metrics are read back from a real MLflow store that the Ray Train workers log into."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raylm.config import ConfigError, load_config
from raylm.data.stdlib_corpus import iter_corpus_documents
from raylm.models.hf_checkpoint import load_checkpoint
from raylm.pipelines import pretrain
from raylm.data.token_shards import TokenShardWriter, write_index
from raylm.data.tokenizer import train_tokenizer
from raylm.tracking import stage_run

VOCAB = 512


def build_shards(out: Path, n_documents: int = 800) -> Path:
    docs = [d["text"] for d in itertools.islice(iter_corpus_documents(), n_documents)]
    tokenizer = train_tokenizer(docs, VOCAB, out / "tokenizer.json")
    splits = {}
    for split, part in (("train", [d for i, d in enumerate(docs) if i % 20]), ("validation", docs[::20])):
        writer = TokenShardWriter(out, split, VOCAB, eos_token_id=2, shard_tokens=1 << 15)
        for text in part:
            writer.add(tokenizer.encode(text).ids)
        splits[split] = writer.close()
    write_index(out, VOCAB, 2, splits)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """A real MLflow store (SQLite) that the Ray Train workers log into and the tests read back."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def pretrain_config(data_dir, out, **overrides) -> pretrain.Config:
    base = [
        f"output_dir={out}", f"data_dir={data_dir}", "model.preset=debug", f"model.vocab_size={VOCAB}",
        "train.steps=8", "train.batch_size=2", "train.seq_len=64", "train.log_every=1", "train.eval_every=4",
        "train.eval_batches=2", "train.checkpoint_every=3", "train.deterministic=true", "optim.warmup_steps=2",
        "parallel.num_workers=2",
    ]
    return load_config(pretrain.Config, None, base + [f"{k}={v}" for k, v in overrides.items()])


def run_stage(config, uri) -> tuple[dict, object]:
    with stage_run("pretrain", config, uri=uri) as run:
        summary = pretrain.run(config, run)
    return summary, run


def history(run, key) -> dict[int, float]:
    """The last value logged for each step (a restarted group logs its replayed steps again)."""
    metrics = sorted(run.client.get_metric_history(run.run_id, key), key=lambda m: m.timestamp)
    return {m.step: m.value for m in metrics}


@pytest.fixture(scope="module")
def reference(data_dir, ray_local, tracking_uri, tmp_path_factory):
    """An uninterrupted deterministic 2-worker run: the baseline the other runs are held to."""
    out = tmp_path_factory.mktemp("reference")
    summary, run = run_stage(pretrain_config(data_dir, out), tracking_uri)
    return out, summary, run


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_worker_fsdp_matches_one_process_and_logs_everything(reference, data_dir, tracking_uri, tmp_path):
    out, summary, run = reference
    config = pretrain_config(data_dir, tmp_path, **{"parallel.num_workers": 1, "train.batch_size": 4})
    _, single_run = run_stage(config, tracking_uri)
    two, one = history(run, "loss"), history(single_run, "loss")
    assert sorted(two) == list(range(1, 9))
    # The same global batch each step (rank r reads every 2nd window): FSDP2 over 2 ranks may
    # differ from one process only in the order of floating-point reductions.
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-4), step
    assert two[8] < two[1]
    for key in ("grad_norm", "lr", "tokens_per_s", "mfu", "memory_gb"):
        values = history(run, key)
        assert len(values) == 8 and all(v > 0 for v in values.values()), key
    assert history(run, "lr")[1] == pytest.approx(config.optim.lr / 2)  # first of 2 warmup steps
    assert sorted(history(run, "val_loss")) == [4, 8]
    assert summary["val_loss"] == pytest.approx(history(run, "val_loss")[8])
    assert summary["resumed_from_step"] is None
    assert 0 < summary["unigram_val_loss"] < 7
    # The final model: a Hugging Face checkpoint with the data's tokenizer, also logged to MLflow.
    assert (out / "hf" / "tokenizer.json").exists()
    assert load_checkpoint(out / "hf").config.vocab_size == VOCAB
    artifacts = {a.path for a in run.client.list_artifacts(run.run_id, "model")}
    assert "model/model.safetensors" in artifacts
    # Sharded checkpoints: a DCP shard per rank plus each rank's data position and RNG; the last two kept.
    ckpts = sorted((out / "ray_train" / "pretrain").glob("checkpoint_0*"))
    assert [c.name for c in ckpts] == ["checkpoint_00000006", "checkpoint_00000008"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "rank_state_00000.json", "rank_state_00001.json",
            "trainer_state.json"} <= {p.name for p in ckpts[-1].iterdir()}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_worker_is_replaced_and_the_run_ends_with_identical_weights(reference, data_dir, tracking_uri, tmp_path):
    ref_out, _, ref_run = reference
    # Rank 1 SIGKILLs itself before step 5; Ray Train replaces the group, which resumes at step 3.
    summary, run = run_stage(pretrain_config(data_dir, tmp_path, **{"train.fail_at_step": 5}), tracking_uri)
    assert (tmp_path / "ray_train" / "pretrain" / "fault_injected_at_step_5").exists()
    assert summary["steps"] == 8
    assert summary["resumed_from_step"] == 3  # the newest checkpoint, not a restart from step 0
    steps_logged = [m.step for m in run.client.get_metric_history(run.run_id, "loss")]
    assert steps_logged.count(4) == 2  # step 4 ran, was lost with the worker, and ran again
    assert history(run, "loss") == history(ref_run, "loss")
    resumed = load_file(tmp_path / "hf" / "model.safetensors")
    uninterrupted = load_file(ref_out / "hf" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tensor_parallel_matches_data_parallel(reference, data_dir, tracking_uri, tmp_path):
    """tp=2 on 2 workers (both read the same batch of 4) against the FSDP2 reference (2 x 2): the
    same losses, and after the rows of the fused projections are put back, the same weights."""
    ref_out, _, ref_run = reference
    config = pretrain_config(data_dir, tmp_path, **{"parallel.tp": 2, "train.batch_size": 4})
    _, run = run_stage(config, tracking_uri)
    tp, dp = history(run, "loss"), history(ref_run, "loss")
    assert sorted(tp) == sorted(dp)
    for step in tp:
        assert tp[step] == pytest.approx(dp[step], rel=1e-4, abs=1e-4), step
    assert history(run, "grad_norm")[1] == pytest.approx(history(ref_run, "grad_norm")[1], rel=1e-4)
    ours, theirs = load_file(tmp_path / "hf" / "model.safetensors"), load_file(ref_out / "hf" / "model.safetensors")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=2e-5, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero2_style_sharding_matches_zero3(reference, data_dir, tracking_uri, tmp_path):
    """parallel.fsdp_reshard_after_forward=false (parameters stay gathered from forward to backward)
    against the ZeRO-3 reference: the same computation with fewer all-gathers, so the same losses
    and weights, and sharded DCP checkpoints all the same."""
    ref_out, _, ref_run = reference
    config = pretrain_config(data_dir, tmp_path, **{"parallel.fsdp_reshard_after_forward": "false"})
    assert config.parallel.fsdp_reshard_after_forward is False
    _, run = run_stage(config, tracking_uri)
    ours, theirs = history(run, "loss"), history(ref_run, "loss")
    assert sorted(ours) == list(range(1, 9))
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-6, abs=1e-6), step
    ours_w, theirs_w = load_file(tmp_path / "hf" / "model.safetensors"), load_file(ref_out / "hf" / "model.safetensors")
    for name in theirs_w:
        torch.testing.assert_close(ours_w[name], theirs_w[name], rtol=1e-6, atol=1e-7, msg=name)
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (tmp_path / "ray_train" / "pretrain" /
                                                                  "checkpoint_00000008").iterdir()}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_expert_parallel_matches_one_process(data_dir, ray_local, tracking_uri, tmp_path):
    """moe-debug with its 4 experts split 2 + 2 over 2 workers (tokens exchanged all-to-all) against
    one process on the same global batch. The load-balancing loss is off: it is a product of
    per-batch statistics, so a 2-rank average of it is not the 1-process value (the z-loss, a mean, is)."""
    common = {"model.preset": "moe-debug", "model.load_balance_coef": 0.0, "train.steps": 4, "train.eval_every": 0,
              "train.checkpoint_every": 4}
    _, ep_run = run_stage(pretrain_config(data_dir, tmp_path / "ep", **common, **{"parallel.ep": 2}), tracking_uri)
    _, one_run = run_stage(pretrain_config(data_dir, tmp_path / "one", **common, **{
        "parallel.num_workers": 1, "train.batch_size": 4}), tracking_uri)
    ep, one = history(ep_run, "loss"), history(one_run, "loss")
    assert sorted(ep) == [1, 2, 3, 4]
    for step in ep:
        assert ep[step] == pytest.approx(one[step], rel=1e-4, abs=1e-4), step
    ours, theirs = load_file(tmp_path / "ep" / "hf" / "model.safetensors"), load_file(tmp_path / "one" / "hf" / "model.safetensors")
    # Adam divides by sqrt(v): where an expert saw few tokens, its gradients are tiny and float
    # rounding of the all-to-all order moves an update by a fraction of lr (3e-3 x 4 steps at most;
    # seen: 1.6e-4). A wrong shard or exchange moves whole updates (~lr) and the losses above.
    worst = {name: (ours[name] - theirs[name]).abs().max().item() for name in theirs}
    print("expert parallel vs one process, largest weight differences:", sorted(worst.items(), key=lambda kv: -kv[1])[:3])
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-3, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_context_parallel_matches_one_process(data_dir, ray_local, tracking_uri, tmp_path):
    """Each 64-token sequence split 32 + 32 over 2 workers (all-gather attention, FSDP2 over the
    cp ranks) against one process on the same batches: same losses, same final weights."""
    common = {"train.steps": 4, "train.eval_every": 4, "train.checkpoint_every": 4}
    _, cp_run = run_stage(pretrain_config(data_dir, tmp_path / "cp", **common, **{"parallel.cp": 2}), tracking_uri)
    _, one_run = run_stage(pretrain_config(data_dir, tmp_path / "one", **common, **{"parallel.num_workers": 1}),
                           tracking_uri)
    cp, one = history(cp_run, "loss"), history(one_run, "loss")
    assert sorted(cp) == [1, 2, 3, 4]
    for step in cp:
        assert cp[step] == pytest.approx(one[step], rel=1e-5, abs=1e-5), step
    assert history(cp_run, "val_loss")[4] == pytest.approx(history(one_run, "val_loss")[4], rel=1e-5)
    ours, theirs = load_file(tmp_path / "cp" / "hf" / "model.safetensors"), load_file(tmp_path / "one" / "hf" / "model.safetensors")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rerun_resumes_from_the_latest_checkpoint(data_dir, ray_local, tracking_uri, tmp_path):
    run_stage(pretrain_config(data_dir, tmp_path, **{"train.steps": 3, "train.eval_every": 0}), tracking_uri)
    summary, run = run_stage(pretrain_config(data_dir, tmp_path, **{"train.steps": 5, "train.eval_every": 0}),
                             tracking_uri)
    assert summary["steps"] == 5 and summary["resumed_from_step"] == 3
    assert sorted(history(run, "loss")) == [4, 5]  # steps 1-3 came from the checkpoint


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_moe_bf16_activation_checkpointing_accumulation_logs_expert_load(data_dir, ray_local, tracking_uri, tmp_path):
    config = pretrain_config(data_dir, tmp_path, **{
        "model.preset": "moe-debug", "train.steps": 3, "train.grad_accum": 2, "train.mixed_precision": "bf16",
        "train.activation_checkpointing": "full", "train.eval_every": 3, "train.deterministic": False})
    summary, run = run_stage(config, tracking_uri)
    assert summary["steps"] == 3 and summary["val_loss"] > 0
    fractions = [history(run, f"moe/layer{layer}/expert{e}_fraction")[3] for layer in (0, 1) for e in range(4)]
    assert sum(fractions[:4]) == pytest.approx(1.0) and sum(fractions[4:]) == pytest.approx(1.0)
    assert history(run, "moe/aux_loss")[3] > 0 and history(run, "moe/load_balance_loss")[3] > 0
    assert load_checkpoint(tmp_path / "hf").config.n_experts == 4


def test_config_errors_name_the_key(data_dir, tmp_path):
    config = pretrain_config(data_dir, tmp_path, **{"model.vocab_size": 256})
    with pytest.raises(ConfigError, match="model.vocab_size: 256 is smaller than the data's vocabulary"):
        pretrain.check(config, "x.yaml")
    with pytest.raises(ConfigError, match="data_dir"):
        pretrain.check(pretrain_config(tmp_path / "nothing", tmp_path), "x.yaml")
    with pytest.raises(ConfigError, match="parallel.dp_shard"):
        pretrain_config(data_dir, tmp_path, **{"parallel.dp_shard": 3})
    with pytest.raises(ConfigError, match="model.tie_embeddings: tied embeddings would span"):
        pretrain.check(pretrain_config(data_dir, tmp_path, **{"parallel.pp": 2}), "x.yaml")
    with pytest.raises(ConfigError, match="train.batch_size: 2 is not divisible by parallel.pp_microbatches"):
        pretrain.check(pretrain_config(data_dir, tmp_path, **{"parallel.pp": 2, "model.tie_embeddings": "false",
                                                              "parallel.pp_microbatches": 4}), "x.yaml")
    result = subprocess.run([str(Path(sys.executable).with_name("raylm")), "pretrain", "/dev/null",
                             "--set", f"data_dir={tmp_path}/missing"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "data_dir" in result.stderr


def test_resume_finds_the_newest_checkpoint_every_rank_finished(tmp_path):
    """A replaced worker group resumes from the newest checkpoint folder in the run's storage that
    every rank finished writing, even one Ray Train's controller had not yet registered."""
    from raylm.actors.train.train_worker import newest_checkpoint_folder

    def write(step: int, ranks: list[int]) -> None:
        folder = tmp_path / f"checkpoint_{step:08d}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
        (folder / ".metadata").write_bytes(b"")
        for rank in ranks:
            (folder / f"rank_state_{rank:05d}.json").write_text("{}")
            (folder / f"__{rank}_0.distcp").write_bytes(b"")

    write(10, [0, 1])
    write(20, [0])  # rank 1 died before its files of step 20 arrived
    (tmp_path / "checkpoint_tmp").mkdir()
    assert newest_checkpoint_folder(str(tmp_path), world_size=2).name == "checkpoint_00000010"
    assert newest_checkpoint_folder(str(tmp_path), world_size=1).name == "checkpoint_00000020"
    assert newest_checkpoint_folder(str(tmp_path / "absent"), world_size=2) is None
