"""The actors `raylm eval` runs models on: a pool of log-likelihood scorer actors (kept across
checkpoints), pools of generation engines (vLLM or raylm's own generator) for continuations, and a
reward model's scores through Ray Data."""

from __future__ import annotations

import functools

from raylm.config import ConfigError
from raylm.eval.requests import Encoder


def start_scorers(folder: str, cfg) -> list:
    """The log-likelihood actors. Each loads the model as soon as it starts, so the driver can
    tokenise while they do: on a small machine starting Python, torch and the model is a good part of
    a whole evaluation."""
    actor = scorer_actor_class().options(num_cpus=cfg.cpus_per_actor)
    threads = max(1, int(cfg.cpus_per_actor))
    return [actor.remote(str(folder), dtype=cfg.dtype, max_batch=cfg.max_batch, num_threads=threads)
            for _ in range(cfg.num_actors)]


@functools.cache
def scorer_actor_class():
    """One Ray actor class per process: Ray pickles a class (by value, scanning every loaded module)
    and ships it to the cluster the first time it starts an actor of it, 0.2-0.4 s in a driver that
    has transformers imported, and then only once per job for every checkpoint that is scored."""
    import ray

    from raylm.actors.loglikelihood_scorer import LoglikelihoodScorer

    return ray.remote(LoglikelihoodScorer)


def scoring_calls(rows: list[dict], rows_per_call: int) -> list[list[int]]:
    """Row indices in calls of about ``rows_per_call`` rows. Rows with the same context (one question's
    answers) stay in one call: the actor computes their context once, then the answers as a trie. The
    questions go largest first by what the actor will compute for them (the context plus its answers'
    tokens, an upper bound on the trie), so the trees of one call, and of one forward pass, are of
    about one size and their rows need little padding."""
    contexts = [tuple(r["tokens"][: len(r["tokens"]) - r["n_scored"]]) for r in rows]
    tree_size: dict[tuple, int] = {}
    for context, row in zip(contexts, rows):
        tree_size[context] = tree_size.get(context, len(context)) + row["n_scored"] - 1
    order = sorted(range(len(rows)), key=lambda i: (-tree_size[contexts[i]], contexts[i]))
    calls, current = [], []
    for i in order:
        if len(current) >= rows_per_call and contexts[i] != contexts[current[-1]]:
            calls.append(current)
            current = []
        current.append(i)
    return calls + [current] if current else calls


def score_rows(scorers: list, rows: list[dict], cfg) -> list[dict]:
    """Log-likelihood of every row, the calls handed to whichever actor is free."""
    from ray.util import ActorPool

    def call(actor, indices):
        batch = {"id": indices, "tokens": [rows[i]["tokens"] for i in indices],
                 "n_scored": [rows[i]["n_scored"] for i in indices]}
        return actor.__call__.remote(batch)

    out = [None] * len(rows)
    for scored in ActorPool(scorers).map_unordered(call, scoring_calls(rows, cfg.rows_per_batch)):
        for i, logprob, greedy in zip(scored["id"], scored["logprob"], scored["is_greedy"]):
            out[int(i)] = {"logprob": float(logprob), "is_greedy": bool(greedy)}
    return out


def generate_texts(folder: str, prompts: list[str], max_new_tokens: int, until: list[str], cfg,
                   seed: int, temperature: float = 0.0, chat: bool = False) -> list[str]:
    """Continuations from a pool of generation engines, cut at the first ``until`` string. ``chat``:
    each prompt is a user message in the checkpoint's chat template, answered up to its end-of-turn."""
    import ray
    from ray.util import ActorPool

    from raylm.actors.generation_engine import make_generation_engine

    enc = Encoder(folder)
    budget = cfg.max_model_len - max_new_tokens
    stop_ids = None
    if chat:
        from raylm.data.chat_template import ChatTemplate

        template = ChatTemplate(folder)
        ids = [template.prompt([{"role": "user", "content": p}]) for p in prompts]
        if max(map(len, ids)) > budget:
            raise ConfigError(f"preference: a chat prompt of {max(map(len, ids))} tokens leaves no room for "
                              f"{max_new_tokens} new tokens in generation.max_model_len {cfg.max_model_len}")
        stop_ids = template.stop_ids
    else:
        ids = [enc.encode(p)[-budget:] or [enc.prefix_token_id] for p in prompts]  # keep the prompt's end
    engines = [
        make_generation_engine(folder, backend=cfg.backend, num_cpus=cfg.cpus_per_engine, dtype="float32",
                               max_model_len=cfg.max_model_len, seed=seed)
        for _ in range(cfg.num_engines)
    ]
    try:
        ray.get([e.ready.remote() for e in engines], timeout=900)
        chunks = [ids[i : i + cfg.prompts_per_call] for i in range(0, len(ids), cfg.prompts_per_call)]
        pool = ActorPool(engines)
        results = [r for chunk in pool.map(
            lambda e, chunk: e.generate.remote(chunk, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                               stop_token_ids=stop_ids),
            chunks) for r in chunk]
    finally:
        for e in engines:
            ray.kill(e)
    texts = []
    for r in results:
        text = template.answer_text(r["tokens"]) if chat else enc.decode(r["tokens"])
        for stop in until:
            if stop and stop in text:
                text = text[: text.index(stop)]
        texts.append(text)
    return texts


def reward_scores(reward_model: str, chat: bool, prompts: list[str], answers_a: list[str], answers_b: list[str],
                  scorer) -> tuple[list[float], list[float]]:
    """A reward model's score of every (prompt, answer) of A and of B, on ``scorer`` (the scorer section's
    ``rows_per_batch`` and ``cpus_per_actor``)."""
    import ray

    from raylm.actors.reward_scorer import RewardRowScorer
    from raylm.data.chat_template import ChatTemplate

    judge = Encoder(reward_model)
    template = ChatTemplate(reward_model) if chat else None
    answers = list(answers_a) + list(answers_b)
    items = [{"id": i, "tokens": judge_tokens(judge, template, prompts[i % len(prompts)], answer)}
             for i, answer in enumerate(answers)]
    scored = ray.data.from_items(items).map_batches(
        RewardRowScorer, fn_constructor_kwargs={"checkpoint_dir": reward_model}, batch_size=scorer.rows_per_batch,
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=scorer.cpus_per_actor,
    ).take_all()
    score = {int(r["id"]): float(r["score"]) for r in scored}
    n = len(prompts)
    return [score[i] for i in range(n)], [score[n + i] for i in range(n)]


def judge_tokens(judge: Encoder, chat, prompt: str, answer: str) -> list[int]:
    """What the reward model scores: with its ``chat`` template, [user: prompt, assistant: answer]
    encoded as reward training encodes a pair; without, the text, its end kept."""
    from raylm.data.preferences import encode_response

    if chat is None:
        return judge.encode(prompt + answer)[-judge.max_length:]
    return encode_response(chat, prompt, answer, judge.max_length)[0]
