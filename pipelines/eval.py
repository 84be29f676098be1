"""`raylm eval`: score Hugging Face checkpoints side by side on lm-evaluation-harness-style tasks.

For each checkpoint, every log-likelihood request of every task (multiple-choice answers, perplexity
windows) goes to a pool of scorer actors holding the model, started before the driver tokenises; generative
tasks go through a pool of generation engine actors (vLLM, or raylm's own generator). Prompts are
tokenised the way lm-evaluation-harness's Hugging Face backend does, so accuracies agree with
``lm_eval``. Results: MLflow metrics ``<checkpoint>/<task>/<metric>``, ``results.json`` and a
Markdown table with one column per checkpoint; optionally a reward-model win rate of one
checkpoint against another, and an n-gram decontamination report against the training shards.
"""

from __future__ import annotations

import functools
import glob
import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from raylm.config import ConfigError, Section, StageConfig
from raylm.eval.metrics import (
    contaminated,
    generation_metrics,
    multiple_choice_metrics,
    perplexity_metrics,
    rolling_windows,
    win_rate,
    word_count,
)
from raylm.eval.tasks import Task, load_task
from raylm.tracking import StageRun

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class TaskRef(Section):
    path: str  # an lm-evaluation-harness-style task YAML
    num_fewshot: int | None = Field(default=None, ge=0)  # None: the YAML's num_fewshot
    limit: int | None = Field(default=None, ge=1)  # evaluate only the first N documents
    # generate_until only: true: each context is a user message in the checkpoint's chat template,
    # answered up to its end-of-turn (an instruction-tuned model's format); false: plain text
    chat: bool = False


class ScorerConfig(Section):
    num_actors: int = Field(default=2, ge=1)
    cpus_per_actor: float = Field(default=1, gt=0)
    rows_per_batch: int = Field(default=64, ge=1)  # rows handed to one scorer actor call
    max_batch: int = Field(default=32, ge=1)  # sequences per forward pass inside an actor
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_length: int | None = Field(default=None, ge=2)  # None: the checkpoint's max_position_embeddings
    stride: int | None = Field(default=None, ge=1)  # perplexity windows; None: max_length (disjoint)


class GenerationConfig(Section):
    backend: Literal["auto", "vllm", "torch"] = "auto"
    num_engines: int = Field(default=1, ge=1)
    cpus_per_engine: float = Field(default=1, gt=0)
    max_model_len: int = Field(default=512, ge=16)
    prompts_per_call: int = Field(default=32, ge=1)


class PreferenceConfig(Section):
    model_a: str  # a checkpoint name from `checkpoints`, or a folder
    model_b: str
    reward_model: str  # a scalar-head (reward) checkpoint folder with its tokenizer
    prompts: str  # JSONL, one prompt per line in `prompt_field`
    prompt_field: str = "prompt"
    limit: int | None = Field(default=None, ge=1)
    max_new_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    confidence: float = Field(default=0.95, gt=0, lt=1)
    # true: each model answers the prompt as a user message in its own chat template, and the reward
    # model scores [user, assistant] in its template, as it was trained (raylm.data.chat_template); false:
    # the prompt is plain text, continued and scored as text; unset: chat when all three checkpoints
    # have a chat template, text when none has.
    chat: bool | None = None


class DecontaminationConfig(Section):
    train_files: list[str] = []  # globs of training text: .jsonl (text_field), .parquet (text_field) or .txt
    text_field: str = "text"
    # Token shard folders written by `raylm data` (index.json + .bin): items are tokenised with the
    # tokenizer.json beside them and matched on token n-grams, exactly what the model was trained on.
    shard_dirs: list[str] = []
    shard_split: str = "train"
    ngram: int = Field(default=13, ge=1)


class Config(StageConfig):
    checkpoints: dict[str, str] = {}  # display name -> Hugging Face folder, compared side by side
    tasks: list[TaskRef] = []
    scorer: ScorerConfig = ScorerConfig()
    generation: GenerationConfig = GenerationConfig()
    preference: PreferenceConfig | None = None
    decontamination: DecontaminationConfig | None = None


