"""Builders for the RLHF tests: a tokenizer, a briefly fine-tuned policy and a reward model on the
built-in ground-truth task (the right docstring line for a standard-library function).

The policy is fine-tuned only part of the way, so its samples are right in places and wrong in
others. The reward model learns the ground truth's preferences among that policy's own samples:
for every prompt, a few samples and the reference answer, ranked by word-overlap F1 with the
reference, every pair with a clear gap a Bradley-Terry example. It is quick and imperfect, as a
reward model is; the tests then check that PPO raises the ground truth, not only the reward."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raylm.models.config import preset
from raylm.models.generate import SamplingParams, generate
from raylm.models.hf_checkpoint import save_checkpoint
from raylm.models.transformer import Transformer, TransformerWithScalarHead, causal_lm_loss
from raylm.data.stdlib_task import reference_score, stdlib_prompts
from raylm.data.sft import ChatTemplate, labels_of
from raylm.data.tokenizer import EOS_ID, train_tokenizer

VOCAB = 512
MAX_PROMPT_TOKENS = 64
MAX_SEQ_LEN = 160


def single_thread(fn):
    def wrapped(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # on the shared 2-core machine, more threads only spin against each other
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapped


def task_items(limit: int) -> list[dict]:
    return stdlib_prompts("train", limit=limit)


def build_tokenizer(items: list[dict], path: Path) -> Path:
    train_tokenizer((x["prompt"] + "\n" + x["reference"] for x in items * 3), VOCAB, path)
    return path


def prompt_ids(template: ChatTemplate, prompt: str) -> list[int]:
    return template.prompt([{"role": "user", "content": prompt}])


def short_items(items: list[dict], template: ChatTemplate) -> list[dict]:
    return [x for x in items if len(prompt_ids(template, x["prompt"])) <= MAX_PROMPT_TOKENS]


def padded(rows: list[list[int]], fill: int = 0) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out


@single_thread
def build_policy(items: list[dict], template: ChatTemplate, steps: int, seed: int = 0) -> Transformer:
    """SFT on (prompt, reference) in the chat format, loss on the answers, for ``steps`` steps."""
    encoded = []
    for x in items:
        ids, target = template.encode([{"role": "user", "content": x["prompt"]},
                                       {"role": "assistant", "content": x["reference"]}])
        encoded.append((ids, labels_of(ids, target)))
    model = Transformer(preset("debug", vocab_size=VOCAB, max_seq_len=MAX_SEQ_LEN))
    model.init_weights(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(encoded), (16,), generator=g).tolist()
        tokens = padded([encoded[i][0] for i in rows])
        labels = padded([encoded[i][1] for i in rows], fill=-100)
        loss = causal_lm_loss(model, tokens, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def answer_text(template: ChatTemplate, response: list[int]) -> str:
    return template.tokenizer.decode([t for t in response if t != template.end_id])


@single_thread
def sample_answers(model: Transformer, template: ChatTemplate, items: list[dict], n: int, seed: int,
                   max_new_tokens: int = 32) -> list[list[list[int]]]:
    """``n`` temperature-1 answers per prompt, each cut after its ``<|end|>``."""
    prompts = [prompt_ids(template, x["prompt"]) for x in items for _ in range(n)]
    outs = generate(model, prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0),
                    torch.Generator().manual_seed(seed))
    outs = [o[:o.index(template.end_id) + 1] if template.end_id in o else o for o in outs]
    return [outs[i * n:(i + 1) * n] for i in range(len(items))]


def reward_sequence(template: ChatTemplate, prompt: str, response: list[int]) -> list[int]:
    """As pipelines/rlhf.py's Task.reward_sequence: ... response <|end|> <|eos|>."""
    closed = response if response and response[-1] == template.end_id else response + [template.end_id]
    return prompt_ids(template, prompt) + closed + [EOS_ID]


