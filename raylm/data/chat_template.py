"""Conversations -> token ids and an exact assistant-token mask, with a checkpoint's own chat template.

Every stage that formats a chat (SFT prompt masking, reward and DPO pairs, RLHF rollout prompts,
the SFT answer samples) goes through ``ChatTemplate``, so a model is trained, rolled out and served
with one format: the Jinja ``chat_template`` of its ``tokenizer_config.json`` (or
``chat_template.jinja``), rendered by transformers' own ``apply_chat_template`` on the loaded
tokenizer. The text is tokenised as ``apply_chat_template(..., tokenize=True)`` tokenises it: with no
special tokens added by the tokenizer, so a template that writes ``bos_token`` gives one BOS, and a
template that does not gives none. vLLM's chat endpoint and ``transformers.pipeline`` do the same.

The source is a ``tokenizer.json`` or the folder holding it. Beside a ``tokenizer_config.json`` the
folder is loaded by ``transformers.AutoTokenizer`` (any Hugging Face checkpoint); without one, or
when the config has no chat template, the file must be raylm's own tokenizer (``raylm.data.tokenizer``),
whose template ``RAYLM_CHAT_TEMPLATE`` is raylm's role-token format. Anything else is an error.

The assistant mask is found by incremental rendering, not by the template's ``{% generation %}``
markers (few templates have them). For each assistant message i:

- the generation prompt ``render(messages[:i], add_generation_prompt=True)`` must tokenise to a
  prefix of the whole conversation's ids: what the model is given at inference is exactly what it
  was trained to continue. A template where this fails (one that drops earlier turns' reasoning, or
  a tokenizer that merges across the boundary) is refused with a ``ChatTemplateError``;
- the targets are every token after that prompt up to the end of the message's content (the
  template may trim it) and the special token the template writes right after it, the end-of-turn
  token (``<|end|>``, ``<|im_end|>``, ``<|eot_id|>``, ``</s>``): the model learns to answer and to
  stop. Whatever follows that token (a newline, raylm's closing ``<|eos|>``) is not a target. A
  template that writes no special token after an answer is refused: nothing would end a generation.
"""

from __future__ import annotations

import json
from pathlib import Path

from raylm.data.tokenizer import ASSISTANT, BOS, END, EOS, PAD, RAYLM_CHAT_TEMPLATE, SPECIAL_TOKENS, SYSTEM, USER

ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers save a template beside tokenizer_config.json


class ChatTemplateError(ValueError):
    pass


def is_raylm_tokenizer(tokenizer_json: str | Path) -> bool:
    """Whether a tokenizer.json holds raylm's special tokens at their fixed ids (0..6)."""
    added = {t["id"]: t["content"] for t in json.loads(Path(tokenizer_json).read_text()).get("added_tokens", [])}
    return all(added.get(i) == token for i, token in enumerate(SPECIAL_TOKENS))


def has_chat_template(source: str | Path) -> bool:
    """Whether a tokenizer.json (or its folder) comes with a chat template: its folder's
    tokenizer_config.json or chat_template.jinja has one, or it is raylm's own tokenizer."""
    source = Path(source)
    folder, tokenizer_json = (source, source / "tokenizer.json") if source.is_dir() else (source.parent, source)
    config = folder / "tokenizer_config.json"
    if (folder / TEMPLATE_FILE).exists() or (config.exists() and json.loads(config.read_text()).get("chat_template")):
        return True
    return tokenizer_json.exists() and is_raylm_tokenizer(tokenizer_json)


