"""Builders shared by tests/test_reward.py and tests/test_dpo.py: a tokenizer with the chat tokens
and a small language model briefly fine-tuned (in-process, one thread) on the training functions of
the built-in stdlib docstring task, i.e. a quick stand-in for `raylm sft`'s output. Built once per
pytest session into the session's base temp folder; the second test file finds it there. Also a
random model with a few pair files, and the fault drill both preference stages are held to."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from raylm.models.config import preset
from raylm.models.hf_checkpoint import save_checkpoint
from raylm.models.transformer import Transformer
from raylm.data.preferences import IGNORE_INDEX, encode_response, pad_batch
from raylm.data.stdlib_task import split_functions, stdlib_functions

VOCAB = 1024
SEQ_LEN = 128
LIMIT = None  # functions of the built-in task (None: all ~4,500)
VALIDATION_FRACTION = 0.1
SFT_STEPS = 300


def build_sft_checkpoint(folder: Path, seed: int = 0) -> Path:
    """tokenizer.json + a debug-size model fine-tuned on "What does `f(sig)` do?" -> its docstring's
    first line, for the task's training functions only (the held-out ones stay unseen)."""
    from raylm.data.sft import ChatTemplate
    from raylm.data.tokenizer import train_tokenizer

    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    items = stdlib_functions(LIMIT)
    tokenizer = folder / "tokenizer.json"
    train_tokenizer((i["prompt"] + "\n" + i["reference"] for i in items), VOCAB, tokenizer)
    train = split_functions(items, VALIDATION_FRACTION, seed)["train"]
    template = ChatTemplate(tokenizer)
    examples = [encode_response(template, i["prompt"], i["reference"], SEQ_LEN) for i in train]
    model = Transformer(preset("debug", vocab_size=VOCAB, max_seq_len=SEQ_LEN))
    model.init_weights(seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on the shared 2-core machine more threads only spin against each other
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(SFT_STEPS):
        idx = torch.randint(0, len(examples), (32,), generator=g).tolist()
        batch = pad_batch([examples[i][0] for i in idx], [examples[i][1] for i in idx])
        logits = model(batch["tokens"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    torch.set_num_threads(threads)
    save_checkpoint(model.eval(), folder, tokenizer_file=tokenizer)
    (folder / "fixture.json").write_text(json.dumps({"sft_steps": SFT_STEPS, "final_loss": loss.item()}))
    return folder


def shared_sft_checkpoint(tmp_path_factory) -> Path:
    """RAYLM_PREFERENCE_FIXTURE=folder keeps the model across sessions (built there if missing)."""
    cached = os.environ.get("RAYLM_PREFERENCE_FIXTURE")
    return build_sft_checkpoint(Path(cached) if cached else tmp_path_factory.getbasetemp() / "preference-sft-model")


def reward_inputs(template, prompts: list[str], responses: list[str], seq_len: int) -> dict:
    """What a reward model (``TransformerWithScalarHead.sequence_scores``) scores a batch of
    (prompt, response) with: ``{"tokens", "attention_mask"}``, right-padded."""
    return pad_batch([encode_response(template, p, r, seq_len)[0] for p, r in zip(prompts, responses)])


def small_pair_inputs(folder: Path) -> tuple[Path, dict, list[dict]]:
    """A random debug-size model (room for a soft prompt past 128 positions), a tokenizer, and pair
    files from 60 stdlib instructions (chosen: the function's docstring line, rejected: another
    function's). -> (the model's folder, {"train", "validation"}: the files, the training pairs)."""
    from raylm.data.jsonl import write_jsonl
    from raylm.data.tokenizer import train_tokenizer
    from sft_fixtures import stdlib_instructions

    examples = stdlib_instructions(limit=60)
    train_tokenizer((e["prompt"] + "\n" + e["response"] for e in examples), 512, folder / "tokenizer.json")
    pairs = [{"prompt": e["prompt"], "chosen": e["response"], "rejected": examples[(i + 7) % len(examples)]["response"]}
             for i, e in enumerate(examples)]
    files = {"train": str(write_jsonl(pairs[:48], folder / "train.jsonl")),
             "validation": str(write_jsonl(pairs[48:], folder / "validation.jsonl"))}
    base = Transformer(preset("debug", vocab_size=512, max_seq_len=256))
    base.init_weights(seed=0)
    save_checkpoint(base, folder / "base", tokenizer_file=str(folder / "tokenizer.json"))
    return folder / "base", files, pairs[:48]


def check_fault_drill(stage: str, base: Path, files: dict, folder: Path, **sections) -> None:
    """`raylm <stage>` (reward or dpo, on the Ray already started) from ``base`` on the pair
    ``files`` (``small_pair_inputs``), on 2 workers for 6 steps,
    checkpointing every 2: straight through, then with rank 1 killed before step 4
    (``train.fail_at_step``). The second run resumes from step 2's checkpoint (its step 3 logged
    twice: once before the kill, once replayed) and ends with the same losses and the very same
    exported weights as the first."""
    from safetensors.torch import load_file

    from raylm.pipelines import dpo, reward
    from raylm.tracking import stage_run

    stage_module = {"reward": reward, "dpo": dpo}[stage]

    def run(out: Path, **faults):
        config = stage_module.Config.model_validate({
            "output_dir": str(out), "seed": 0, "checkpoint": str(base), "data": files, **sections,
            "train": {"steps": 6, "batch_size": 4, "seq_len": 128, "log_every": 1, "eval_every": 0,
                      "checkpoint_every": 2, "deterministic": True, **faults},
            "optim": {"lr": 1e-3, "warmup_steps": 1}, "parallel": {"num_workers": 2}})
        stage_module.check(config, "test")
        with stage_run(stage, config, uri=f"sqlite:///{out / 'mlflow.db'}") as stage_run_:
            summary = stage_module.run(config, stage_run_)
        losses = sorted(stage_run_.client.get_metric_history(stage_run_.run_id, "loss"), key=lambda m: m.timestamp)
        return summary, losses, load_file(out / "hf" / "model.safetensors")

    straight, straight_losses, straight_weights = run(folder / "straight")
    faulted, faulted_losses, faulted_weights = run(folder / "faulted", fail_at_step=4, fail_rank=1)
    assert (folder / "faulted" / "ray_train" / stage / "fault_injected_at_step_4").exists()
    assert straight["resumed_from_step"] is None and straight["steps"] == faulted["steps"] == 6
    assert faulted["resumed_from_step"] == 2  # the newest checkpoint, not a restart from step 0
    assert [m.step for m in straight_losses] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in faulted_losses] == [1, 2, 3, 3, 4, 5, 6]  # step 3 was lost with the worker
    assert {m.step: m.value for m in faulted_losses} == {m.step: m.value for m in straight_losses}
    assert faulted_weights.keys() == straight_weights.keys()
    for name, tensor in straight_weights.items():
        assert torch.equal(faulted_weights[name], tensor), name
