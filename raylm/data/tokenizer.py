"""raylm's tokenizer: byte-level BPE trained with Hugging Face ``tokenizers``.

The special tokens have fixed ids that the model configs and the chat format rely on:
``<|pad|>``=0, ``<|bos|>``=1, ``<|eos|>``=2, ``<|system|>``=3, ``<|user|>``=4, ``<|assistant|>``=5,
``<|end|>``=6. The file written is a ``tokenizer.json`` that ``transformers.PreTrainedTokenizerFast``
loads; encoding adds no special tokens by itself (the tokenization stage appends EOS per document).

``RAYLM_CHAT_TEMPLATE`` is the chat format in transformers' Jinja chat-template form, written into the
``tokenizer_config.json`` of raylm's checkpoints so that ``apply_chat_template``, ``pipeline`` and
vLLM's chat endpoint format a conversation token for token as training did (``raylm.data.chat_template``)::

    <|bos|> [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> ... <|eos|>

with the generation prompt ``<|assistant|>`` in place of the closing ``<|eos|>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END]  # position = id
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # the specials plus the 256 byte symbols
# Literal role tokens, not the bos_token/eos_token variables: the format is fixed by the ids above.
RAYLM_CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('raylm chat: a role must be system, user or assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ '<|eos|>' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | Path, min_frequency: int = 2,
                    batch_size: int = 1000, split_digits: bool = False):
    """Train a byte-level BPE tokenizer on ``texts`` and save it as ``out_path`` (a tokenizer.json).
    Returns the trained ``tokenizers.Tokenizer``. ``texts`` is consumed once, streaming.

    ``split_digits``: every digit is its own token (as in Llama and DeepSeek), so a number is read and
    written digit by digit instead of in whatever chunks BPE merged; it helps a small model learn
    arithmetic. The pre-tokenizer is saved in the tokenizer.json, so transformers and vLLM split alike."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size: must be at least {MIN_VOCAB_SIZE} (7 special tokens + 256 bytes), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # GPT-2's byte-level scheme: any byte sequence round-trips, no unknown token is needed.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                               if split_digits else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,  # added first, in this order: ids 0..6
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_batches(texts, batch_size), trainer=trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise AssertionError(f"special token {token} got id {tokenizer.token_to_id(token)}, expected {token_id}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tokenizer.save(str(tmp))
    tmp.replace(out_path)
    return tokenizer


def _batches(texts: Iterable[str], size: int):
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def load_hf_tokenizer(path: str | Path):
    """The same tokenizer as ``transformers.PreTrainedTokenizerFast`` with its special tokens named and
    raylm's chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=[SYSTEM, USER, ASSISTANT, END],
                                   chat_template=RAYLM_CHAT_TEMPLATE)


def vocab_size_of(path: str | Path) -> int:
    data = json.loads(Path(path).read_text())
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1
