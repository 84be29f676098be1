"""Every task of `raylm eval` on one checkpoint: log-likelihood requests scored on the scorer actors,
generative tasks on generation engines, each task's metrics."""

from __future__ import annotations

import time

from raylm.eval.engines import generate_texts, score_rows, start_scorers
from raylm.eval.fairness import fairness_task_metrics
from raylm.eval.metrics import generation_metrics, multiple_choice_metrics, perplexity_metrics, word_count
from raylm.eval.requests import Encoder, loglikelihood_rows
from raylm.eval.tasks import result_key


def evaluate_checkpoint(name: str, folder: str, tasks: list[tuple], scorer, generation, seed: int,
                        scorers: list | None = None, fairness: dict | None = None,
                        extra_rows: list[dict] | None = None) -> dict:
    """Every task (``(task reference, Task)`` pairs) on one checkpoint, with the scorer and generation
    sections ``scorer`` and ``generation``. ``scorers`` is a pool of scorer actors that the caller keeps across
    checkpoints (and kills at the end): started here when empty, else switched to this checkpoint, and
    emptied when generation follows, since the engines take the CPUs. Without a pool, the scorers live
    for this checkpoint only. ``fairness`` (``prepare_fairness``): the tasks it names get fairness
    metrics instead of accuracy. ``extra_rows`` (``{"tokens", "n_scored"}``, memorization's sequences) are
    scored in the same calls; each gets its ``logprob`` and ``is_greedy``."""
    import ray

    start = time.perf_counter()
    scoring = any(task.output_type != "generate_until" for _, task in tasks) or bool(extra_rows)
    generating = any(task.output_type == "generate_until" for _, task in tasks)
    pool = [] if scorers is None else scorers
    try:
        loading = []
        if scoring and pool:  # each actor loads before this checkpoint's calls: it runs one caller's calls in order
            loading = [actor.load.remote(str(folder)) for actor in pool]
        elif scoring:
            pool += start_scorers(folder, scorer)
        enc = Encoder(folder)
        max_length = min(scorer.max_length or enc.max_length, enc.max_length)
        rows, owner = [], []
        for t, (ref, task) in enumerate(tasks):
            if task.output_type != "generate_until":
                task_rows = loglikelihood_rows(task, ref.num_fewshot, enc, max_length, scorer.stride)
                rows += task_rows
                owner += [t] * len(task_rows)
        for row in extra_rows or ():
            rows.append({"doc": -1, "choice": -1, "tokens": row["tokens"], "n_scored": row["n_scored"]})
            owner.append(-1)
        ray.get(loading)  # a checkpoint that fails to load fails here, not scored with the last one's weights
        scores = score_rows(pool, rows, scorer) if rows else []
    finally:
        if scorers is None or generating:  # their CPUs go to the generation engines next
            for actor in pool:
                ray.kill(actor)
            pool.clear()
    if scoring:
        print(f"raylm eval: {name}: tokenised and scored {len(rows)} sequences in {time.perf_counter() - start:.1f}s",
              flush=True)
    extra_scores = [s for s, o in zip(scores, owner) if o == -1]
    for row, s in zip(extra_rows or (), extra_scores):
        row.update(s)
    results = {}
    for t, (ref, task) in enumerate(tasks):
        k = task.num_fewshot if ref.num_fewshot is None else ref.num_fewshot
        mine = [(row, s) for row, s, o in zip(rows, scores, owner) if o == t]
        if task.output_type == "multiple_choice":
            items = [{"logprobs": [], "choices": task.choices(doc), "gold": task.target(doc)} for doc in task.eval_docs]
            for row, s in mine:
                items[row["doc"]]["logprobs"].append(s["logprob"])
            if fairness is not None and result_key(ref, task) in fairness["keys"]:
                metrics = fairness_task_metrics(task, items, fairness, result_key(ref, task))
            else:
                metrics = multiple_choice_metrics(items)
        elif task.output_type == "loglikelihood_rolling":
            texts = [task.text(doc) for doc in task.eval_docs]
            metrics = perplexity_metrics(
                sum(s["logprob"] for _, s in mine), sum(row["n_scored"] for row, _ in mine),
                sum(word_count(t_) for t_ in texts), sum(len(t_.encode("utf-8")) for t_ in texts),
            )
        else:
            started = time.perf_counter()
            predictions = generate_texts(folder, task.contexts(ref.num_fewshot), task.max_gen_toks, task.until,
                                         generation, seed, chat=ref.chat)
            references = [task.target_text(doc) for doc in task.eval_docs]
            metrics = generation_metrics(predictions, references, **task.metric_kwargs.get("exact_match", {}))
            metrics["items_per_s"] = len(predictions) / (time.perf_counter() - started)
        metrics.update(n_items=len(task.eval_docs), num_fewshot=k)
        results[result_key(ref, task)] = metrics
    return results
