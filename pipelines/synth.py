"""`raylm synth`: synthetic data from a trained or brought-in model on a pool of vLLM engines.

``mode`` picks what is made (``raylm.data.synthetic`` has the prompts, parsing and provenance):

- ``instructions``: self-instruct from ``instructions.seeds``: each of ``num_prompts`` prompts shows
  ``examples_per_prompt`` seed tasks and the model writes the next task; parsed instructions are
  answered by the same model in its chat template; instruction + answer go through the data stage's
  quality filters, and the instructions through its MinHash dedup. Out: SFT's JSONL
  (``train.jsonl`` / ``validation.jsonl``: ``{"prompt", "response", "provenance"}``);
- ``preferences``: ``samples_per_prompt`` answers to each of ``preferences.prompts``, scored by a
  reward model, a rule reward (a named rule on each record's ``reference``, a family checker or a
  user function, through the rule-reward pool) or an LM as a pairwise judge (``raylm.eval.judge``:
  both orders of every pair; ``preferences.judge_checkpoint`` on its own engine actors, or the
  generating model itself); the best answer is ``chosen``, the worst ``rejected``; a prompt whose
  answers tie, or whose chosen and rejected answers are the same or near-identical text, gives no
  pair (counted). Prompts go through the data stage's MinHash dedup before any answer is sampled,
  prompt + chosen answer through its filters (bad words; the quality rules with
  ``preferences.quality_filters``), and PII is redacted from all three texts. Out:
  reward / DPO's JSONL (``{"prompt", "chosen", "rejected", "provenance"}``);
- ``rephrase``: each document of ``rephrase.inputs``, in chunks of at most ``chunk_words`` words,
  rewritten in ``rephrase.style``; filtered and deduplicated like instructions. Out:
  ``documents.jsonl`` (``{"id", "text", "source", "provenance"}``), an input of `raylm data`.

Generation is a Ray Data pipeline over the engine actors (``actors/data/engine_generation.py``:
``map_batches`` with one actor per engine). Everything dropped is in ``rejected.jsonl`` with its
stage and reason; the counts add up (``stats.json``, logged to MLflow with the output files).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from raylm.actors.data.minhash_dedup import DedupConfig
from raylm.actors.data.c4_filter import C4Config
from raylm.actors.data.fineweb_filter import FineWebConfig
from raylm.actors.data.gopher_filters import GopherQualityConfig
from raylm.actors.data.quality_filters import FilterConfig
from raylm.config import ConfigError, InputPath, Section, StageConfig, where_relative
from raylm.tasks.reward_functions import RewardSpec
from raylm.tracking import StageRun


class EngineConfig(Section):
    checkpoint: InputPath | None = None  # the model: a Hugging Face folder with tokenizer.json (e.g. out/sft/hf); required
    backend: Literal["auto", "vllm", "torch"] = "auto"  # auto: vLLM where it imports, else raylm's own generator
    engines: int = Field(default=1, ge=1)  # engine actors in the pool (Ray Data runs one generation actor per engine)
    cpus_per_engine: float = Field(default=1, gt=0)  # CPUs each engine actor holds
    gpus_per_engine: float = Field(default=0, ge=0)  # GPUs each engine actor holds (0 on a CPU machine)
    max_model_len: int = Field(default=512, ge=16)  # longest prompt + answer an engine holds
    dtype: Literal["float32", "bfloat16"] = "float32"  # of the served weights
    memory_fraction: float = Field(default=0.1, gt=0, le=1)  # of host RAM (CPU) / GPU memory for vLLM's KV cache
    batch_size: int = Field(default=32, ge=1)  # prompts per map_batches call (one engine request)


class SamplingConfig(Section):
    temperature: float = Field(default=0.8, ge=0)  # 0: greedy
    top_p: float = Field(default=0.95, gt=0, le=1)  # nucleus sampling: the smallest set of tokens with this probability
    top_k: int = Field(default=0, ge=0)  # 0: off
    max_new_tokens: int = Field(default=128, ge=1)  # of an answer / a rephrased chunk


class InstructionsConfig(Section):
    seeds: InputPath | None = None  # JSONL seed tasks: {"instruction"|"prompt"|"messages", "id"?}; required in this mode
    num_prompts: int = Field(default=64, ge=1)  # self-instruct prompts (one new instruction each)
    examples_per_prompt: int = Field(default=3, ge=1)  # seed tasks shown in each prompt
    max_instruction_tokens: int = Field(default=48, ge=1)  # generated for the instruction (cut at its first line break)
    min_instruction_words: int = Field(default=3, ge=1)  # shorter instructions are dropped (too_short)
    max_instruction_words: int = Field(default=150, ge=1)  # longer instructions are dropped (too_long)


class PreferencesConfig(Section):
    prompts: InputPath | None = None  # JSONL {"prompt", "id"?, "reference"?, "reward"?}; required in this mode
    samples_per_prompt: int = Field(default=4, ge=2)  # answers sampled per prompt; best vs worst make the pair
    scorer: Literal["reward_model", "rule", "judge"] = "rule"  # what scores the answers; judge: an LM, pairwise (judge_checkpoint)
    judge_checkpoint: InputPath | None = None  # scorer judge: the judge model (a Hugging Face folder with a chat template) on its own engine actors; null: the generating model judges
    judge_engines: int = Field(default=1, ge=1)  # scorer judge with judge_checkpoint: the judge's engine actors (engine.* for the rest)
    judge_template: str | None = None  # judge: the pairwise prompt ({prompt}, {response_a}, {response_b}); null: raylm.eval.judge's
    judge_max_new_tokens: int = Field(default=16, ge=1)  # judge: the verdict's length (greedy)
    reward_model: InputPath | None = None  # a *ForSequenceClassification folder (`raylm reward` output), for scorer: reward_model
    rule: RewardSpec = None  # a reward spec (raylm.tasks.rewards), e.g. numeric; null: each record's "reward"
    rule_timeout_s: float = Field(default=5.0, gt=0)  # per answer, for a user function
    min_margin: float = Field(default=0.0, ge=0)  # best - worst score at or below this is a tie (no pair)
    quality_filters: bool = False  # also the filters' quality rules and classifier on prompt + chosen; false: only bad words (and normalisation), as for the data stage's curated inputs: "Answer: 22" fails rules made for documents
    near_identical_jaccard: float = Field(default=0.8, gt=0, le=1)  # chosen and rejected at or above this estimated Jaccard similarity of word n-grams (dedup's MinHash) give no pair


class RephraseConfig(Section):
    inputs: InputPath | None = None  # JSONL {"text", "id"?} or a .txt file; required in this mode
    style: str = "in clear, plain English, as an encyclopedia would"  # goes into the prompt: "Rephrase the following text <style>."
    chunk_words: int = Field(default=200, ge=1)  # documents are rephrased in pieces of at most this many words


class SynthGopherQualityConfig(GopherQualityConfig):
    min_words: int = 3  # a short instruction and answer, not a web page
    min_stop_words: int = 0  # 0: no stop words needed (a short instruction may have none)
    min_alpha_words_ratio: float = 0.5  # "What is 3 + 4?" is fine


class SynthFilterConfig(FilterConfig):
    """The data stage's filters, with thresholds for short synthetic texts (C4's and FineWeb's
    document rules off: they expect web pages of several sentences)."""

    # Gopher's quality rules, with thresholds for short synthetic texts
    gopher_quality: SynthGopherQualityConfig = SynthGopherQualityConfig()
    c4: C4Config = C4Config(enabled=False)  # C4's rules; off here: they expect web pages of several sentences
    # FineWeb's rules; off here: they expect web pages of several sentences
    fineweb: FineWebConfig = FineWebConfig(enabled=False)


class SynthDedupConfig(DedupConfig):
    ngram: int = Field(default=3, ge=1)  # instructions are short: 3-word shingles


class OutputConfig(Section):
    validation_fraction: float = Field(default=0.1, gt=0, lt=1)  # instructions / pairs held out to validation.jsonl
    source: str = "synthetic"  # rephrase mode: the documents' source name (the data stage's mixing weights)


class ProvenanceConfig(Section):
    tags: dict[str, str] = Field(default_factory=dict)  # extra key -> value added to every record's provenance


class Config(StageConfig):
    mode: Literal["instructions", "preferences", "rephrase"] = "instructions"  # what this run makes (docs/synth.md)
    engine: EngineConfig = Field(default_factory=EngineConfig)  # the model and its pool of generation engines
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)  # how answers / instructions / rephrasings are sampled
    instructions: InstructionsConfig = Field(default_factory=InstructionsConfig)  # mode instructions: self-instruct from seed tasks
    preferences: PreferencesConfig = Field(default_factory=PreferencesConfig)  # mode preferences: scored samples -> pairs
    rephrase: RephraseConfig = Field(default_factory=RephraseConfig)  # mode rephrase: pretraining text rewritten
    filters: SynthFilterConfig = Field(default_factory=SynthFilterConfig)  # the data stage's quality filters (instructions, rephrase; preferences: prompt + chosen)
    dedup: SynthDedupConfig = Field(default_factory=SynthDedupConfig)  # the data stage's MinHash dedup (instructions, rephrase; preferences: the prompts)
    output: OutputConfig = Field(default_factory=OutputConfig)  # the files written
    provenance: ProvenanceConfig = Field(default_factory=ProvenanceConfig)  # what every record's provenance field adds

    @model_validator(mode="after")
    def _mode_inputs(self):
        if self.mode == "preferences" and self.preferences.scorer == "reward_model" and not self.preferences.reward_model:
            raise ValueError("preferences.reward_model: required with preferences.scorer: reward_model")
        return self


INPUT_KEY = {"instructions": ("instructions", "seeds"), "preferences": ("preferences", "prompts"),
             "rephrase": ("rephrase", "inputs")}


def check(config: Config, config_path) -> None:
    from raylm.data import synthetic
    from raylm.data.chat_template import ChatTemplateError, has_chat_template

    where = config_path or "(command line)"
    folder = config.engine.checkpoint
    if folder is None:
        raise ConfigError(f"{where}: engine.checkpoint: required (a Hugging Face folder, e.g. out/sft/hf)")
    chat_models = [("engine.checkpoint", folder)]
    if judge_checkpoint(config) is not None:
        chat_models.append(("preferences.judge_checkpoint", judge_checkpoint(config)))
    for key, model in chat_models:
        if not (Path(model) / "config.json").exists():
            raise ConfigError(f"{where}: {key}: {model} has no config.json (not a Hugging Face folder)"
                              + where_relative(model, config_path))
        if not (Path(model) / "tokenizer.json").exists() or not has_chat_template(model):
            raise ConfigError(f"{where}: {key}: {model} has no tokenizer.json with a chat template: "
                              "its prompts could not be written or its answers read")
    section, key = INPUT_KEY[config.mode]
    path = getattr(getattr(config, section), key)
    if path is None:
        raise ConfigError(f"{where}: {section}.{key}: required with mode: {config.mode}")
    readers = {"instructions": synthetic.read_seed_tasks, "preferences": synthetic.read_prompt_records,
               "rephrase": synthetic.read_documents}
    try:
        readers[config.mode](path)
    except synthetic.SyntheticDataError as e:
        raise ConfigError(f"{where}: {section}.{key}: {e}{where_relative(path, config_path)}") from None
    if config.mode == "preferences":
        p = config.preferences
        if p.scorer == "reward_model":
            hf = Path(p.reward_model) / "config.json"
            if not hf.exists() or not any(a.endswith("ForSequenceClassification")
                                          for a in json.loads(hf.read_text()).get("architectures", [])):
                raise ConfigError(f"{where}: preferences.reward_model: {p.reward_model} is not a reward model folder "
                                  "(config.json with a *ForSequenceClassification architecture)")
        elif p.rule is not None:
            from raylm.tasks.rewards import parse_spec

            try:
                parse_spec(p.rule, "preferences.rule")
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
    from raylm.data.chat_template import ChatTemplate

    for key, model in chat_models:
        try:
            ChatTemplate(model)
        except ChatTemplateError as e:
            raise ConfigError(f"{where}: {key}: {e}") from None


# ---- the engine pool ------------------------------------------------------------------------------

def judge_checkpoint(config: Config) -> str | None:
    """The separate judge model's folder, where one judges this run (else None: no judge, or the
    generating model judges its own answers on its own engines)."""
    p = config.preferences
    return p.judge_checkpoint if config.mode == "preferences" and p.scorer == "judge" and p.judge_checkpoint else None


def start_engines(config: Config, checkpoint: str | Path, count: int) -> list:
    """``count`` engine actors serving ``checkpoint``, with the ``engine`` section's settings."""
    import ray

    from raylm.actors.generation_engine import make_generation_engine

    e = config.engine
    engines = [make_generation_engine(str(Path(checkpoint).resolve()), backend=e.backend, num_cpus=e.cpus_per_engine,
                                      num_gpus=e.gpus_per_engine, dtype=e.dtype, max_model_len=e.max_model_len,
                                      seed=config.seed + i, gpu_memory_utilization=e.memory_fraction)
               for i in range(count)]
    ray.get([engine.ready.remote() for engine in engines], timeout=1800)
    return engines


