"""Builders shared by tests/test_reward.py and tests/test_dpo.py: a tokenizer with the chat tokens
and a small language model briefly fine-tuned (in-process, one thread) on the training functions of
the built-in stdlib docstring task, i.e. a quick stand-in for `raylm sft`'s output. Built once per
pytest session into the session's base temp folder; the second test file finds it there."""

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