# ---- checks before any Ray work ---------------------------------------------------------------
def check_checkpoint(folder: str, key: str, config_path) -> None:
    path = Path(folder)
    if not (path / "config.json").exists():
        raise ConfigError(f"{config_path}: {key}: {folder} is not a Hugging Face checkpoint folder (no config.json)")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{config_path}: {key}: checkpoint {folder} has no tokenizer ({', '.join(TOKENIZER_FILES)} missing); "
            "raylm eval scores text, so export the checkpoint with its tokenizer (raylm export --set tokenizer=...)"
        )


def check(config: Config, config_path) -> None:
    if not config.checkpoints and config.preference is None:
        raise ConfigError(f"{config_path}: checkpoints: nothing to evaluate (no checkpoints and no preference section)")
    for name, folder in config.checkpoints.items():
        check_checkpoint(folder, f"checkpoints.{name}", config_path)
    if config.tasks and not config.checkpoints:
        raise ConfigError(f"{config_path}: tasks: tasks need at least one entry in checkpoints")
    for i, ref in enumerate(config.tasks):
        task = load_task(ref.path, ref.limit)  # raises TaskError (a ConfigError) naming file, line and field
        if task.output_type == "loglikelihood_rolling" and ref.num_fewshot:
            raise ConfigError(f"{config_path}: tasks.{i}.num_fewshot: perplexity tasks take no few-shot examples")
    if config.preference is not None:
        pref = config.preference
        for key in ("model_a", "model_b"):
            check_checkpoint(config.checkpoints.get(getattr(pref, key), getattr(pref, key)), f"preference.{key}", config_path)
        check_checkpoint(pref.reward_model, "preference.reward_model", config_path)
        if preference_chat(config, config_path):  # every template loads (or the run would fail after the tasks)
            from raylm.data.chat_template import ChatTemplate, ChatTemplateError

            for key, folder in preference_folders(config).items():
                try:
                    ChatTemplate(folder)
                except ChatTemplateError as e:
                    raise ConfigError(f"{config_path}: preference.{key}: {e} (or set preference.chat: false)") from None
        if not Path(pref.prompts).exists():
            raise ConfigError(f"{config_path}: preference.prompts: {pref.prompts} does not exist")
    if config.decontamination is not None:
        check_decontamination(config.decontamination, config_path)


def preference_folders(config: Config) -> dict[str, str]:
    pref = config.preference
    return {key: config.checkpoints.get(getattr(pref, key), getattr(pref, key)) for key in ("model_a", "model_b", "reward_model")}


def preference_chat(config: Config, config_path=None) -> bool:
    """``preference.chat``, or unset: whether all three checkpoints have a chat template (an error
    when only some have one)."""
    from raylm.data.chat_template import has_chat_template

    if config.preference.chat is not None:
        return config.preference.chat
    have = {key: has_chat_template(folder) for key, folder in preference_folders(config).items()}
    if all(have.values()) or not any(have.values()):
        return all(have.values())
    raise ConfigError(f"{config_path}: preference.chat: {', '.join(k for k, v in have.items() if v)} have a chat "
                      f"template and {', '.join(k for k, v in have.items() if not v)} not: set chat: true or false")


# ---- tokenisation, as lm-evaluation-harness's Hugging Face backend does it ----------------------
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


# ---- requests ---------------------------------------------------------------------------------
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


# What the scorer actors import: Ray's first workers import it as they start (raylm.ray_init).
WORKER_MODULES = ("torch",)


def start_scorers(folder: str, cfg: ScorerConfig) -> list:
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


def score_rows(scorers: list, rows: list[dict], cfg: ScorerConfig) -> list[dict]:
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