class Generator:
    """Prompts -> completions through an engine pool serving ``checkpoint`` (default
    ``engine.checkpoint``), in that model's own chat template."""

    def __init__(self, config: Config, engines: list, checkpoint: str | Path | None = None):
        from raylm.data.chat_template import ChatTemplate

        self.config, self.engines = config, engines
        self.template = ChatTemplate(checkpoint or config.engine.checkpoint)
        self.budget = config.engine.max_model_len

    def sampling(self, max_new_tokens: int | None = None, temperature: float | None = None) -> dict:
        s = self.config.sampling
        return {"max_new_tokens": max_new_tokens or s.max_new_tokens,
                "temperature": s.temperature if temperature is None else temperature,
                "top_p": s.top_p, "top_k": s.top_k}

    def plain_ids(self, text: str) -> list[int]:
        ids = self.template.encode_text(text)
        return ([self.template.bos_id] if self.template.bos_id is not None else []) + ids

    def chat_ids(self, user_text: str) -> list[int]:
        return self.template.prompt([{"role": "user", "content": user_text}])

    def run(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: int, chat: bool,
            temperature: float | None = None) -> list[list[int] | None]:
        """Completions (token ids); None for a prompt that, with ``max_new_tokens``, does not fit in
        ``engine.max_model_len`` (dropped as ``prompt_too_long``, never cut). ``temperature``: instead
        of ``sampling.temperature``."""
        from raylm.actors.data.engine_generation import generate_rows

        fits = [i for i, p in enumerate(prompts) if len(p) + max_new_tokens <= self.budget]
        done = generate_rows(self.engines, [prompts[i] for i in fits], [seeds[i] for i in fits],
                             self.sampling(max_new_tokens, temperature), self.template.stop_ids if chat else None,
                             self.config.engine.batch_size)
        out: list = [None] * len(prompts)
        for i, completion in zip(fits, done):
            out[i] = completion
        return out

    def text(self, completion: list[int], chat: bool) -> str:
        if chat:
            return self.template.answer_text(completion)
        return self.template.tokenizer.decode(completion)


