"""How fast a few-million-parameter model learns a built-in verifiable task (raylm.tasks) on CPU:
supervised fine-tuning from scratch on the family's train split (answers only in the loss), then
held-out accuracy by the family's own checker, greedy decoding (for tool_use: whole episodes,
several turns against the real tools, scored by check_transcript).

    .venv/bin/python benchmarks/task_learnability.py --family tool_use --minutes 4
    .venv/bin/python benchmarks/task_learnability.py --family arithmetic --preset tiny --minutes 10

Prints the model size, the loss as it trains, wall time and tokens/s, and the held-out score of
the model before and after (the problems are not in its training data: a different split).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from raylm.data.chat_template import ChatTemplate  # noqa: E402
from raylm.models.config import preset  # noqa: E402
from raylm.models.transformer import Transformer, causal_lm_loss  # noqa: E402
from raylm.data.sft import IGNORE_INDEX, labels_of, read_conversations  # noqa: E402
from raylm.tasks.files import FAMILIES, write_task_files  # noqa: E402
from raylm.tasks.tool_use import check_transcript, run_episode, to_basic_roles  # noqa: E402
from raylm.data.tokenizer import PAD_ID, train_tokenizer  # noqa: E402


@torch.no_grad()
def greedy(model: Transformer, template: ChatTemplate, messages: list[dict], max_new: int) -> str:
    ids = template.prompt(to_basic_roles(messages))
    out = []
    for _ in range(max_new):
        if len(ids) + len(out) >= model.config.max_seq_len:
            break
        logits = model(torch.tensor([ids + out]))[0, -1]
        token = int(logits.argmax())
        if token == template.end_id:
            break
        out.append(token)
    return template.tokenizer.decode(out)


def held_out_score(model, template, family: str, problems, max_new: int) -> float:
    module = FAMILIES[family]
    model.eval()
    scores = []
    for p in problems:
        if family == "tool_use":
            transcript = run_episode(p.prompt, lambda m: greedy(model, template, m, max_new), max_turns=6)
            scores.append(check_transcript(p, transcript).score)
        else:
            scores.append(module.score(p, greedy(model, template, [{"role": "user", "content": p.prompt}], max_new)))
    model.train()
    return sum(scores) / len(scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="tool_use")
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    module = FAMILIES[args.family]
    with tempfile.TemporaryDirectory() as tmp:
        written = write_task_files(args.family, tmp, args.n_train, args.n_eval, args.seed, parts=("sft",))
        conversations = read_conversations(written["sft_train"])
        tokenizer_file = Path(tmp) / "tokenizer.json"
        train_tokenizer((m["content"] for c in conversations for m in c), args.vocab, tokenizer_file)
        template = ChatTemplate(tokenizer_file)
    examples = []
    for conversation in conversations:
        ids, target = template.encode(conversation)
        examples.append((ids, labels_of(ids, target)))
    seq_len = max(len(ids) for ids, _ in examples)
    cfg = preset(args.preset, vocab_size=template.tokenizer.get_vocab_size(), max_seq_len=seq_len + 64)
    model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    heldout = module.problems("heldout", args.n_eval, args.seed)
    max_new = 96
    print(f"{args.family}: {len(examples)} train conversations, longest {seq_len} tokens; model {args.preset} "
          f"{model.num_params() / 1e6:.2f}M parameters; {args.threads} threads")
    before = held_out_score(model, template, args.family, heldout[:5], max_new)
    rng = random.Random(args.seed)
    start, step, tokens = time.perf_counter(), 0, 0
    deadline = start + args.minutes * 60
    while time.perf_counter() < deadline:
        batch = rng.sample(examples, args.batch_size)
        width = max(len(ids) for ids, _ in batch)
        x = torch.full((len(batch), width), PAD_ID)
        y = torch.full((len(batch), width), IGNORE_INDEX)
        for i, (ids, labels) in enumerate(batch):
            x[i, :len(ids)], y[i, :len(labels)] = torch.tensor(ids), torch.tensor(labels)
        lr = args.lr * min(1.0, (step + 1) / 50)  # warm-up, then constant
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = causal_lm_loss(model, x, y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens += int(x.numel())
        if step % 50 == 0:
            elapsed = time.perf_counter() - start
            print(f"step {step:5d}  loss {loss.item():.4f}  {elapsed:6.1f} s  {tokens / elapsed:,.0f} tokens/s", flush=True)
    train_s = time.perf_counter() - start
    after = held_out_score(model, template, args.family, heldout, max_new)
    print(f"trained {step} steps ({step * args.batch_size / len(examples):.1f} epochs) in {train_s:.0f} s; "
          f"held-out score {before:.2f} (before, 5 problems) -> {after:.2f} (after, {len(heldout)} problems)")


if __name__ == "__main__":
    main()
