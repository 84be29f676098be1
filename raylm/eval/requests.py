"""Tokenisation as lm-evaluation-harness's Hugging Face backend does it (``Encoder``), and the
log-likelihood requests of a task built with it."""

from __future__ import annotations

import json
from pathlib import Path

from raylm.eval.metrics import rolling_windows
from raylm.eval.tasks import Task


class Encoder:
    """Text to token ids as lm_eval's Hugging Face backend has them (``encode``, ``encode_pair``), and back.

    A tokenizer that is one ``tokenizer.json`` under transformers' generic fast class, with nothing in
    ``tokenizer_config.json`` that changes what it adds or how it decodes (what raylm's checkpoints
    carry), is run by the ``tokenizers`` library directly: that is all transformers does with it, and
    importing transformers (which imports torch) would cost the driver ~6 s before it could hand the
    scorers any work. Any other tokenizer goes through ``transformers.AutoTokenizer``."""

    PLAIN_FAST_KEYS = {"tokenizer_class", "model_max_length", "clean_up_tokenization_spaces",
                       "bos_token", "eos_token", "pad_token", "unk_token", "chat_template"}

    def __init__(self, folder: str):
        path = Path(folder)
        tok_config = path / "tokenizer_config.json"
        settings = json.loads(tok_config.read_text()) if tok_config.exists() else {}
        plain = ((path / "tokenizer.json").exists() and not (path / "special_tokens_map.json").exists()
                 and settings.get("tokenizer_class") == "PreTrainedTokenizerFast"
                 and set(settings) <= self.PLAIN_FAST_KEYS and not settings.get("clean_up_tokenization_spaces")
                 and all(isinstance(settings.get(k, ""), str) for k in ("bos_token", "eos_token")))
        if plain:
            import tokenizers

            self.tokenizer = None
            self.backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            bos, eos = (self.backend.token_to_id(settings[k]) if k in settings else None for k in ("bos_token", "eos_token"))
        else:
            import transformers

            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        self.prefix_token_id = bos if bos is not None else eos
        hf = json.loads((path / "config.json").read_text())
        self.max_length = next((hf[k] for k in ("n_positions", "max_position_embeddings", "n_ctx") if k in hf), 2048)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return self.backend.encode(text).ids
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return self.backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.prefix_token_id], self.encode(continuation)
        spaces = len(context) - len(context.rstrip())  # trailing spaces belong to the continuation
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return context_ids, whole[len(context_ids) :]


def loglikelihood_rows(task: Task, num_fewshot: int | None, enc: Encoder, max_length: int, stride: int | None) -> list[dict]:
    """One row per scored sequence; ``doc``/``choice`` say what it belongs to."""
    rows = []
    if task.output_type == "multiple_choice":
        for d, (doc, context) in enumerate(zip(task.eval_docs, task.contexts(num_fewshot))):
            for c, choice in enumerate(task.choices(doc)):
                ctx, cont = enc.encode_pair(context, task.target_delimiter + choice)
                seq = (ctx + cont)[-(max_length + 1) :]
                rows.append({"doc": d, "choice": c, "tokens": seq, "n_scored": min(len(cont), len(seq) - 1)})
    else:
        for d, doc in enumerate(task.eval_docs):
            full = [enc.prefix_token_id] + enc.encode(task.text(doc))
            for w, (start, end, n) in enumerate(rolling_windows(len(full) - 1, max_length, stride)):
                rows.append({"doc": d, "choice": w, "tokens": full[start:end], "n_scored": n})
    return rows