# ---- the modes ------------------------------------------------------------------------------------

class Book:
    """Counts and the rejected log of one run."""

    def __init__(self):
        self.counts: dict = {}
        self.rejected: list[dict] = []
        self.verdicts: list[dict] = []  # scorer judge: every judged pair, both orders (judge_verdicts.jsonl)

    def drop(self, stage: str, reason: str, **record) -> None:
        self.counts.setdefault(f"dropped_{stage}", {})
        self.counts[f"dropped_{stage}"][reason] = self.counts[f"dropped_{stage}"].get(reason, 0) + 1
        self.rejected.append({"stage": stage, "reason": reason, **record})

    def chat_response(self, gen: Generator, completion: list[int] | None, **record) -> str | None:
        """A chat completion's answer text, stripped; None (booked as dropped, with ``record``) where
        the prompt did not fit or the answer is empty."""
        if completion is None:
            self.drop("parse", "prompt_too_long", **record)
            return None
        text = gen.text(completion, chat=True).strip()
        if not text:
            self.drop("parse", "empty_response", **record)
            return None
        return text


def passing_filters(config: Config, texts: list[str], book: Book, what: list[dict], quality: bool = True) -> list[int]:
    """Indices of ``texts`` that pass the data stage's filters (``quality=False``: not its quality rules);
    the others go to the book with ``what[i]``."""
    from raylm.data.synthetic import filter_reasons

    passed = []
    for i, reason in enumerate(filter_reasons(texts, config.filters, quality)):
        if reason:
            book.drop("filter", reason, **what[i])
        else:
            passed.append(i)
    return passed


