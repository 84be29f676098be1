"""The generic fallback (``raylm.train.transformers_model``): a checkpoint of a family raylm does not
implement (GPT-2, written by transformers) fine-tuned by `raylm sft` through transformers' own
module on 2 FSDP2 workers, exported as GPT-2 again; and what that path cannot run refused by name."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from raylm.config import ConfigError, load_config
from raylm.data.tokenizer import train_tokenizer
from raylm.pipelines import sft
from sft_fixtures import stdlib_instructions, write_jsonl_splits

VOCAB = 512


@pytest.fixture(scope="module")
def gpt2_start(tmp_path_factory):
    """A random-init GPT-2 that transformers writes, with raylm's tokenizer (and chat template) beside it."""
    folder = tmp_path_factory.mktemp("gpt2")
    examples = stdlib_instructions(limit=120)
    splits = write_jsonl_splits(examples, folder / "data", 0.1, seed=0)
    train_tokenizer((e["prompt"] + "\n" + e["response"] for e in examples), VOCAB, folder / "tokenizer.json")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder / "hf")
    (folder / "hf" / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    return folder / "hf", splits


def sft_config(start, splits, out, *overrides) -> sft.Config:
    base = [f"output_dir={out}", f"checkpoint={start}", f"data.train={splits['train']}",
            f"data.validation={splits['validation']}", "epochs=null", "train.steps=6", "train.batch_size=4",
            "train.seq_len=128", "train.log_every=1", "train.eval_every=6", "train.eval_batches=2",
            "train.checkpoint_every=100", "optim.lr=3e-3", "optim.warmup_steps=1", "samples=1",
            "parallel.num_workers=2"]
    return load_config(sft.Config, None, base + list(overrides))


@pytest.mark.parametrize("setting, key", [
    ("parallel.tp=2", "parallel.tp"), ("parallel.pp=2", "parallel.pp"), ("parallel.cp=2", "parallel.cp"),
    ("peft.method=lora", "peft.method"), ("freeze.train_layers=1", "freeze.train_layers"),
    ("train.compile=true", "train.compile"), ("train.activation_checkpointing=selective", "train.activation_checkpointing"),
])
def test_what_the_transformers_path_cannot_run_is_refused_by_name(gpt2_start, tmp_path, setting, key):
    start, splits = gpt2_start
    with pytest.raises(ConfigError, match=rf"sft.yaml: {key}: .*model_type 'gpt2' trains through transformers"):
        sft.check(sft_config(start, splits, tmp_path, setting), "sft.yaml")


def test_implementation_raylm_refuses_a_family_it_does_not_implement(gpt2_start, tmp_path):
    start, splits = gpt2_start
    with pytest.raises(ConfigError, match="checkpoint: .*model_type: 'gpt2' is not one raylm loads"):
        sft.check(sft_config(start, splits, tmp_path, "implementation=raylm"), "sft.yaml")
    sft.check(sft_config(start, splits, tmp_path), "sft.yaml")  # auto: through transformers


def test_a_model_that_ignores_the_document_mask_is_refused(gpt2_start):
    """A model that drops the packed sequences' mask and positions would attend across examples.
    (transformers itself finds packed documents from restarting positions when no mask is given.)"""
    from raylm.train.transformers_model import TransformersCausalLM, check_packed_documents

    start, _ = gpt2_start

    class IgnoresDocuments(TransformersCausalLM):
        def forward(self, tokens, positions=None, attn_mask=None):
            return super().forward(tokens)

    model = IgnoresDocuments(transformers.AutoModelForCausalLM.from_pretrained(start))
    with pytest.raises(ValueError, match="model_type 'gpt2' through transformers does not honour packed"):
        check_packed_documents(model, start)
    check_packed_documents(TransformersCausalLM(model.hf), start)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sft_through_transformers_trains_and_exports_the_same_family(gpt2_start, tmp_path):
    """6 steps on 2 FSDP2 workers: the loss falls, the export is GPT-2 (safetensors, the tokenizer and
    its chat template beside it), its weights moved, and transformers reloading it computes the
    held-out loss the workers logged at the last step (so it holds the trained weights)."""
    import ray

    from raylm.data.sft import IGNORE_INDEX, PackedSFTDataset
    from raylm.models.transformer import document_causal_mask, document_positions
    from raylm.tracking import stage_run
    from test_train_pretrain import history

    start, splits = gpt2_start
    config = sft_config(start, splits, tmp_path / "out", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    sft.check(config, "sft.yaml")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        with stage_run("sft", config, uri=config.tracking.uri) as run:
            summary = sft.run(config, run)
    finally:
        ray.shutdown()
    losses = history(run, "loss")
    assert sorted(losses) == list(range(1, 7))
    assert losses[6] < losses[1] - 0.5, losses

    export = tmp_path / "out" / "hf"
    written = json.loads((export / "config.json").read_text())
    assert written["model_type"] == "gpt2" and written["architectures"] == ["GPT2LMHeadModel"]
    assert (export / "model.safetensors").exists() and not list(export.glob("*.bin"))
    assert "chat_template" in json.loads((export / "tokenizer_config.json").read_text())
    trained = transformers.AutoModelForCausalLM.from_pretrained(export, use_safetensors=True).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(start).eval()
    assert not torch.equal(trained.transformer.h[0].attn.c_attn.weight, original.transformer.h[0].attn.c_attn.weight)

    # The last step's validation: each of the 2 ranks' first eval_batches batches, summed.
    total, labelled = 0.0, 0
    for rank in range(2):
        dataset = PackedSFTDataset(splits["validation"], str(start / "tokenizer.json"), seq_len=128, seed=0, rank=rank,
                                   world_size=2, shuffle=False, loop=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=4)
        for i, batch in enumerate(loader):
            if i == 2:
                break
            doc = batch["document_ids"]
            with torch.no_grad():
                logits = trained(input_ids=batch["tokens"], position_ids=document_positions(doc),
                                 attention_mask=document_causal_mask(doc), use_cache=False).logits
            total += F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum").item()
            labelled += int((batch["labels"] != IGNORE_INDEX).sum())
    assert total / labelled == pytest.approx(history(run, "val_loss")[6], rel=1e-4)
    assert summary["val_loss"] == pytest.approx(history(run, "val_loss")[6])
