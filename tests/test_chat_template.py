"""Chat templates: raylm formats a conversation with the checkpoint's own Jinja ``chat_template``
exactly as transformers' ``apply_chat_template`` does, and its assistant mask marks exactly each
assistant message's content and the end-of-turn token after it (``<|eot_id|>``, ``<|im_end|>``,
``</s>``, raylm's ``<|end|>``), on multi-turn conversations with a system prompt. raylm's own
checkpoints carry a template that reproduces the role-token format token for token, read back by
transformers and vLLM. The tokenizers are built here with the ``tokenizers`` library (nothing is
downloaded)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raylm.data.chat_template import ChatTemplate, ChatTemplateError
from raylm.config import ConfigError

CORPUS = ["What does json.dumps do? Serialize obj to a JSON formatted str.",
          "You are a helpful assistant. Answer briefly and exactly.",
          "Return the sum of the numbers; hello world, how are you today?"] * 20

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does json.dumps do?"},
    {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
    {"role": "user", "content": "And hello?"},
    {"role": "assistant", "content": "hello world"},
]

# Written for these tests in the style of the families named (not copied from any model's files).
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_STYLE = (  # a default system prompt when the conversation has none, as Qwen2's template does
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_WITH_GENERATION_TAGS = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
INST_STYLE = (  # plain-text markers, each answer closed by EOS, no system role, no generation prompt
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{{ raise_exception('this template has no system role') }}{% endif %}{% endfor %}"
)
REASONING_DROPPING = (  # earlier answers lose their reasoning: no prefix-consistent rendering exists
    "{% for m in messages %}{% set content = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

FAMILIES = {
    # name: (special tokens, bos, eos, pad, template, the end-of-turn token)
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>", LLAMA3_STYLE, "<|eot_id|>"),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>", "<|endoftext|>", CHATML_STYLE,
               "<|im_end|>"),
    "chatml_generation_tags": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>",
                               CHATML_WITH_GENERATION_TAGS, "<|im_end|>"),
    "inst": (["<s>", "</s>", "<unk>"], "<s>", "</s>", "<unk>", INST_STYLE, "</s>"),
}


def build_folder(folder: Path, specials, bos, eos, pad, template, bos_by_tokenizer=False) -> Path:
    """A byte-level BPE tokenizer saved the way a hub checkpoint holds it: tokenizer.json and a
    tokenizer_config.json with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos_by_tokenizer:  # as Llama 3's tokenizer does: encode() itself puts BOS first
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)) if v}
    PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **kwargs).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-templates")
    return {name: build_folder(root / name, *spec[:5], bos_by_tokenizer=name == "llama3") for name, spec in FAMILIES.items()}


def reference(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def apply(tok, messages, add_generation_prompt=False) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                        add_generation_prompt=add_generation_prompt))


def expected_mask(tok, messages, ids, end_token, strip=False) -> list[bool]:
    """Built from transformers alone: each assistant message starts where transformers' generation
    prompt before it ends, and holds its content's ids and the end-of-turn token."""
    mask = [False] * len(ids)
    end_id = tok.convert_tokens_to_ids(end_token)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(apply(tok, messages[:i], add_generation_prompt=True))
        span = tok.encode(m["content"].strip() if strip else m["content"], add_special_tokens=False) + [end_id]
        assert ids[start:start + len(span)] == span, f"messages[{i}]: not where the generation prompt ends"
        mask[start:start + len(span)] = [True] * len(span)
    return mask


@pytest.mark.parametrize("family", ["llama3", "chatml", "chatml_generation_tags", "inst"])
def test_ids_equal_transformers_and_the_mask_is_each_answer_and_its_end_of_turn(folders, family):
    tok, template = reference(folders[family]), ChatTemplate(folders[family] / "tokenizer.json")
    end_token = FAMILIES[family][5]
    messages = CONVERSATION if family != "inst" else CONVERSATION[1:]
    ids, target = template.encode(messages)
    assert ids == apply(tok, messages)
    assert target == expected_mask(tok, messages, ids, end_token)
    assert sum(target) > 2 * 2  # two answers of several tokens each
    assert template.end_id == tok.convert_tokens_to_ids(end_token)
    for k in (1, 3):  # the rollout / serving prompt is transformers' generation prompt
        assert template.prompt(messages[:k]) == apply(tok, messages[:k], add_generation_prompt=True)
    # A generated answer closed by the template: exactly the ids of the whole conversation.
    a = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    answer = template.encode_text(messages[a]["content"]) + [template.end_id]
    assert template.close(template.prompt(messages[:a]), answer) == apply(tok, messages[:a + 1])