def not_duplicates(config: Config, texts: list[str], book: Book, what: list[dict]) -> list[int]:
    """Indices of ``texts`` that are not exact or near duplicates of an earlier one (the data stage's
    MinHash dedup); the others go to the book with ``what[i]``."""
    from raylm.data.synthetic import duplicate_rows

    removed, stats = duplicate_rows(texts, config.dedup, config.output_path / "work")
    book.counts["dedup"] = stats
    for i in removed:
        book.drop("dedup", "duplicate", **what[i])
    removed_set = set(removed)
    return [i for i in range(len(texts)) if i not in removed_set]


def filter_and_dedup(config: Config, texts: list[str], dedup_texts: list[str], book: Book, what: list[dict]) -> list[int]:
    """Indices of ``texts`` that pass the data stage's filters and are not duplicates (dedup on
    ``dedup_texts`` of the survivors); the others go to the book with ``what[i]``."""
    passed = passing_filters(config, texts, book, what)
    kept = not_duplicates(config, [dedup_texts[i] for i in passed], book, [what[i] for i in passed])
    return [passed[j] for j in kept]


def make_instructions(config: Config, gen: Generator, book: Book, base: dict) -> list[dict]:
    from raylm.data.synthetic import (normalise_instruction, parse_instruction, provenance, read_seed_tasks, redact,
                                      sample_seed_sets, self_instruct_prompt)

    c = config.instructions
    tasks = read_seed_tasks(c.seeds)
    seed_texts = {normalise_instruction(t["instruction"]) for t in tasks}
    sets = sample_seed_sets(tasks, c.num_prompts, c.examples_per_prompt, config.seed)
    prompts = [gen.plain_ids(self_instruct_prompt([t["instruction"] for t in s])) for s in sets]
    seeds = [config.seed * 1_000_003 + i for i in range(len(prompts))]
    completions = gen.run(prompts, seeds, c.max_instruction_tokens, chat=False)
    book.counts["instruction_prompts"] = len(prompts)
    candidates = []  # (instruction, seed ids)
    for s, completion in zip(sets, completions):
        ids = [t["id"] for t in s]
        if completion is None:
            book.drop("parse", "prompt_too_long", seed_ids=ids)
            continue
        instruction, why = parse_instruction(gen.text(completion, chat=False), c.min_instruction_words,
                                             c.max_instruction_words, seed_texts)
        if why:
            book.drop("parse", why, seed_ids=ids, generated=gen.text(completion, chat=False))
        else:
            candidates.append((instruction, ids))
    book.counts["instructions_parsed"] = len(candidates)
    answer_prompts = [gen.chat_ids(instruction) for instruction, _ in candidates]
    answers = gen.run(answer_prompts, [config.seed * 1_000_003 + 500_000 + i for i in range(len(candidates))],
                      config.sampling.max_new_tokens, chat=True)
    pairs, what = [], []
    for (instruction, ids), answer in zip(candidates, answers):
        response = book.chat_response(gen, answer, seed_ids=ids, prompt=instruction)
        if response is None:
            continue
        pairs.append((instruction, response, ids))
        what.append({"seed_ids": ids, "prompt": instruction, "response": response})
    kept = filter_and_dedup(config, [f"{p}\n\n{r}" for p, r, _ in pairs], [p for p, _, _ in pairs], book, what)
    sampling = {**gen.sampling(), "instruction_max_new_tokens": c.max_instruction_tokens, "seed": config.seed}
    return [{"prompt": redact(pairs[i][0], config.filters), "response": redact(pairs[i][1], config.filters),
             "provenance": provenance("instructions", **base, sampling=sampling, seed_task_ids=pairs[i][2])}
            for i in kept]


