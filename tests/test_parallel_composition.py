"""Parallelisms composed, each against one process on the same batches (same losses, validation loss
and final weights): pipeline stages x context-parallel ranks, expert-parallel x context-parallel
ranks, the blocks of a Mixture-of-Experts model in pipeline stages x expert-parallel ranks, with
each stage's auxiliary loss (pretraining), and packed fine-tuning documents through pipeline
stages (SFT)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from raylm.config import ConfigError, load_config
from raylm.models.config import preset
from raylm.models.hf_checkpoint import save_checkpoint
from raylm.models.transformer import Transformer
from raylm.pipelines import sft
from sft_fixtures import stdlib_instructions, write_jsonl_splits
from raylm.data.tokenizer import train_tokenizer
from raylm.tracking import stage_run
from test_train_pretrain import build_shards, history, pretrain_config, run_stage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
SFT_VOCAB = 512


@pytest.fixture(scope="module")
def ray_four_workers():
    import ray

    ray.init(num_cpus=4, include_dashboard=False)  # logical CPUs: 4 gloo ranks share the 2 cores
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("shards"), n_documents=400)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def assert_same_run(ours_dir, ours_run, theirs_dir, theirs_run, steps, rtol=1e-4, atol=1e-5):
    ours, theirs = history(ours_run, "loss"), history(theirs_run, "loss")
    assert sorted(ours) == list(range(1, steps + 1))
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-5, abs=1e-5), step
    assert history(ours_run, "grad_norm")[1] == pytest.approx(history(theirs_run, "grad_norm")[1], rel=max(rtol, 1e-4))
    assert history(ours_run, "val_loss")[steps] == pytest.approx(history(theirs_run, "val_loss")[steps], rel=1e-5)
    ours_w, theirs_w = load_file(ours_dir / "hf" / "model.safetensors"), load_file(theirs_dir / "hf" / "model.safetensors")
    assert set(ours_w) == set(theirs_w)
    for name in theirs_w:
        torch.testing.assert_close(ours_w[name], theirs_w[name], rtol=rtol, atol=atol, msg=name)


def test_pipeline_stages_times_context_parallel_ranks_match_one_process(data_dir, ray_four_workers,
                                                                      tracking_uri, tmp_path):
    """4 ranks: 2 stages x 2 context-parallel ranks (each 64-token sequence split 32 + 32, FSDP2
    over the cp ranks of a stage), 1F1B over 2 micro-batches."""
    common = {"model.tie_embeddings": "false", "train.steps": 3, "train.eval_every": 3, "train.checkpoint_every": 3}
    _, composed = run_stage(pretrain_config(data_dir, tmp_path / "pp_cp", **common, **{
        "parallel.num_workers": 4, "parallel.pp": 2, "parallel.cp": 2, "parallel.pp_microbatches": 2}), tracking_uri)
    _, one = run_stage(pretrain_config(data_dir, tmp_path / "one", **common, **{"parallel.num_workers": 1}),
                       tracking_uri)
    assert_same_run(tmp_path / "pp_cp", composed, tmp_path / "one", one, 3)


MOE_COMMON = {"model.preset": "moe-debug", "model.tie_embeddings": "false", "model.load_balance_coef": 0.0,
              "train.steps": 3, "train.eval_every": 3, "train.checkpoint_every": 3}


@pytest.fixture(scope="module")
def moe_one_process(data_dir, ray_four_workers, tracking_uri, tmp_path_factory):
    """The reference of the two expert-parallel compositions: moe-debug in one process on the same 4
    sequences a step (their 2 data-parallel ranks x 2 each) and the same 8 validation windows.
    Untied embeddings, as pipeline stages need; load-balancing loss off (a product of per-batch
    statistics, which a chunked batch does not reproduce), router z-loss on (a mean: the same over
    chunks)."""
    out = tmp_path_factory.mktemp("moe_one")
    _, run = run_stage(pretrain_config(data_dir, out, **MOE_COMMON, **{
        "parallel.num_workers": 1, "train.batch_size": 4}), tracking_uri)
    return out, run


def test_expert_parallel_times_context_parallel_ranks_match_one_process(data_dir, ray_four_workers, tracking_uri,
                                                                        moe_one_process, tmp_path):
    """4 ranks: moe-debug's experts split 2 + 2 over the 2 data-parallel ranks (tokens exchanged
    all-to-all), each sequence split 32 + 32 over 2 context-parallel ranks; expert gradients summed
    over the cp ranks that hold the same experts."""
    _, composed = run_stage(pretrain_config(data_dir, tmp_path / "ep_cp", **MOE_COMMON, **{
        "parallel.num_workers": 4, "parallel.ep": 2, "parallel.cp": 2}), tracking_uri)
    # Adam divides by sqrt(v): an expert that saw few tokens moves by float rounding of the exchange
    # order (see test_train_pretrain's expert-parallel test); a wrong shard or sum moves whole updates.
    assert_same_run(tmp_path / "ep_cp", composed, *moe_one_process, 3, rtol=1e-3, atol=1e-3)


def test_pipeline_stages_times_expert_parallel_ranks_match_one_process(data_dir, ray_four_workers, tracking_uri,
                                                                     moe_one_process, tmp_path):
    """4 ranks: moe-debug's 2 MoE blocks as 2 stages, each stage's experts split 2 + 2 over its 2
    data-parallel ranks (tokens exchanged all-to-all inside the stage), 1F1B over 2 micro-batches,
    each stage's router z-loss in the objective."""
    _, composed = run_stage(pretrain_config(data_dir, tmp_path / "pp_ep", **MOE_COMMON, **{
        "parallel.num_workers": 4, "parallel.pp": 2, "parallel.ep": 2, "parallel.pp_microbatches": 2}),
        tracking_uri)
    one = moe_one_process[1]
    # As in the expert-parallel tests: the exchange order moves rarely-used experts by float rounding.
    assert_same_run(tmp_path / "pp_ep", composed, *moe_one_process, 3, rtol=1e-3, atol=1e-3)
    for layer in (0, 1):  # each stage's expert loads, summed over its ranks, under the whole-model index
        fractions = [history(composed, f"moe/layer{layer}/expert{e}_fraction")[3] for e in range(4)]
        theirs = [history(one, f"moe/layer{layer}/expert{e}_fraction")[3] for e in range(4)]
        assert fractions == pytest.approx(theirs, abs=1e-6)
    assert history(composed, "moe/z_loss")[3] == pytest.approx(history(one, "moe/z_loss")[3], rel=1e-5)