@single_thread
def build_reward_model(policy: Transformer, template: ChatTemplate, items: list[dict], steps: int,
                       samples: int = 6, seed: int = 0, objective: str = "regression",
                       backbone: Transformer | None = None) -> tuple[TransformerWithScalarHead, dict]:
    """A reward model on the policy's own answers (plus the reference), scored by the ground truth:
    Bradley-Terry on pairs of answers to one prompt, or regression onto the ground truth."""
    answers = sample_answers(policy, template, items, samples, seed)
    examples, groups = [], []  # (sequence, ground truth); the example indices of each prompt
    for x, outs in zip(items, answers):
        reference = template.encode_text(x["reference"]) + [template.end_id]
        candidates = {tuple(o) for o in outs} | {tuple(reference)}
        groups.append(list(range(len(examples), len(examples) + len(candidates))))
        examples += [(reward_sequence(template, x["prompt"], list(c)),
                      reference_score(answer_text(template, list(c)), x["reference"])) for c in candidates]
    pairs = [(i, j) for g in groups for i in g for j in g if examples[i][1] >= examples[j][1] + 0.1]
    model = TransformerWithScalarHead(policy.config)
    backbone = backbone or policy
    model.model.load_state_dict({k: v for k, v in backbone.state_dict().items() if not k.startswith("output.")})
    torch.nn.init.zeros_(model.score.weight)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        if objective == "pairwise":  # Bradley-Terry on pairs of answers to one prompt
            rows = [pairs[i] for i in torch.randint(0, len(pairs), (16,), generator=g).tolist()]
            seqs = [examples[i][0] for i, _ in rows] + [examples[j][0] for _, j in rows]
        else:  # regression onto the ground truth, so that scores compare across prompts too
            rows = torch.randint(0, len(examples), (32,), generator=g).tolist()
            seqs = [examples[i][0] for i in rows]
        scores = model.sequence_scores(padded(seqs), padded([[1] * len(s) for s in seqs]))
        if objective == "pairwise":
            loss = -F.logsigmoid(scores[:16] - scores[16:]).mean()
        else:
            target = torch.tensor([examples[i][1] for i in rows]) * 4 - 2
            loss = F.mse_loss(scores, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    # How well it ranks fresh answers of the policy, pair by pair, against the ground truth.
    fresh = sample_answers(policy, template, items, 4, seed + 1)
    agree = total = 0
    with torch.no_grad():
        for x, outs in zip(items, fresh):
            truth = [reference_score(answer_text(template, o), x["reference"]) for o in outs]
            seqs = [reward_sequence(template, x["prompt"], o) for o in outs]
            scores = model.sequence_scores(padded(seqs), padded([[1] * len(s) for s in seqs])).tolist()
            for i in range(len(outs)):
                for j in range(i + 1, len(outs)):
                    if abs(truth[i] - truth[j]) >= 0.1:
                        total += 1
                        agree += (scores[i] > scores[j]) == (truth[i] > truth[j])
    stats = {"examples": len(examples), "fresh_pairs": total, "pairwise_accuracy": agree / max(total, 1),
             "policy_f1": float(np.mean([reference_score(answer_text(template, o), x["reference"])
                                          for x, outs in zip(items, fresh) for o in outs]))}
    return model, stats


def cached_folder(name: str) -> Path | None:
    """With RAYLM_TEST_CACHE set, a folder there that keeps the built models between runs (the build
    is seeded, so a rerun would rebuild the same ones)."""
    root = os.environ.get("RAYLM_TEST_CACHE")
    return Path(root) / name if root else None


def build_all(folder: Path, limit: int = 20, sft_steps: int = 40, reward_steps: int = 300, samples: int = 24) -> dict:
    done = folder / "built.json"
    key = {"limit": limit, "sft_steps": sft_steps, "reward_steps": reward_steps, "samples": samples}
    if done.exists() and json.loads(done.read_text())["key"] == key:
        stats = json.loads(done.read_text())["reward_stats"]
        return {"tokenizer": folder / "tokenizer.json", "sft": folder / "sft", "reward": folder / "reward",
                "reward_stats": stats}
    folder.mkdir(parents=True, exist_ok=True)
    items = task_items(limit)
    tokenizer = build_tokenizer(items, folder / "tokenizer.json")
    template = ChatTemplate(tokenizer)
    items = short_items(items, template)
    policy = build_policy(items, template, sft_steps)
    reward, stats = build_reward_model(policy, template, items, reward_steps, samples)
    save_checkpoint(policy, folder / "sft", tokenizer_file=tokenizer)
    save_checkpoint(reward, folder / "reward", tokenizer_file=tokenizer)
    done.write_text(json.dumps({"key": key, "reward_stats": stats}))
    return {"tokenizer": tokenizer, "sft": folder / "sft", "reward": folder / "reward", "items": items,
            "policy": policy, "reward_stats": stats}
