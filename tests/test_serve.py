"""`raylm serve`: vLLM's OpenAI server, in a Ray actor on 127.0.0.1, serves a raylm checkpoint and a
LoRA adapter by name. Queried with the `openai` client: /v1/models lists both, a chat's prompt is
the checkpoint's chat template token for token, and greedy completions (base and adapter) equal
raylm's own generator. One server for the module."""

from __future__ import annotations

import pytest
import ray
import torch

from raylm.data.chat_template import ChatTemplate
from raylm.config import ConfigError
from raylm.peft.lora import LoRASettings, apply_lora, merge_lora, save_adapter
from raylm.models.config import preset
from raylm.models.generate import SamplingParams, generate
from raylm.models.hf_checkpoint import save_checkpoint
from raylm.models.transformer import Transformer
from raylm.pipelines import serve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

CORPUS = ["What does json.dumps do? Serialize obj to a JSON formatted str.",
          "You are a helpful assistant. Answer briefly and exactly.",
          "Return the sum of the numbers; hello world, how are you today?"] * 20
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What does json.dumps do?"}]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny raylm checkpoint (raylm's tokenizer and chat template), a LoRA adapter of it in PEFT's
    format, and the two models in memory (the adapter's merged) as the reference."""
    from raylm.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("serve")
    tokenizer = root / "tokenizer.json"
    train_tokenizer(CORPUS, 400, tokenizer)
    model = Transformer(preset("debug", vocab_size=400, max_seq_len=128, initializer_range=0.3))
    model.init_weights(seed=0)
    folder = save_checkpoint(model.eval(), root / "hf", tokenizer_file=tokenizer)
    apply_lora(model, LoRASettings(rank=4, alpha=8), seed=1)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained adapter's B is not zero: make this one change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=generator)
    adapter = save_adapter(model, root / "adapter", base=str(folder))
    merged = merge_lora(model).eval()
    base = Transformer(preset("debug", vocab_size=400, max_seq_len=128, initializer_range=0.3))
    base.init_weights(seed=0)
    return {"folder": folder, "adapter": adapter, "base": base.eval(), "tuned": merged, "root": root}


@pytest.fixture(scope="module")
def endpoint(checkpoints):
    config = serve.Config(checkpoint=str(checkpoints["folder"]), port=0, model_name="tiny",
                          lora={"tuned": str(checkpoints["adapter"])}, max_model_len=128,
                          output_dir=str(checkpoints["root"] / "out"))
    serve.check(config, "test")
    for attempt in range(3):  # a loaded machine can miss Ray's 30 s raylet start deadline: not what is tested
        try:
            ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
            break
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
    server, url, models, startup = serve.start_server(config)
    print(f"vLLM's OpenAI server up in {startup:.1f} s at {url}")
    from openai import OpenAI

    yield {"client": OpenAI(base_url=url, api_key="unused", timeout=300), "url": url, "models": models,
           "server": server}
    serve.stop_server(server)
    ray.shutdown()


def greedy(model: Transformer, prompt: list[int], stops: list[int]) -> list[int]:
    """raylm's greedy continuation, ended (inclusive) at the first of the server's stop ids."""
    out = generate(model, [prompt], SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0))[0]
    end = next((i for i, t in enumerate(out) if t in stops), None)
    return out if end is None else out[: end + 1]


def test_models_lists_the_base_and_the_adapter_by_name(endpoint):
    assert endpoint["url"].startswith("http://127.0.0.1:")
    listed = [m.id for m in endpoint["client"].models.list().data]
    assert listed == endpoint["models"] == ["tiny", "tuned"]


def test_chat_prompt_is_the_checkpoints_template_and_greedy_equals_raylm(endpoint, checkpoints):
    template = ChatTemplate(checkpoints["folder"])
    expected_prompt = template.prompt(CHAT)
    for name, model in (("tiny", checkpoints["base"]), ("tuned", checkpoints["tuned"])):
        reply = endpoint["client"].chat.completions.create(
            model=name, messages=CHAT, max_tokens=NEW_TOKENS, temperature=0.0, extra_body={"return_token_ids": True})
        assert reply.prompt_token_ids == expected_prompt, name
        tokens = reply.choices[0].token_ids
        assert tokens == greedy(model, expected_prompt, template.stop_ids), name
        assert reply.choices[0].message.content == template.answer_text(tokens), name


def test_completion_greedy_equals_raylm_for_base_and_adapter(endpoint, checkpoints):
    template = ChatTemplate(checkpoints["folder"])
    prompt = template.encode_text("Return the sum of the numbers")
    answers = {}
    for name, model in (("tiny", checkpoints["base"]), ("tuned", checkpoints["tuned"])):
        reply = endpoint["client"].completions.create(model=name, prompt=prompt, max_tokens=NEW_TOKENS,
                                                      temperature=0.0, extra_body={"return_token_ids": True})
        answers[name] = reply.choices[0].token_ids
        assert answers[name] == greedy(model, prompt, template.stop_ids), name
    assert answers["tiny"] != answers["tuned"], "the adapter changed nothing: the test would not see it ignored"


def test_bad_inputs_are_refused_naming_the_key(tmp_path, checkpoints):
    with pytest.raises(ConfigError, match="checkpoint: required"):
        serve.check(serve.Config(), "serve.yaml")
    with pytest.raises(ConfigError, match="has no config.json"):
        serve.check(serve.Config(checkpoint=str(tmp_path)), "serve.yaml")
    with pytest.raises(ConfigError, match="lora.x: .* no adapter_config.json"):
        serve.check(serve.Config(checkpoint=str(checkpoints["folder"]), lora={"x": str(tmp_path)}), "serve.yaml")
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    with pytest.raises(ConfigError, match="lora.x: .*'PROMPT_TUNING' adapter"):
        serve.check(serve.Config(checkpoint=str(checkpoints["folder"]), lora={"x": str(tmp_path)}), "serve.yaml")