def score_answers(config: Config, items: list[dict], answers: list[str]) -> list[float]:
    """One score per (prompt record, answer): the reward model's, or the rule reward's."""
    import ray

    p = config.preferences
    if p.scorer == "reward_model":
        from raylm.actors.reward_scorer import RewardScorer
        from raylm.data.chat_template import ChatTemplate

        template = ChatTemplate(p.reward_model)
        sequences = [template.encode([{"role": "user", "content": item["prompt"]},
                                      {"role": "assistant", "content": answer}])[0] for item, answer in zip(items, answers)]
        scorer = RewardScorer.options(num_cpus=1).remote(str(Path(p.reward_model).resolve()))
        try:
            return ray.get(scorer.score.remote(sequences), timeout=3600)
        finally:
            ray.kill(scorer)
    from raylm.actors.rule_reward import RuleRewardPool

    pool = RuleRewardPool(p.rule, num_actors=1, timeout_s=p.rule_timeout_s)
    try:
        return pool.score(items, answers)["scores"]
    finally:
        pool.shutdown()


def judge_scores(config: Config, gen: Generator, prompts: list[dict], groups: list[list[str]], book: Book) -> list[list[float]]:
    """LM-as-judge (``raylm.eval.judge``) on ``gen``: the judge model's engines, in its own chat
    template. Every pair of a prompt's answers is judged in both orders (position-swap debiasing);
    an answer's score is its mean debiased score over its pairs (1 win, 0.5 tie, 0 loss); pairs with
    no parseable verdict count for neither. ``prompts``: the prompt records (``prompt``, ``id``).
    Verdicts and unparseable replies are counted in the book, and every pair's two replies logged."""
    from raylm.data.synthetic import answer_pairs, judged_scores
    from raylm.eval.judge import DEFAULT_TEMPLATE, judge_prompt, parse_verdict

    template = config.preferences.judge_template or DEFAULT_TEMPLATE
    pairs = answer_pairs([len(answers) for answers in groups])
    requests = []
    for k, i, j in pairs:
        text = prompts[k]["prompt"]
        requests += [gen.chat_ids(judge_prompt(text, groups[k][i], groups[k][j], template)),
                     gen.chat_ids(judge_prompt(text, groups[k][j], groups[k][i], template))]
    replies = gen.run(requests, [0] * len(requests), config.preferences.judge_max_new_tokens, chat=True,
                      temperature=0.0)  # a verdict is read greedily
    texts = [gen.text(r, chat=True) if r is not None else None for r in replies]
    verdicts = [parse_verdict(t) if t is not None else None for t in texts]
    counts = {"A": 0, "B": 0, "tie": 0, "unparseable": 0}
    for v in verdicts:
        counts[v or "unparseable"] += 1
    book.counts["judge_verdicts"] = counts
    # "first": answer i shown as response A; "swapped": j shown first; i, j: the answers' places in the
    # prompt's answers (the order of the provenance's scores)
    for n, (k, i, j) in enumerate(pairs):
        book.verdicts.append({"prompt_id": prompts[k]["id"], "prompt": prompts[k]["prompt"], "i": i, "j": j,
                              "answer_i": groups[k][i],
                              "answer_j": groups[k][j], "reply_first": texts[2 * n], "verdict_first": verdicts[2 * n],
                              "reply_swapped": texts[2 * n + 1], "verdict_swapped": verdicts[2 * n + 1]})
    return judged_scores([len(answers) for answers in groups], verdicts)


