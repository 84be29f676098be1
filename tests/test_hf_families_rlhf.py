"""`raylm rlhf` on a brought-in Hugging Face family, end to end: a random-init Qwen2 checkpoint that
transformers wrote (q/k/v biases, yarn rope scaling), beside a ChatML tokenizer with its own chat
template and end-of-turn token, trained by three critic-free GRPO steps on a rule reward with vLLM
rollouts. The engine's log-probs agree with the trainer's, each step's weights reach the engine in
the family's own names, and the export is a Qwen2 checkpoint again (rope scaling, biases, tokenizer
and chat template kept) that transformers computes as raylm does."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from raylm.data.chat_template import ChatTemplate
from raylm.models.hf_checkpoint import load_checkpoint, read_safetensors

from test_chat_template import CHATML_STYLE, build_folder
from test_hf_families import COMMON, write_hf_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Qwen2.5-Instruct's shape of special tokens: <|im_end|> ends a turn and is the tokenizer's EOS; the
# config's end ids are it and <|endoftext|>, which also pads. vLLM's CPU attention takes head sizes 32, 64, 80, ...: hidden 128 over 4 heads.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2 = dict(hidden_size=128, vocab_size=512, initializer_range=0.3, bos_token_id=0, eos_token_id=[2, 0], pad_token_id=0,
             tie_word_embeddings=True,
             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "original_max_position_embeddings": 64})
PROMPTS = ["What does json.dumps do?", "Say hello world.", "Return the sum of the numbers.",
           "How are you today?", "Answer briefly and exactly.", "What is a JSON formatted str?"]
REWARD = "def reward(prompt, completion):\n    return len(set(completion.split())) / 4\n"


def test_grpo_with_vllm_rollouts_on_a_brought_in_qwen2_keeps_its_family(tmp_path, capsys):
    from raylm import cli

    start = tmp_path / "qwen2"
    build_folder(start, SPECIALS, None, "<|im_end|>", "<|endoftext|>", CHATML_STYLE)
    write_hf_checkpoint(start, "Qwen2Config", {**COMMON, **QWEN2})
    template = ChatTemplate(start)
    assert template.end_id == 2 and template.hf.vocab_size <= QWEN2["vocab_size"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (tmp_path / "reward.py").write_text(REWARD)
    out = tmp_path / "out"
    config = {
        "output_dir": str(out), "seed": 0, "ray": {"num_cpus": 6},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "policy": {"checkpoint": str(start), "num_workers": 1, "lr": 1e-3},
        "reward": {"checkpoint": None, "rule": f"{tmp_path / 'reward.py'}:reward"},
        "rollout": {"backend": "vllm", "max_new_tokens": 12, "temperature": 1.0, "gpu_memory_utilization": 0.05},
        "data": {"builtin": None, "prompts": str(tmp_path / "prompts.jsonl"), "max_prompt_tokens": 64},
        "ppo": {"steps": 3, "prompts_per_step": 2, "samples_per_prompt": 4, "advantage": "grpo", "epochs": 1,
                "minibatches": 1},
        "kl": {"coef": 0.0}, "eval": {"prompts": 0}, "checkpoint": {"every": 0},
    }
    path = tmp_path / "rlhf.json"
    path.write_text(json.dumps(config))
    import ray

    try:
        assert cli.main(["rlhf", str(path)]) == 0
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    assert "rollout backend: vllm" in printed
    summary = json.loads(printed[printed.index('{\n  "command"'):])
    print({k: summary[k] for k in ("policy_version", "logprob_diff_vs_trainer", "weight_sync_s", "history")})
    # Every step's rollouts came from the weights the trainer published before it (ppo_step checks
    # the engine's version), and the engine computed their log-probs as the trainer does.
    assert summary["steps"] == 3 and summary["policy_version"] == 3
    assert summary["logprob_diff_vs_trainer"] < 1e-3
    from mlflow.tracking import MlflowClient

    client = MlflowClient(config["tracking"]["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])

    def history(key):
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    # Step k sampled with the weights published after step k - 1 (the trainer's version k - 1), and
    # the engine's log-probs of them agree with the trainer's at every step, trained biases included.
    assert history("rollout/policy_version") == [0, 1, 2] and history("policy_version") == [1, 2, 3]
    assert max(history("rollout/logprob_diff_vs_trainer")) < 1e-3
    assert min(history("weight_sync/bytes")) > 0
    assert history("reward/rule_failures") == [0, 0, 0]  # every completion decoded and scored

    export = out / "hf"
    written, source = (json.loads((f / "config.json").read_text()) for f in (export, start))
    assert written["model_type"] == "qwen2" and written["architectures"] == ["Qwen2ForCausalLM"]
    rope = lambda c: c.get("rope_parameters") or c.get("rope_scaling")  # noqa: E731
    # the same yarn parameters, with the defaults transformers applies to those the source left out
    assert rope(written) == {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True, **rope(source)}
    assert written["eos_token_id"] == [2, 0] and written["tie_word_embeddings"] is True
    tuned, before = read_safetensors(export), read_safetensors(start)
    bias = "model.layers.1.self_attn.q_proj.bias"
    assert tuned[bias].abs().sum() > 0 and not torch.equal(tuned[bias], before[bias])  # kept, and trained
    theirs = transformers.AutoTokenizer.from_pretrained(str(export), local_files_only=True)
    assert theirs.chat_template == CHATML_STYLE and theirs.eos_token == "<|im_end|>"
    conversation = [{"role": "user", "content": PROMPTS[0]}]
    assert ChatTemplate(export).prompt(conversation) == template.prompt(conversation)

    model = load_checkpoint(export).eval()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    tokens = torch.randint(3, QWEN2["vocab_size"], (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reloaded(tokens).logits
        assert (model(tokens) - expected).abs().max().item() < 1e-4 * max(expected.abs().max().item(), 1.0)