def test_the_mask_agrees_with_transformers_generation_tags(folders):
    tok = reference(folders["chatml_generation_tags"])
    out = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, target = ChatTemplate(folders["chatml_generation_tags"]).encode(CONVERSATION)
    assert ids == list(out["input_ids"]) and [int(t) for t in target] == list(out["assistant_masks"])


def test_system_default_bos_and_trimming(folders):
    chatml = ChatTemplate(folders["chatml"])
    ids, _ = chatml.encode(CONVERSATION[1:])  # no system message: the template's default one
    assert chatml.tokenizer.decode(ids[:12], skip_special_tokens=False).startswith("<|im_start|>system\nYou are")
    ids, _ = chatml.encode(CONVERSATION[1:], system_prompt="Answer briefly.")
    assert ids == chatml.encode(CONVERSATION)[0]

    llama = ChatTemplate(folders["llama3"])
    bos = llama.hf.bos_token_id
    assert llama.hf.encode("hello")[0] == bos  # the tokenizer adds BOS by itself ...
    ids, target = llama.encode(CONVERSATION)
    assert ids[0] == bos and ids.count(bos) == 1  # ... but the template's BOS is the only one
    assert llama.prompt(CONVERSATION[:2]).count(bos) == 1
    padded = [dict(m, content=f"  {m['content']}\n") for m in CONVERSATION]  # the template trims content
    ids, target = llama.encode(padded)
    assert target == expected_mask(reference(folders["llama3"]), padded, ids, "<|eot_id|>", strip=True)


def test_templates_without_an_exact_mask_are_refused(tmp_path, folders):
    folder = build_folder(tmp_path / "reasoning", *FAMILIES["chatml"][:4], REASONING_DROPPING)
    template = ChatTemplate(folder)
    thinking = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "<think>greet</think>Hello."},
                {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Hello again."}]
    with pytest.raises(ChatTemplateError, match="rewrites earlier messages"):
        template.encode(thinking)
    assert template.encode(thinking[:2])[1].count(True) > 0  # ending at the reasoning answer is exact
    with pytest.raises(ChatTemplateError, match="no system role"):
        ChatTemplate(folders["inst"]).encode(CONVERSATION)
    with pytest.raises(ChatTemplateError, match="role"):
        ChatTemplate(folders["chatml"]).encode([{"role": "tool", "content": "x"}])

    bare = build_folder(tmp_path / "bare", *FAMILIES["chatml"][:4], None)
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        ChatTemplate(bare / "tokenizer.json")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "tokenizer.json").write_text((bare / "tokenizer.json").read_text())
    with pytest.raises(ChatTemplateError, match="not raylm's tokenizer"):
        ChatTemplate(tmp_path / "loose" / "tokenizer.json")