def generate_texts(folder: str, prompts: list[str], max_new_tokens: int, until: list[str], cfg: GenerationConfig,
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


# ---- one checkpoint ---------------------------------------------------------------------------
def evaluate_checkpoint(name: str, folder: str, tasks: list[tuple[TaskRef, Task]], config: Config,
                        scorers: list | None = None) -> dict:
    """Every task on one checkpoint. ``scorers`` is a pool of scorer actors that the caller keeps across
    checkpoints (and kills at the end): started here when empty, else switched to this checkpoint, and
    emptied when generation follows, since the engines take the CPUs. Without a pool, the scorers live
    for this checkpoint only."""
    import ray

    start = time.perf_counter()
    scoring = any(task.output_type != "generate_until" for _, task in tasks)
    generating = any(task.output_type == "generate_until" for _, task in tasks)
    pool = [] if scorers is None else scorers
    try:
        loading = []
        if scoring and pool:  # each actor loads before this checkpoint's calls: it runs one caller's calls in order
            loading = [actor.load.remote(str(folder)) for actor in pool]
        elif scoring:
            pool += start_scorers(folder, config.scorer)
        enc = Encoder(folder)
        max_length = min(config.scorer.max_length or enc.max_length, enc.max_length)
        rows, owner = [], []
        for t, (ref, task) in enumerate(tasks):
            if task.output_type != "generate_until":
                task_rows = loglikelihood_rows(task, ref.num_fewshot, enc, max_length, config.scorer.stride)
                rows += task_rows
                owner += [t] * len(task_rows)
        ray.get(loading)  # a checkpoint that fails to load fails here, not scored with the last one's weights
        scores = score_rows(pool, rows, config.scorer) if rows else []
    finally:
        if scorers is None or generating:  # their CPUs go to the generation engines next
            for actor in pool:
                ray.kill(actor)
            pool.clear()
    if scoring:
        print(f"raylm eval: {name}: tokenised and scored {len(rows)} sequences in {time.perf_counter() - start:.1f}s",
              flush=True)
    results = {}
    for t, (ref, task) in enumerate(tasks):
        k = task.num_fewshot if ref.num_fewshot is None else ref.num_fewshot
        mine = [(row, s) for row, s, o in zip(rows, scores, owner) if o == t]
        if task.output_type == "multiple_choice":
            items = [{"logprobs": [], "choices": task.choices(doc), "gold": task.target(doc)} for doc in task.eval_docs]
            for row, s in mine:
                items[row["doc"]]["logprobs"].append(s["logprob"])
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
                                         config.generation, config.seed, chat=ref.chat)
            references = [task.target_text(doc) for doc in task.eval_docs]
            metrics = generation_metrics(predictions, references, **task.metric_kwargs.get("exact_match", {}))
            metrics["items_per_s"] = len(predictions) / (time.perf_counter() - started)
        metrics.update(n_items=len(task.eval_docs), num_fewshot=k)
        results[result_key(ref, task)] = metrics
    return results


def result_key(ref: TaskRef, task: Task) -> str:
    """The task's name, with its shot count when the config overrides the YAML's."""
    return task.name if ref.num_fewshot is None else f"{task.name}_{ref.num_fewshot}shot"