def load_chat_tokenizer(source: str | Path):
    """The transformers tokenizer of ``source`` (a tokenizer.json or its folder) with its chat template set."""
    source = Path(source)
    folder, tokenizer_json = (source, source / "tokenizer.json") if source.is_dir() else (source.parent, source)
    if not source.exists():
        raise ChatTemplateError(f"{source}: no such tokenizer file or folder")
    has_config = (folder / "tokenizer_config.json").exists()
    if has_config and tokenizer_json.name == "tokenizer.json":
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001: transformers raises many kinds; name the folder
            raise ChatTemplateError(f"{folder}: transformers cannot load the tokenizer ({type(e).__name__}: {e})") from e
    elif tokenizer_json.exists() and tokenizer_json.suffix == ".json":
        if not is_raylm_tokenizer(tokenizer_json):
            raise ChatTemplateError(f"{tokenizer_json}: not raylm's tokenizer and no tokenizer_config.json beside it; "
                                    "give the checkpoint folder's tokenizer.json with its tokenizer_config.json")
        from raylm.data.tokenizer import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(tokenizer_json)
    else:
        raise ChatTemplateError(f"{source}: expected a tokenizer.json or a folder with tokenizer.json and "
                                "tokenizer_config.json")
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(f"{folder}: raylm needs a fast (tokenizer.json) tokenizer, got {type(tokenizer).__name__}")
    if not tokenizer.chat_template:
        if not (tokenizer_json.exists() and is_raylm_tokenizer(tokenizer_json)):
            raise ChatTemplateError(f"{folder}: tokenizer_config.json has no chat_template (and no {TEMPLATE_FILE}): "
                                    "raylm formats conversations only with the checkpoint's own template")
        tokenizer.chat_template = RAYLM_CHAT_TEMPLATE  # a raylm checkpoint written before templates were saved
    if isinstance(tokenizer.chat_template, dict):
        if "default" not in tokenizer.chat_template:
            raise ChatTemplateError(f"{folder}: named chat templates {sorted(tokenizer.chat_template)} and none is "
                                    "'default'")
        tokenizer.chat_template = tokenizer.chat_template["default"]
    return tokenizer