@pytest.fixture(scope="module")
def sft_start(tmp_path_factory):
    """An untied debug model with its tokenizer, and the instruction splits."""
    folder = tmp_path_factory.mktemp("sft_start")
    instructions = stdlib_instructions(limit=200)
    tokenizer = folder / "tokenizer.json"
    train_tokenizer((e["prompt"] + "\n" + e["response"] for e in instructions), SFT_VOCAB, tokenizer)
    model = Transformer(preset("debug", vocab_size=SFT_VOCAB, max_seq_len=128, tie_embeddings=False))
    model.init_weights(seed=0)
    save_checkpoint(model, folder / "hf", tokenizer_file=str(tokenizer))
    return folder / "hf", write_jsonl_splits(instructions, folder / "data", 0.1, seed=0)


def sft_config(start, splits, out, **overrides) -> sft.Config:
    base = [f"output_dir={out}", f"checkpoint={start}", f"data.train={splits['train']}",
            f"data.validation={splits['validation']}", "epochs=null", "train.steps=3", "train.batch_size=4",
            "train.seq_len=128", "train.log_every=1", "train.eval_every=3", "train.eval_batches=2",
            "train.checkpoint_every=3", "train.deterministic=true", "optim.lr=3e-3", "optim.warmup_steps=1", "samples=0"]
    return load_config(sft.Config, None, base + [f"{k}={v}" for k, v in overrides.items()])


def run_sft(config, uri):
    sft.check(config, "sft.yaml")
    with stage_run("sft", config, uri=uri) as run:
        sft.run(config, run)
    return run


def test_sft_packed_documents_through_pipeline_stages_match_one_process(sft_start, ray_four_workers, tracking_uri,
                                                                        tmp_path):
    """Packed examples (no attention across them, positions restarting) with the prompt masked, GPipe
    schedule: the document mask and positions reach both stages' blocks in every micro-batch."""
    start, splits = sft_start
    staged = run_sft(sft_config(start, splits, tmp_path / "pp", **{
        "parallel.num_workers": 2, "parallel.pp": 2, "parallel.pp_microbatches": 2, "parallel.pp_schedule": "gpipe"}),
        tracking_uri)
    one = run_sft(sft_config(start, splits, tmp_path / "one", **{"parallel.num_workers": 1}), tracking_uri)
    # Weights within a tenth of one step at lr 3e-3: an embedding row whose token gets a near-zero
    # gradient (seen: 2 of 512 rows) takes an AdamW step g/sqrt(v) that the stages' different
    # summation order moves by ~1e-4; losses, grad norm and validation loss still match tightly.
    assert_same_run(tmp_path / "pp", staged, tmp_path / "one", one, 3, atol=3e-4)


def test_pipeline_refuses_a_tied_start_checkpoint(sft_start, tmp_path):
    start, splits = sft_start
    tied = tmp_path / "tied"
    hf = json.loads((start / "config.json").read_text())
    tied.mkdir()
    for f in start.iterdir():
        (tied / f.name).write_bytes(f.read_bytes())
    (tied / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": True}))
    config = sft_config(tied, splits, tmp_path / "out", **{"parallel.num_workers": 2, "parallel.pp": 2})
    with pytest.raises(ConfigError, match="checkpoint: tied embeddings would span the first and last stage"):
        sft.check(config, "sft.yaml")