def make_preferences(config: Config, gen: Generator, book: Book, base: dict, judge: Generator | None = None) -> list[dict]:
    """``judge``: the judge model's generator (scorer judge); None: ``gen`` judges its own answers."""
    from raylm.data.synthetic import choose_pair, provenance, read_prompt_records, redact, similar_answers

    p = config.preferences
    records = read_prompt_records(p.prompts)
    book.counts["prompts"] = len(records)
    # duplicate prompts collapse to one before any answer is sampled
    records = [records[i] for i in not_duplicates(config, [r["prompt"] for r in records], book,
                                                  [{"prompt_id": r["id"], "prompt": r["prompt"]} for r in records])]
    n = p.samples_per_prompt
    prompts = [gen.chat_ids(r["prompt"]) for r in records for _ in range(n)]
    seeds = [config.seed * 1_000_003 + i for i in range(len(prompts))]
    completions = gen.run(prompts, seeds, config.sampling.max_new_tokens, chat=True)
    answers = [gen.text(c, chat=True).strip() if c is not None else None for c in completions]
    scored = [i for i, a in enumerate(answers) if a]
    if p.scorer == "judge":
        groups = [[i for i in scored if i // n == k] for k in range(len(records))]
        values = judge_scores(config, judge or gen, records,
                              [[answers[i] for i in g] for g in groups], book)
        scores = {i: v for g, vs in zip(groups, values) for i, v in zip(g, vs)}
    else:
        scores = dict(zip(scored, score_answers(config, [records[i // n] for i in scored], [answers[i] for i in scored])))
    book.counts["answers_sampled"] = len(prompts)
    pairs, what = [], []
    sampling = {**gen.sampling(), "seed": config.seed, "samples_per_prompt": n}
    judge_of = None
    if p.scorer == "judge":  # which model gave the verdicts
        from raylm.data.synthetic import checkpoint_fingerprint

        folder = judge_checkpoint(config) or config.engine.checkpoint
        judge_of = {"model": str(Path(folder).resolve()), "model_fingerprint": checkpoint_fingerprint(folder)}
    for k, record in enumerate(records):
        rows = [k * n + j for j in range(n) if scores.get(k * n + j) is not None]
        if len(rows) < 2:
            book.drop("pair", "fewer_than_2_answers", prompt_id=record["id"], prompt=record["prompt"])
            continue
        texts, values = [answers[i] for i in rows], [scores[i] for i in rows]
        choice = choose_pair(texts, values, tolerance=p.min_margin if p.min_margin > 0 else 1e-9)
        if choice is None:
            book.drop("pair", "tie", prompt_id=record["id"], prompt=record["prompt"], answers=texts, scores=values)
            continue
        best, worst = choice
        same = similar_answers(texts[best], texts[worst], config.dedup, p.near_identical_jaccard)
        if same:
            book.drop("pair", same, prompt_id=record["id"], prompt=record["prompt"], chosen=texts[best],
                      rejected=texts[worst], scores=values)
            continue
        pairs.append({"prompt": record["prompt"], "chosen": texts[best], "rejected": texts[worst],
                      "provenance": provenance("preferences", **base, sampling=sampling, prompt_id=record["id"],
                                               scorer=f"rule:{json.dumps(p.rule)}" if p.scorer == "rule" else p.scorer,
                                               reward_model=p.reward_model, judge=judge_of, chosen_score=values[best],
                                               rejected_score=values[worst], scores=values)})
        what.append({"prompt_id": record["id"], "prompt": record["prompt"], "chosen": texts[best],
                     "rejected": texts[worst]})
    # the data stage's filters judge the prompt with the answer that is to be learned; the rejected
    # answer is meant to be worse (a low-quality or offensive one is what the pair teaches against)
    kept = passing_filters(config, [f"{r['prompt']}\n\n{r['chosen']}" for r in pairs], book, what, p.quality_filters)
    return [{**pairs[i], **{key: redact(pairs[i][key], config.filters) for key in ("prompt", "chosen", "rejected")}}
            for i in kept]


def make_rephrasings(config: Config, gen: Generator, book: Book, base: dict) -> list[dict]:
    from raylm.data.synthetic import content_seed, provenance, read_documents, redact, rephrase_prompt, word_chunks

    r = config.rephrase
    chunks = [(d["id"], i, chunk) for d in read_documents(r.inputs) for i, chunk in enumerate(word_chunks(d["text"], r.chunk_words))]
    book.counts["chunks"] = len(chunks)
    prompts = [gen.chat_ids(rephrase_prompt(text, r.style)) for _, _, text in chunks]
    # seeded by content: identical chunks (repeated documents) are rephrased identically, then deduplicated
    completions = gen.run(prompts, [content_seed(config.seed, text) for _, _, text in chunks],
                          config.sampling.max_new_tokens, chat=True)
    texts, what = [], []
    for (doc_id, index, _), completion in zip(chunks, completions):
        text = book.chat_response(gen, completion, document_id=doc_id, chunk=index)
        if text is None:
            continue
        texts.append(text)
        what.append({"document_id": doc_id, "chunk": index, "text": text})
    kept = filter_and_dedup(config, texts, texts, book, what)
    sampling = {**gen.sampling(), "seed": config.seed}
    return [{"id": f"{what[i]['document_id']}#{what[i]['chunk']}", "text": redact(texts[i], config.filters),
             "source": config.output.source,
             "provenance": provenance("rephrase", **base, sampling=sampling, document_id=what[i]["document_id"],
                                      chunk=what[i]["chunk"], style=r.style)}
            for i in kept]


MODES = {"instructions": make_instructions, "preferences": make_preferences, "rephrase": make_rephrasings}


def run(config: Config, stage_run: StageRun, engines: list | None = None, judge_engines: list | None = None) -> dict:
    """``engines``: running engine actors to use (their checkpoint must be ``engine.checkpoint``);
    None: start ``engine.engines`` of them for this run and stop them after. ``judge_engines``: the
    same for ``preferences.judge_checkpoint`` (``judge_engines`` of them). Ray is already up
    (``raylm.stages.run_stage`` starts it)."""
    import ray

    from raylm.data.jsonl import write_jsonl
    from raylm.data.synthetic import SyntheticDataError, checkpoint_fingerprint, split_records

    started = time.perf_counter()
    out = config.output_path
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train.jsonl", "validation.jsonl", "documents.jsonl", "rejected.jsonl", "judge_verdicts.jsonl",
                 "stats.json"):
        (out / name).unlink(missing_ok=True)  # an earlier run's outputs are never mistaken for this one's
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    own = engines is None
    judge_folder = judge_checkpoint(config)
    own_judges = judge_folder is not None and judge_engines is None
    started_engines = []
    try:
        if own:
            engines = start_engines(config, config.engine.checkpoint, config.engine.engines)
            started_engines += engines
        if own_judges:
            judge_engines = start_engines(config, judge_folder, config.preferences.judge_engines)
            started_engines += judge_engines
        gen = Generator(config, engines)
        judge = Generator(config, judge_engines, judge_folder) if judge_folder is not None else None
        book = Book()
        base = {"checkpoint": str(Path(config.engine.checkpoint).resolve()),
                "fingerprint": checkpoint_fingerprint(config.engine.checkpoint),
                "run_id": getattr(stage_run, "run_id", None),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **config.provenance.tags}
        generate_started = time.perf_counter()
        records = (make_preferences(config, gen, book, base, judge) if config.mode == "preferences"
                   else MODES[config.mode](config, gen, book, base))
        book.counts["generate_s"] = round(time.perf_counter() - generate_started, 2)
    finally:
        for engine in started_engines:
            ray.kill(engine)
    # first the drops and counts: they say why, if too little is left to write
    files = {"rejected": str(write_jsonl(book.rejected, out / "rejected.jsonl"))}
    if book.verdicts:
        files["judge_verdicts"] = str(write_jsonl(book.verdicts, out / "judge_verdicts.jsonl"))
    (out / "stats.json").write_text(json.dumps({"mode": config.mode, "written": len(records), **book.counts}, indent=1))
    if config.mode == "rephrase":
        if not records:
            raise SyntheticDataError(f"no document left after filtering (every drop, with its reason: {files['rejected']})")
        files["documents"] = str(write_jsonl(records, out / "documents.jsonl"))
    else:
        try:
            splits = split_records(records, config.output.validation_fraction, config.seed)
        except SyntheticDataError as e:
            raise SyntheticDataError(f"{e}; every drop, with its reason: {files['rejected']}") from None
        for split, items in splits.items():
            files[split] = str(write_jsonl(items, out / f"{split}.jsonl"))
    stats = {"mode": config.mode, "written": len(records), **book.counts, "files": files,
             "seconds": round(time.perf_counter() - started, 2)}
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    metrics = {"written": len(records), "generate_s": book.counts["generate_s"],
               "dropped": len(book.rejected)}
    for key, value in book.counts.items():
        if isinstance(value, dict):
            for reason, n in value.items():
                metrics[f"{key}.{reason}".replace(":", ".")] = n
        elif isinstance(value, (int, float)):
            metrics[key] = value
    stage_run.log_metrics(metrics)
    stage_run.log_artifact(out / "stats.json")
    for path in files.values():
        stage_run.log_artifact(path, "synthetic")
    print(f"raylm synth: {config.mode}: {len(records)} records written to {out} "
          f"({len(book.rejected)} dropped: {', '.join(f'{k}={sum(v.values())}' for k, v in book.counts.items() if k.startswith('dropped_')) or 'none'})",
          flush=True)
    return {"written": len(records), "files": files, **{k: v for k, v in metrics.items() if k != "written"}}