class ChatTemplate:
    """Renders conversations with a checkpoint's chat template as token ids with a per-token target flag.

    ``tokenizer`` is the ``tokenizers.Tokenizer`` underneath (``decode``, ``token_to_id``), ``hf`` the
    transformers tokenizer. ``end_id`` is the end-of-turn token the template closes an assistant
    message with, ``turn_suffix`` the ids the template writes after it when the conversation ends
    there, ``stop_ids`` what ends a generated answer (``end_id`` and the EOS ids)."""

    def __init__(self, source: str | Path):
        self.source = str(source)
        self.hf = load_chat_tokenizer(source)
        self.tokenizer = self.hf.backend_tokenizer
        self.specials = sorted({t for t in self.hf.all_special_tokens} |
                               {t.content for t in self.hf.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
        self.bos_id, self.eos_id, self.pad_id = self.hf.bos_token_id, self.hf.eos_token_id, self.hf.pad_token_id
        self.role_ids = {role: self.tokenizer.token_to_id(token)
                         for role, token in (("system", SYSTEM), ("user", USER), ("assistant", ASSISTANT))
                         if self.tokenizer.token_to_id(token) is not None}
        # The template's shape, read from a probe conversation: its end-of-turn token and what follows it.
        probe = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
        ids, target = self.encode(probe)
        last = max(i for i, t in enumerate(target) if t)
        self.end_id = ids[last] if self.hf.convert_ids_to_tokens(ids[last]) in self.specials else None
        if self.end_id is None:
            raise ChatTemplateError(f"{self.source}: the chat template writes no special token after an assistant "
                                    "message, so a generated answer has no token to stop at")
        self.turn_suffix = ids[last + 1:]
        self.stop_ids = list(dict.fromkeys([self.end_id] + ([self.eos_id] if self.eos_id is not None else [])))

    # ---- rendering ----------------------------------------------------------------------------

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001: the template's own raise_exception, or a Jinja error
            raise ChatTemplateError(f"{self.source}: the chat template fails on this conversation "
                                    f"({type(e).__name__}: {e})") from e

    def encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` on its own, as the template's text is tokenised (no special tokens added):
        the fast tokenizer's own ``tokenizers`` backend, what ``apply_chat_template`` runs, without
        transformers' batch wrapper (6x faster here; the tests check the ids equal transformers')."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _with_system(self, messages: list[dict], system_prompt: str | None) -> list[dict]:
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise ChatTemplateError(f"messages[{i}]: expected {{'role': one of {ROLES}, 'content': str}}")
        if system_prompt and messages and messages[0]["role"] != "system":
            return [{"role": "system", "content": system_prompt}, *messages]
        return list(messages)

    def encode(self, messages: list[dict], system_prompt: str | None = None) -> tuple[list[int], list[bool]]:
        """(token ids, target flags) of a whole conversation: exactly ``apply_chat_template(messages,
        tokenize=True)``'s ids; the targets are each assistant message and its end-of-turn token."""
        messages = self._with_system(messages, system_prompt)
        text = self.render(messages)
        ids = self.encode_text(text)
        target = [False] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            start = self._prefix_length(ids, prompt, text, f"the generation prompt before messages[{i}]")
            stop = self._turn_end(messages, i, text, len(prompt))
            end = self._prefix_length(ids, text[:stop], text, f"the end of messages[{i}] (assistant)")
            for k in range(start, end):
                target[k] = True
        return ids, target

    def prompt(self, messages: list[dict], system_prompt: str | None = None) -> list[int]:
        """Ids to generate the next assistant message from: the conversation and the generation prompt."""
        return self.encode_text(self.render(self._with_system(messages, system_prompt), add_generation_prompt=True))

    def close(self, prompt_ids: list[int], response: list[int]) -> list[int]:
        """A generated answer as the template closes it: ``prompt_ids``, the answer, its end-of-turn
        token (added when generation stopped without it) and ``turn_suffix``: the ids ``encode`` gives
        the conversation, when the answer's tokens are its content's."""
        closed = response if response and response[-1] == self.end_id else [*response, self.end_id]
        return [*prompt_ids, *closed, *self.turn_suffix]

    def answer_text(self, response: list[int]) -> str:
        """A generated answer's text, cut at its end-of-turn token."""
        if self.end_id in response:
            response = response[:response.index(self.end_id)]
        return self.tokenizer.decode(response)

    # ---- the mask -----------------------------------------------------------------------------

    def _prefix_length(self, ids: list[int], prefix: str, text: str, what: str) -> int:
        """How many of ``ids`` (the tokens of ``text``) the string ``prefix`` covers, or a clear error."""
        if not text.startswith(prefix):
            raise ChatTemplateError(f"{self.source}: the chat template renders {what} differently from the whole "
                                    "conversation (it rewrites earlier messages, e.g. drops their reasoning), so no "
                                    "exact assistant mask exists; train on conversations that end at that message")
        head = self.encode_text(prefix)
        if ids[:len(head)] != head:
            raise ChatTemplateError(f"{self.source}: {what} tokenises differently alone than inside the conversation "
                                    "(a token spans the boundary), so the prompt given at inference would differ "
                                    "from the one trained on")
        return len(head)

    def _turn_end(self, messages: list[dict], i: int, text: str, start: int) -> int:
        """Character offset in ``text`` where assistant message i's content and end-of-turn token end."""
        alone = self.render(messages[:i + 1])  # the conversation up to this message: shares the whole turn
        shared = len(_common_prefix(text, alone))
        region = text[start:shared]
        content = messages[i]["content"]
        best = None
        for body in dict.fromkeys([content, content.strip()]):
            for special in self.specials:
                at = region.find(body + special)
                if at >= 0 and (best is None or at < best[0]):
                    best = (at, at + len(body) + len(special))
        if best is not None:
            return start + best[1]
        for body in dict.fromkeys([content, content.strip()]):
            at = region.rfind(body)
            if at >= 0:
                return start + at + len(body)
        if content.strip() in alone[start:]:
            raise ChatTemplateError(f"{self.source}: the chat template renders messages[{i}] (assistant) differently "
                                    "once later messages follow (it rewrites earlier messages, e.g. drops their "
                                    "reasoning), so no exact assistant mask exists; train on conversations that end "
                                    "at that message")
        raise ChatTemplateError(f"{self.source}: cannot find messages[{i}] (assistant)'s content in the rendered "
                                "conversation (the template changes it), so no exact assistant mask exists")


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]
