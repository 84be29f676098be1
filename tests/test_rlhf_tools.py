"""Multi-turn tool rollouts (``rollout.tools: tool_use``): a hand-built two-turn episode's tokens and
mask against the chat template's own encoding, then episodes on a real vLLM engine (the appended
tool tokens, the mask the trainer gets, the trainer's log-probs of the model tokens against the
engine's) and two GRPO steps on the tool_use transcript reward.

The policy is a tiny model fine-tuned briefly to open with a ``<tool_call>`` (tests/rlhf_fixtures.py
builders), so that its episodes call tools."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch

from raylm.data.chat_template import ChatTemplate
from raylm.models.hf_checkpoint import save_checkpoint
from raylm.pipelines import rlhf
from raylm.rl.batching import make_batch, pad_rows, trim
from raylm.rl.prompts import rollout_seeds
from raylm.rl.rollouts import collect_rollouts
from raylm.rl.tool_rollouts import Episode, tool_turn_ids
from raylm.tasks import tool_use
from raylm.tasks.files import rl_record
from raylm.tracking import start_run

from rlhf_fixtures import build_policy, build_tokenizer, cached_folder

MAX_NEW_TOKENS = 96


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    folder = cached_folder("rlhf-tools") or tmp_path_factory.mktemp("rlhf-tools")
    if not (folder / "policy" / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        problems = tool_use.problems("train", 64, seed=0)
        first_calls = [{"prompt": p.prompt, "reference": next(m["content"] for m in p.messages
                                                             if m["role"] == "assistant")} for p in problems]
        tokenizer = build_tokenizer(first_calls + [{"prompt": "<tool_result>12</tool_result>", "reference": "Answer: 7"}],
                                    folder / "tokenizer.json")
        policy = build_policy(first_calls, ChatTemplate(tokenizer), steps=150)
        save_checkpoint(policy, folder / "policy", tokenizer_file=tokenizer)
        for split, n in (("train", 8), ("heldout", 2)):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(rl_record(p, tool_use.REWARD)) + "\n"
                                                           for p in tool_use.problems(split, n, seed=1)))
    return folder


def test_two_turn_episode_tokens_and_mask_are_the_templates(built):
    """Model tokens as a model generates them (content, end-of-turn), the tool turn appended as
    ``tool_turn_ids``: the whole sequence is the template's encoding of the conversation, and the
    mask is exactly the template's assistant-token mask over the response."""
    template = ChatTemplate(built / "policy")
    problem = tool_use.problems("train", 1, seed=3)[0]
    user = {"role": "user", "content": problem.prompt}
    call = next(m["content"] for m in problem.messages if m["role"] == "assistant")
    result = tool_use.result_message(tool_use.run_tool_calls(call)[0].result, "call_1", "price")
    answer = "Answer: 12"
    prompt = template.prompt([user])

    episode = Episode([user])
    first = template.encode_text(call) + [template.end_id]
    episode.add_model_turn(first, [-0.5] * len(first), version=0)
    appended = tool_turn_ids(template, [user], call, [result])
    episode.add_tool_turn(appended)
    # The appended tokens are the template's own tokens of the tool turn and the next generation prompt.
    conversation = tool_use.to_basic_roles([user, {"role": "assistant", "content": call}, result])
    assert prompt + episode.tokens == template.prompt(conversation)
    second = template.encode_text(answer) + [template.end_id]
    episode.add_model_turn(second, [-0.5] * len(second), version=1)
    ids, target = template.encode(conversation + [{"role": "assistant", "content": answer}])
    assert ids == template.close(prompt, episode.tokens)
    assert episode.mask == [int(t) for t in target[len(prompt):len(prompt) + len(episode.tokens)]]
    assert 0 < episode.mask.count(0) == len(appended) and episode.turns == 2 and episode.version == 0

    # What the trainer gets: the mask with its hole, and trim keeps the response up to the last model token.
    batch = make_batch([prompt, prompt[:-3]], [episode.tokens, [5, 6]], [episode.mask, [1, 1]])
    assert batch["response_mask"][0].tolist() == episode.mask and batch["response_mask"][1, :3].tolist() == [1, 1, 0]
    kept = trim(batch, torch.tensor([0, 1]))
    assert kept["response_mask"].shape[1] == len(episode.tokens) and kept["tokens"].shape[1] == len(ids) - len(
        template.turn_suffix)


def config_for(built: Path, out: Path, **overrides) -> rlhf.Config:
    base = {
        "output_dir": str(out), "seed": 0, "ray": {"num_cpus": 6},
        "tracking": {"uri": f"sqlite:///{out}/mlflow.db"},
        "policy": {"checkpoint": str(built / "policy"), "num_workers": 1, "lr": 5e-5},
        "reward": {"checkpoint": None, "rule": "tool_use", "normalize": False},
        "rollout": {"backend": "vllm", "max_new_tokens": MAX_NEW_TOKENS, "gpu_memory_utilization": 0.05,
                    "tools": "tool_use", "max_turns": 3},
        "data": {"prompts": str(built / "train.jsonl"), "held_out": str(built / "heldout.jsonl"),
                 "max_prompt_tokens": 48},
        "ppo": {"steps": 2, "prompts_per_step": 2, "samples_per_prompt": 4, "advantage": "grpo", "epochs": 1,
                "minibatches": 1},
        "kl": {"estimator": "k1", "mode": "reward", "coef": 0.05},
        "eval": {"prompts": 2, "samples_per_prompt": 2}, "checkpoint": {"every": 0},
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value}
    return rlhf.Config.model_validate(base)