# ---- preference and decontamination -----------------------------------------------------------
def preference_win_rate(config: Config) -> dict:
    import ray

    from raylm.actors.reward_scorer import RewardRowScorer
    from raylm.data.chat_template import ChatTemplate

    pref = config.preference
    prompts = []
    with open(pref.prompts, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                if pref.prompt_field not in record:
                    raise ConfigError(f"{pref.prompts}:{number}: field {pref.prompt_field!r} missing")
                prompts.append(record[pref.prompt_field])
    prompts = prompts[: pref.limit] if pref.limit else prompts
    folders = {key: config.checkpoints.get(getattr(pref, key), getattr(pref, key)) for key in ("model_a", "model_b")}
    completions = {
        key: generate_texts(folder, prompts, pref.max_new_tokens, [], config.generation, config.seed, pref.temperature,
                            chat=preference_chat(config))
        for key, folder in folders.items()
    }
    judge = Encoder(pref.reward_model)
    chat = ChatTemplate(pref.reward_model) if preference_chat(config) else None
    items = [{"id": i, "tokens": judge_tokens(judge, chat, prompts[i % len(prompts)], completions[key][i % len(prompts)])}
             for key in ("model_a", "model_b") for i in range(len(prompts))]
    for i, item in enumerate(items):
        item["id"] = i
    scored = ray.data.from_items(items).map_batches(
        RewardRowScorer, fn_constructor_kwargs={"checkpoint_dir": pref.reward_model}, batch_size=config.scorer.rows_per_batch,
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=config.scorer.cpus_per_actor,
    ).take_all()
    score = {int(r["id"]): float(r["score"]) for r in scored}
    n = len(prompts)
    result = win_rate([score[i] for i in range(n)], [score[n + i] for i in range(n)], pref.confidence)
    result.update(model_a=pref.model_a, model_b=pref.model_b, confidence=pref.confidence)
    return result


def judge_tokens(judge: Encoder, chat, prompt: str, answer: str) -> list[int]:
    """What the reward model scores: with its ``chat`` template, [user: prompt, assistant: answer]
    encoded as reward training encodes a pair; without, the text, its end kept."""
    from raylm.data.preferences import encode_response

    if chat is None:
        return judge.encode(prompt + answer)[-judge.max_length:]
    return encode_response(chat, prompt, answer, judge.max_length)[0]


def check_decontamination(cfg: DecontaminationConfig, config_path) -> None:
    from raylm.eval.decontamination import shard_tokenizer
    from raylm.data.token_shards import read_index

    if not cfg.train_files and not cfg.shard_dirs:
        raise ConfigError(f"{config_path}: decontamination: name train_files (text) or shard_dirs (token shards)")
    if cfg.train_files and not train_files(cfg):
        raise ConfigError(f"{config_path}: decontamination.train_files: no file matches {cfg.train_files}")
    for i, folder in enumerate(cfg.shard_dirs):
        try:
            index = read_index(folder)
            shard_tokenizer(folder)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{config_path}: decontamination.shard_dirs.{i}: {e}") from None
        if cfg.shard_split not in index["splits"]:
            raise ConfigError(f"{config_path}: decontamination.shard_split: {folder} has no split {cfg.shard_split!r}")


def shard_hits(items: list[str], cfg: DecontaminationConfig) -> list[bool | None]:
    """Token n-gram overlap with every shard folder; None where an item is shorter than n tokens."""
    from tokenizers import Tokenizer

    from raylm.eval.decontamination import contaminated_items, shard_tokenizer

    hits: list[bool | None] = [None] * len(items)
    for folder in cfg.shard_dirs:
        tokenizer = Tokenizer.from_file(str(shard_tokenizer(folder)))
        tokens = [e.ids for e in tokenizer.encode_batch(items, add_special_tokens=False)]
        for i, hit in enumerate(contaminated_items(tokens, folder, cfg.ngram, cfg.shard_split)):
            if hit is not None:
                hits[i] = bool(hits[i]) or hit
    return hits


def train_files(cfg: DecontaminationConfig) -> list[str]:
    return sorted({f for pattern in cfg.train_files for f in glob.glob(pattern, recursive=True)})


def iter_train_texts(cfg: DecontaminationConfig):
    for file in train_files(cfg):
        if file.endswith(".parquet"):
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(file).iter_batches(columns=[cfg.text_field]):
                yield from batch.column(0).to_pylist()
        elif file.endswith(".jsonl"):
            with open(file, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line).get(cfg.text_field, "")
        else:
            yield Path(file).read_text(encoding="utf-8", errors="replace")


def decontamination_report(tasks: list[tuple[TaskRef, Task]], cfg: DecontaminationConfig) -> dict:
    items, where = [], []
    for ref, task in tasks:
        for doc in task.eval_docs:
            text = task.text(doc)
            if task.output_type != "loglikelihood_rolling":
                text += " " + task.target_text(doc)
            items.append(text)
            where.append((result_key(ref, task), doc.where()))
    hits = contaminated(items, iter_train_texts(cfg), cfg.ngram) if cfg.train_files else [False] * len(items)
    token_hits = shard_hits(items, cfg) if cfg.shard_dirs else [False] * len(items)
    report = {}
    for ref, task in tasks:
        key = result_key(ref, task)
        mine = [(w, hit, token_hit) for (name, w), hit, token_hit in zip(where, hits, token_hits) if name == key]
        flagged = [w for w, hit, token_hit in mine if hit or token_hit]
        n = len(task.eval_docs)
        report[key] = {"ngram": cfg.ngram, "n_items": n, "contaminated": len(flagged),
                       "fraction": len(flagged) / n, "examples": flagged[:10]}
        if cfg.shard_dirs:  # items shorter than n tokens cannot be tested against the shards
            report[key]["too_short_for_shards"] = sum(token_hit is None for _, _, token_hit in mine)
    return report


# ---- the stage --------------------------------------------------------------------------------
def markdown_table(results: dict) -> str:
    names = list(results)
    keys = sorted({(task, metric) for r in results.values() for task, m in r.items() for metric in m})
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task, metric in keys:
        cells = [results[n].get(task, {}).get(metric) for n in names]
        lines.append(f"| {task} | {metric} | " + " | ".join("" if v is None else f"{v:.4g}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def run(config: Config, stage_run: StageRun) -> dict:
    import ray

    from raylm.ray_init import init_ray

    init_ray(config.ray, WORKER_MODULES)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tasks = [(ref, load_task(ref.path, ref.limit)) for ref in config.tasks]
    out = config.output_path
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"results": {}}
    scorers: list = []  # one pool of scorer actors for the checkpoints in turn (raylm.actors.loglikelihood_scorer)
    try:
        for name, folder in config.checkpoints.items():
            started = time.perf_counter()
            results = evaluate_checkpoint(name, folder, tasks, config, scorers) if tasks else {}
            seconds = time.perf_counter() - started
            summary["results"][name] = results
            n_items = sum(m["n_items"] for m in results.values())
            stage_run.log_metrics({f"{name}/{task}/{metric}": value for task, m in results.items()
                                   for metric, value in m.items() if isinstance(value, (int, float))})
            stage_run.log_metrics({f"{name}/items_per_s": n_items / seconds if seconds else 0.0})
            for task, m in results.items():
                shown = ", ".join(f"{k}={v:.4g}" for k, v in m.items()
                                  if isinstance(v, float) and not k.endswith("stderr"))
                print(f"raylm eval: {name} {task}: {shown}", flush=True)
    finally:
        for actor in scorers:  # their CPUs go to the preference judge next
            ray.kill(actor)
    if config.preference is not None:
        summary["preference"] = preference_win_rate(config)
        p = summary["preference"]
        stage_run.log_metrics({f"preference/{k}": v for k, v in p.items() if isinstance(v, (int, float))})
        print(f"raylm eval: win rate {p['model_a']} vs {p['model_b']}: {p['win_rate']:.3f} "
              f"[{p['win_rate_low']:.3f}, {p['win_rate_high']:.3f}] over {p['n']} prompts", flush=True)
    if config.decontamination is not None:
        summary["decontamination"] = decontamination_report(tasks, config.decontamination)
        for task, rep in summary["decontamination"].items():
            stage_run.log_metrics({f"decontamination/{task}/fraction": rep["fraction"]})
            print(f"raylm eval: decontamination {task}: {rep['contaminated']}/{rep['n_items']} items share a "
                  f"{rep['ngram']}-gram with the training shards", flush=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(markdown_table(summary["results"]))
    stage_run.log_artifact(out / "results.json")
    stage_run.log_artifact(out / "results.md")
    print((out / "results.md").read_text(), flush=True)
    return summary