def test_sft_and_preference_data_use_the_checkpoints_template(tmp_path, folders):
    from raylm.data.preferences import PairDataset, encode_response
    from raylm.data.sft import IGNORE_INDEX, PackedSFTDataset

    folder = folders["chatml"]
    tok = reference(folder)
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    sequence = next(iter(PackedSFTDataset(data, folder / "tokenizer.json", seq_len=256, shuffle=False, loop=False)))
    ids = apply(tok, CONVERSATION)
    mask = expected_mask(tok, CONVERSATION, ids, "<|im_end|>")
    assert sequence["tokens"][:len(ids)].tolist() == ids
    assert sequence["labels"][:len(ids)].tolist() == [ids[i + 1] if i + 1 < len(ids) and mask[i + 1] else IGNORE_INDEX
                                                      for i in range(len(ids))]

    template = ChatTemplate(folder)
    pair = [{"role": "user", "content": "What does json.dumps do?"}, {"role": "assistant", "content": "Serialize obj."}]
    full = apply(tok, pair)
    assert encode_response(template, pair[0]["content"], pair[1]["content"], 256)[0] == full
    ids, labels = encode_response(template, "hello world " * 30, "Serialize obj to a JSON formatted str. " * 10, 60)
    tail = [template.end_id] + template.turn_suffix  # the answer still ends as the template ends it
    assert len(ids) == 60 and ids[-len(tail):] == tail and ids[:3] == full[:3]
    assert labels[-len(tail) - 1] == template.end_id and set(labels[-len(tail):]) == {IGNORE_INDEX}
    batch = PairDataset([{"prompt": "Hi", "chosen": "hello world", "rejected": "how are you"}], folder / "tokenizer.json",
                        128, shuffle=False).batch([0])
    assert batch["tokens"][0, :len(apply(tok, [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "hello world"}]))].tolist() == \
        apply(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello world"}])


# ---- raylm's own tokenizer and checkpoints --------------------------------------------------------

@pytest.fixture(scope="module")
def raylm_checkpoint(tmp_path_factory):
    from raylm.models.config import preset
    from raylm.models.hf_checkpoint import save_checkpoint
    from raylm.models.transformer import Transformer
    from raylm.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("raylm-chat")
    tokenizer = root / "data" / "tokenizer.json"
    train_tokenizer(CORPUS, 400, tokenizer)
    model = Transformer(preset("debug", vocab_size=400, max_seq_len=128))
    model.init_weights(seed=0)
    return tokenizer, save_checkpoint(model.eval(), root / "hf", tokenizer_file=tokenizer)


def role_token_format(template: ChatTemplate, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """raylm's format as it was written by hand before chat templates: <|bos|>, then per message its
    role token, its text and <|end|> (answers and their <|end|> are targets), then <|eos|>."""
    from raylm.data.tokenizer import BOS_ID, END, EOS_ID

    ids, target = [BOS_ID], [False]
    for m in messages:
        body = template.tokenizer.encode(m["content"], add_special_tokens=False).ids + [template.tokenizer.token_to_id(END)]
        ids += [template.role_ids[m["role"]], *body]
        target += [False] + [m["role"] == "assistant"] * len(body)
    return ids + [EOS_ID], target + [False]


def test_raylm_template_is_the_role_token_format(raylm_checkpoint):
    tokenizer, folder = raylm_checkpoint
    template = ChatTemplate(tokenizer)  # a tokenizer.json alone: raylm's own, with its template
    assert template.encode(CONVERSATION) == role_token_format(template, CONVERSATION)
    assert template.prompt(CONVERSATION[:4]) == role_token_format(template, CONVERSATION[:4])[0][:-1] + [5]
    assert (template.end_id, template.turn_suffix, template.stop_ids) == (6, [2], [6, 2])

    # The checkpoint carries the template: transformers formats chats exactly as raylm trained on them.
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in config["chat_template"]
    tok = reference(folder)
    assert apply(tok, CONVERSATION) == template.encode(CONVERSATION)[0]
    assert apply(tok, CONVERSATION[:4], add_generation_prompt=True) == template.prompt(CONVERSATION[:4])
    assert ChatTemplate(folder).encode(CONVERSATION) == template.encode(CONVERSATION)


def test_a_foreign_checkpoint_keeps_its_template_on_export(tmp_path, folders):
    from raylm.models.config import preset
    from raylm.models.hf_checkpoint import save_checkpoint
    from raylm.models.transformer import Transformer

    source = folders["chatml"]
    model = Transformer(preset("debug", vocab_size=reference(source).vocab_size + 8, max_seq_len=128))
    out = save_checkpoint(model, tmp_path / "export", tokenizer_file=source / "tokenizer.json")
    assert reference(out).chat_template == CHATML_STYLE  # transformers 5 saves it as chat_template.jinja
    assert ChatTemplate(out).encode(CONVERSATION) == ChatTemplate(source).encode(CONVERSATION)


@pytest.mark.parametrize("family", ["raylm", "chatml"])
def test_rlhf_prompts_and_reward_sequences_follow_the_template(tmp_path, folders, raylm_checkpoint, family):
    """Rollout prompts are the template's generation prompt; a generated answer (stopped at the
    end-of-turn token, at another of the policy's end ids, or cut short without either) reaches the
    reward model as the whole conversation."""
    import shutil

    from raylm.pipelines import rlhf

    tokenizer, folder = raylm_checkpoint
    source = folder / "tokenizer.json" if family == "raylm" else folders["chatml"] / "tokenizer.json"
    if family == "chatml":  # a policy with Qwen2.5's end ids: <|im_end|> (id 2) and <|endoftext|> (id 0)
        policy = shutil.copytree(folder, tmp_path / "policy")
        hf = json.loads((policy / "config.json").read_text())
        (policy / "config.json").write_text(json.dumps({**hf, "eos_token_id": [2, 0]}))
        folder = policy
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What does json.dumps do?", "reference": "Serialize obj."}) + "\n")
    config = rlhf.Config.model_validate({"output_dir": str(tmp_path), "policy": {"checkpoint": str(folder)},
                                         "reward": {"checkpoint": str(folder)},
                                         "data": {"prompts": str(prompts), "tokenizer": str(source)}})
    task, template = rlhf.Task(config), ChatTemplate(source)
    user = [{"role": "user", "content": "What does json.dumps do?"}]
    conversation = user + [{"role": "assistant", "content": "Serialize obj."}]
    if family == "raylm":  # the format raylm trained on before templates, token for token
        assert task.train[0]["ids"] == role_token_format(template, user)[0][:-1] + [5]
        assert task.reward_sequence(task.train[0]["ids"], template.encode_text("Serialize obj.")) == \
            role_token_format(template, conversation)[0]
    tok = reference(source.parent)
    assert task.train[0]["ids"] == apply(tok, user, add_generation_prompt=True)
    answer = template.encode_text("Serialize obj.")
    # the template's end of turn first, then the policy's EOS ids, which the engines stop on too
    other_end = {"raylm": 2, "chatml": 0}[family]
    assert task.stop_ids == [template.end_id, other_end]
    for response in (answer, answer + [template.end_id], answer + [other_end]):
        assert task.reward_sequence(task.train[0]["ids"], response) == apply(tok, conversation)
        assert task.text(response) == "Serialize obj."


VLLM_CHAT = textwrap.dedent("""
    import json, os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    folder, messages = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=folder, dtype="float32", max_model_len=128, enforce_eager=True, gpu_memory_utilization=0.2)
    out = llm.chat(messages, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    print("PROMPT_IDS", json.dumps(list(out[0].prompt_token_ids)))
""")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_chat_formats_as_raylm_trained(raylm_checkpoint):
    from raylm.actors.generation_engine import vllm_available

    if not vllm_available():
        pytest.skip("vLLM is not installed")
    tokenizer, folder = raylm_checkpoint
    messages = CONVERSATION[:4]
    run = subprocess.run([sys.executable, "-c", VLLM_CHAT, str(folder), json.dumps(messages)],
                         capture_output=True, text=True, timeout=540)
    lines = [line for line in run.stdout.splitlines() if line.startswith("PROMPT_IDS ")]
    assert lines, f"vLLM chat failed:\n{run.stderr[-3000:]}"
    assert json.loads(lines[0].split(" ", 1)[1]) == ChatTemplate(tokenizer).prompt(messages)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eval_preference_answers_and_judges_in_the_chat_template(tmp_path, raylm_checkpoint):
    """`raylm eval`'s win rate: each model answers the prompt as a user message in its template (the
    torch engine here), and the reward model reads [user, assistant] as reward training encoded it."""
    import ray

    from raylm.models.generate import SamplingParams, generate
    from raylm.models.hf_checkpoint import load_checkpoint
    from raylm.eval.engines import generate_texts, judge_tokens
    from raylm.eval.pairs import pair_chat
    from raylm.eval.requests import Encoder
    from raylm.pipelines.eval import Config, GenerationConfig
    from raylm.data.preferences import encode_response

    tokenizer, folder = raylm_checkpoint
    template = ChatTemplate(folder)
    prompts = ["What does json.dumps do?", "hello world"]
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        texts = generate_texts(str(folder), prompts, 6, [], GenerationConfig(backend="torch"), seed=0, chat=True)
    finally:
        ray.shutdown()
    ids = [template.prompt([{"role": "user", "content": p}]) for p in prompts]
    expected = generate(load_checkpoint(folder).eval(), ids, SamplingParams(max_new_tokens=6, temperature=0.0))
    assert texts == [template.answer_text(e) for e in expected]
    judged = judge_tokens(Encoder(str(folder)), template, prompts[0], texts[0])
    assert judged == encode_response(template, prompts[0], texts[0], 128)[0]
    assert judged[-2:] == [template.end_id, 2]

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("")
    bare = tmp_path / "bare"  # a checkpoint whose tokenizer has no template: unset `chat` cannot pick
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / name).read_bytes())
    build_folder(bare, *FAMILIES["chatml"][:4], None)
    config = Config(output_dir=str(tmp_path), preference={"model_a": str(folder), "model_b": str(bare),
                                                          "reward_model": str(folder), "prompts": str(prompts_file)})
    with pytest.raises(ConfigError, match="model_a, reward_model have a chat template and model_b not"):
        pair_chat(config.preference, "preference", config.checkpoints)
    assert pair_chat(config.preference.model_copy(update={"chat": False}), "preference", config.checkpoints) is False
    config.preference.model_b = str(folder)
    assert pair_chat(config.preference, "preference", config.checkpoints) is True
