"""Builders shared by the eval tests and benchmark: a byte-level BPE tokenizer trained on standard
library docstrings, and small raylm checkpoints (optionally briefly trained) that carry it."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from raylm.data.stdlib_corpus import iter_stdlib_functions
from raylm.models.config import preset
from raylm.models.hf_checkpoint import save_checkpoint
from raylm.models.transformer import Transformer, TransformerWithScalarHead, causal_lm_loss

SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>"]
VOCAB = 512


def stdlib_texts(n: int = 3000) -> list[str]:
    return [f.docstring for f in itertools.islice(iter_stdlib_functions(), n)]


def build_tokenizer(path: Path, vocab_size: int = VOCAB) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(stdlib_texts(), trainer)
    tok.save(str(path))
    return path


def build_model(seed: int, train_steps: int = 0, tokenizer: Path | None = None, scalar_head: bool = False):
    cfg = preset("debug", vocab_size=VOCAB, max_seq_len=256)
    model = TransformerWithScalarHead(cfg) if scalar_head else Transformer(cfg)
    if scalar_head:
        model.model.init_weights(seed=seed)
        torch.nn.init.normal_(model.score.weight, std=0.5, generator=torch.Generator().manual_seed(seed))
    else:
        model.init_weights(seed=seed)
    if train_steps:  # a few steps on stdlib docstrings, so trained and untrained checkpoints differ
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer))
        ids = [t for text in stdlib_texts(400) for t in [1] + tok.encode(text).ids]
        data = torch.tensor(ids[: (len(ids) // 129) * 129]).view(-1, 129)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # on a shared 2-core machine, more threads only spin against each other
        g = torch.Generator().manual_seed(seed)
        for _ in range(train_steps):
            batch = data[torch.randint(0, len(data), (16,), generator=g)]
            out = causal_lm_loss(model, batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        torch.set_num_threads(threads)
    return model.eval()


def build_checkpoint(folder: Path, tokenizer: Path | None, seed: int, train_steps: int = 0, scalar_head: bool = False) -> Path:
    model = build_model(seed, train_steps, tokenizer, scalar_head)
    return save_checkpoint(model, folder, tokenizer_file=tokenizer)
