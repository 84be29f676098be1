"""SFT data (chat template, prompt masking, packing without cross-example attention, resumable
rank-disjoint dataset, errors naming file:line:key) and `raylm sft` end to end on a real local Ray
with 2 gloo workers, starting from a Hugging Face checkpoint, with freezing by depth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from raylm.models.config import preset
from raylm.models.hf_checkpoint import load_checkpoint, save_checkpoint
from raylm.models.transformer import Transformer, document_causal_mask, document_positions
from raylm.data.sft import (
    IGNORE_INDEX,
    ChatTemplate,
    PackedSFTDataset,
    SFTDataError,
    read_conversations,
)
from raylm.data.tokenizer import ASSISTANT, END, train_tokenizer
from sft_fixtures import stdlib_instructions, write_jsonl_splits

pytestmark = pytest.mark.timeout(900)
VOCAB = 512


@pytest.fixture(scope="module")
def instructions():
    return stdlib_instructions(limit=400)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, instructions):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer((e["prompt"] + "\n" + e["response"] for e in instructions), VOCAB, path)
    return path


@pytest.fixture(scope="module")
def splits(tmp_path_factory, instructions):
    return write_jsonl_splits(instructions, tmp_path_factory.mktemp("sft"), 0.1, seed=0)


def test_template_masks_everything_but_the_answer(tokenizer_file):
    template = ChatTemplate(tokenizer_file)
    messages = [{"role": "user", "content": "What does `json.dumps` do?"},
                {"role": "assistant", "content": "Serialize obj to a JSON formatted str."}]
    ids, target = template.encode(messages, system_prompt="Answer briefly.")
    tok = template.tokenizer
    assert ids[0] == 1 and ids[1] == 3 and ids[-1] == 2  # bos, <|system|>, ..., eos
    answer_start = ids.index(tok.token_to_id(ASSISTANT)) + 1
    targets = [i for i, t in enumerate(target) if t]
    assert targets == list(range(answer_start, len(ids) - 1))  # the answer and its <|end|>, nothing else
    assert ids[targets[-1]] == tok.token_to_id(END)
    assert tok.decode(ids[answer_start:-2]) == "Serialize obj to a JSON formatted str."
    assert template.prompt(messages[:1]) == ids[:0] + [1, 4] + template.encode_text(messages[0]["content"]) + [6, 5]


def test_packing_keeps_examples_apart(tokenizer_file, splits):
    dataset = PackedSFTDataset(splits["validation"], tokenizer_file, seq_len=128, shuffle=False, loop=False)
    batch = next(iter(dataset))
    docs, tokens, labels = batch["document_ids"], batch["tokens"], batch["labels"]
    assert docs.max() >= 2  # several examples in one sequence
    # labels never cross a document boundary, and every example's first label is masked (prompt)
    boundary = (docs[1:] != docs[:-1]).nonzero().flatten()
    assert (labels[boundary] == IGNORE_INDEX).all()
    trained = labels != IGNORE_INDEX
    assert 0 < trained.sum() < len(labels) // 2
    assert (labels[:-1][trained[:-1]] == tokens[1:][trained[:-1]]).all()
    # A packed forward gives each example the logits it gets alone (mask + position reset)
    model = Transformer(preset("debug", vocab_size=VOCAB, max_seq_len=128)).eval()
    model.init_weights(seed=0)
    with torch.no_grad():
        doc = docs[None]
        packed = model(tokens[None], document_positions(doc), document_causal_mask(doc))[0]
        for d in range(int(docs.max()) + 1):
            where = (docs == d).nonzero().flatten()
            alone = model(tokens[where][None])[0]
            torch.testing.assert_close(packed[where], alone, atol=1e-4, rtol=1e-4)


def test_dataset_is_rank_disjoint_and_resumes_exactly(tokenizer_file, splits):
    def first(ds, n):
        it = iter(ds)
        return [next(it)["tokens"] for _ in range(n)]

    ranks = [PackedSFTDataset(splits["train"], tokenizer_file, seq_len=128, seed=7, rank=r, world_size=2)
             for r in range(2)]
    a, b = first(ranks[0], 3), first(ranks[1], 3)
    assert all(not torch.equal(x, y) for x in a for y in b)
    full = PackedSFTDataset(splits["train"], tokenizer_file, seq_len=128, seed=7, rank=0, world_size=2)
    n = full.sequences_per_epoch()
    expected = first(full, n + 3)  # crosses into the second epoch (a new shuffle)
    resumed = PackedSFTDataset(splits["train"], tokenizer_file, seq_len=128, seed=7, rank=0, world_size=2)
    head = first(resumed, n - 1)
    state = json.loads(json.dumps(resumed.state_dict()))
    again = PackedSFTDataset(splits["train"], tokenizer_file, seq_len=128, seed=7, rank=0, world_size=2)
    again.load_state_dict(state)
    tail = first(again, 4)
    assert all(torch.equal(x, y) for x, y in zip(head + tail, expected))
    assert not torch.equal(expected[0], expected[n])  # the second epoch is reshuffled


def test_bad_lines_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(SFTDataError, match=r"bad.jsonl:3: key 'response'"):
        read_conversations(path)
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}\n')
    with pytest.raises(SFTDataError, match=r"bad.jsonl:1: messages\[1\].role"):
        read_conversations(path)
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(SFTDataError, match="no assistant turn"):
        read_conversations(path)
    path.write_text('{"prompt": "a", "response": "b"\n')
    with pytest.raises(SFTDataError, match="bad.jsonl:1: not valid JSON"):
        read_conversations(path)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"},
                {"role": "assistant", "content": "a2"}]
    path.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"prompt": "p", "response": "r"}) + "\n")
    assert read_conversations(path) == [messages, [{"role": "user", "content": "p"},
                                                   {"role": "assistant", "content": "r"}]]


def response_loss(model, path, tokenizer_file) -> float:
    """Mean loss over every answer token of a JSONL file, in one process (independent of the trainer)."""
    dataset = PackedSFTDataset(path, tokenizer_file, seq_len=128, shuffle=False, loop=False)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in dataset:
            doc = batch["document_ids"][None]
            logits = model(batch["tokens"][None], document_positions(doc), document_causal_mask(doc))[0]
            total += F.cross_entropy(logits, batch["labels"], ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((batch["labels"] != IGNORE_INDEX).sum())
    return total / count


@pytest.mark.slow
def test_raylm_sft_trains_the_last_layer_and_lowers_held_out_response_loss(tmp_path, tokenizer_file, splits):
    import ray

    from raylm import cli

    start = tmp_path / "start"
    model = Transformer(preset("debug", vocab_size=VOCAB, max_seq_len=128))
    model.init_weights(seed=0)
    save_checkpoint(model, start, tokenizer_file=str(tokenizer_file))
    config = tmp_path / "sft.json"
    config.write_text(json.dumps({
        "output_dir": str(tmp_path / "out"), "seed": 0, "ray": {"num_cpus": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "checkpoint": str(start),
        "data": {"train": splits["train"], "validation": splits["validation"]},
        "epochs": 2, "freeze": {"train_layers": 1},
        "train": {"batch_size": 4, "seq_len": 128, "log_every": 5, "eval_every": 10, "eval_batches": 4,
                  "checkpoint_every": 100},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "parallel": {"num_workers": 2},
    }))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert cli.main(["sft", str(config)]) == 0
    finally:
        ray.shutdown()
    before = load_file(start / "model.safetensors")
    after = load_file(tmp_path / "out" / "hf" / "model.safetensors")
    frozen = [k for k in before if ".layers.0." in k]
    trained = [k for k in before if ".layers.1." in k]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained)
    assert (tmp_path / "out" / "hf" / "tokenizer.json").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])
    assert {"samples.txt", "model", "config.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.metrics["val_loss"] > 0 and int(run.data.params["train.steps_resolved"]) > 10
    initial = response_loss(load_checkpoint(start), splits["validation"], tokenizer_file)
    final = response_loss(load_checkpoint(tmp_path / "out" / "hf"), splits["validation"], tokenizer_file)
    assert final < initial - 0.5, (initial, final)


def test_cli_rejects_bad_config_before_any_ray_work(tmp_path, tokenizer_file, capsys):
    from raylm import cli

    start = tmp_path / "start"
    model = Transformer(preset("debug", vocab_size=VOCAB, max_seq_len=128))
    save_checkpoint(model, start, tokenizer_file=str(tokenizer_file))
    good = tmp_path / "train.jsonl"
    good.write_text('{"prompt": "a", "response": "b"}\n')
    bad = tmp_path / "validation.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"messages": []}\n')
    config = tmp_path / "sft.json"

    def write(**overrides):
        base = {"output_dir": str(tmp_path / "out"), "checkpoint": str(start),
                "data": {"train": str(good), "validation": str(good)}, "train": {"seq_len": 128}}
        config.write_text(json.dumps({**base, **overrides}))

    write(data={"train": str(good), "validation": str(bad)})
    assert cli.main(["sft", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data.validation" in err and "validation.jsonl:2: key 'messages'" in err
    write(checkpoint=str(tmp_path / "missing"))
    assert cli.main(["sft", str(config)]) == 2
    assert "checkpoint:" in capsys.readouterr().err
    write(freeze={"train_layers": 3})
    assert cli.main(["sft", str(config)]) == 2
    assert "freeze.train_layers: 3 exceeds the checkpoint's 2 layers" in capsys.readouterr().err
    write(train={"seq_len": 4096})
    assert cli.main(["sft", str(config)]) == 2
    assert "train.seq_len" in capsys.readouterr().err


def test_builtin_set_holds_out_the_preference_tasks_functions(tmp_path):
    """SFT's built-in instructions never train on the functions that reward, DPO and RLHF hold out."""
    import json

    from raylm.config import load_config
    from raylm.pipelines import sft
    from raylm.data.stdlib_task import stdlib_preference_splits

    config = load_config(sft.Config, None, [f"output_dir={tmp_path}", "data.builtin=stdlib-instructions",
                                            "data.builtin_limit=300"])
    files = sft.data_files(config)
    prompts = {split: {json.loads(line)["prompt"] for line in open(path)} for split, path in files.items()}
    held_out = {pair["prompt"] for pair in stdlib_preference_splits(limit=300)["validation"]}
    assert prompts["validation"] == held_out
    assert not prompts["train"] & held_out and len(prompts["train"]) > 200