def test_config_refuses_tools_with_gae_or_without_a_rule(built, tmp_path):
    with pytest.raises(ValueError, match="rollout.tools: GAE"):
        config_for(built, tmp_path, ppo={"advantage": "gae"})
    with pytest.raises(ValueError, match="set reward.rule"):
        config_for(built, tmp_path, reward={"rule": None, "checkpoint": str(built / "policy")})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tool_episodes_on_vllm_and_two_grpo_steps(built, tmp_path, capsys):
    config = config_for(built, tmp_path)
    rlhf.check(config, "test")
    ray.init(num_cpus=6, include_dashboard=False)
    try:
        task = rlhf.Task(config)
        pools = rlhf.Pools.start(config)
        try:
            pools.setup_trainers(config)
            pools.publish(0)
            owners = [item for item in task.train[:3] for _ in range(4)]
            prompts = [o["ids"] for o in owners]
            seeds = rollout_seeds(0, 1, len(prompts))
            got = collect_rollouts(config, pools, task, owners, prompts,
                                   pools.submit_rollouts(prompts, task.stop_ids, 1.0, seeds), seeds, 1.0)
            episodes_checked(task.template, owners, got)
            assert sum(got.tool_calls) > 0 and max(got.turns) >= 2

            # What the trainer receives: its log-probs exist on the model tokens only, and there agree
            # with the engine's, so the sequence it scores is the one the engine generated from.
            batch = make_batch(prompts, got.responses, got.masks)
            mask = batch["response_mask"]
            assert int(mask.sum()) == sum(sum(m) for m in got.masks) < sum(len(r) for r in got.responses)
            trainer = pools.policy.logprobs(batch, 1.0).result()
            engine = pad_rows(got.engine_logprobs, mask.shape[1])
            assert torch.all(trainer[mask == 0] == 0) and torch.all(trainer[mask == 1] < 0)
            assert (trainer - engine)[mask == 1].abs().max().item() < 1e-3

            run = start_run(config.tracking.uri, "raylm", "rlhf-tools", config.output_dir)
            summary = rlhf.train(config, run, pools, task)
        finally:
            pools.shutdown()
    finally:
        ray.shutdown()
    history = summary["history"]
    assert len(history) == 2
    for row in history:
        assert row["tools/turns_mean"] >= 1 and row["tools/model_tokens"] > 0
    assert sum(row["tools/calls"] for row in history) > 0 and sum(row["tools/tool_tokens"] for row in history) > 0
    printed = capsys.readouterr().out
    assert "[rlhf] step 2/2" in printed and "turns " in printed and "tool_calls " in printed


def episodes_checked(template, owners, got) -> None:
    """Each episode against its transcript: the tokens the mask leaves out are exactly the template's
    tool turns, rendered from the transcript; turns and calls are the transcript's."""
    for owner, prompt, tokens, mask, logprobs, turns, calls in zip(owners, got.prompts, got.responses, got.masks,
                                                                     got.engine_logprobs, got.turns, got.tool_calls):
        assert len(tokens) == len(mask) == len(logprobs) and len(tokens) <= MAX_NEW_TOKENS
        assert mask[0] == 1 and mask[-1] == 1  # an episode starts and ends with model tokens
        expected_tool_tokens = []
        transcript = got_transcript(owner, tokens, mask, template)
        i = 1
        while i < len(transcript):
            assert transcript[i]["role"] == "assistant"
            results = []
            j = i + 1
            while j < len(transcript) and transcript[j]["role"] == "tool":
                results.append(transcript[j])
                j += 1
            if results:
                expected_tool_tokens += tool_turn_ids(template, transcript[:i], transcript[i]["content"], results)
            i = j
        assert [t for t, m in zip(tokens, mask) if m == 0] == expected_tool_tokens
        assert turns == sum(m["role"] == "assistant" for m in transcript)
        assert calls >= sum(m["role"] == "tool" for m in transcript)


def got_transcript(owner, tokens, mask, template) -> list[dict]:
    """The episode's messages from its tokens: the model's turns (decoded, read only) and the tool
    results the tools give for their calls."""
    messages = [{"role": "user", "content": owner["prompt"]}]
    k, calls = 0, 0
    while k < len(tokens):
        end = k
        while end < len(tokens) and mask[end] == 1:
            end += 1
        text = template.answer_text(tokens[k:end])
        messages.append({"role": "assistant", "content": text})
        k = end
        if k < len(tokens):  # a tool turn follows
            for call in tool_use.run_tool_calls(text):
                calls += 1
                messages.append(tool_use.result_message(call.result, f"call_{calls}", call.name))
            while k < len(tokens) and mask[k] == 0:
                k += 1
    return messages
