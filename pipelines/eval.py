"""`raylm eval`: score Hugging Face checkpoints side by side on lm-evaluation-harness-style tasks.

For each checkpoint, every log-likelihood request of every task (multiple-choice answers, perplexity
windows) goes to a pool of scorer actors holding the model, started before the driver tokenises; generative
tasks go through a pool of generation engine actors (vLLM, or raylm's own generator). Prompts are
tokenised the way lm-evaluation-harness's Hugging Face backend does, so accuracies agree with
``lm_eval``. Results: MLflow metrics ``<checkpoint>/<task>/<metric>``, ``results.json`` and a
Markdown table with one column per checkpoint; optionally a reward-model win rate of one
checkpoint against another, and an n-gram decontamination report against the training shards.

Beyond likelihood (docs/evaluation.md; the math in raylm.eval.judge / fairness / memorization /
human_eval): an LM judge's position-swap-debiased win rate (``judge``), bias metrics on templated
prompts with swapped demographic terms (``fairness``: scored with the tasks, in the same scorer calls),
exact extraction of training sequences (``memorization``: a teacher-forced greedy check in the same
scorer calls) with canaries and PII-like text in generations, and side-by-side pairs for people
(``human_export``) whose choices come back as preference JSONL (``human_import``).
"""

from __future__ import annotations

import functools
import glob
import json
import math
import time
from pathlib import Path

import numpy as np
from typing import Literal

from pydantic import Field

from raylm.config import ConfigError, InputPath, Section, StageConfig
from raylm.data.jsonl import records, write_jsonl
from raylm.eval.judge import DEFAULT_TEMPLATE as DEFAULT_JUDGE_TEMPLATE
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
    path: InputPath  # an lm-evaluation-harness-style task YAML
    num_fewshot: int | None = Field(default=None, ge=0)  # None: the YAML's num_fewshot
    limit: int | None = Field(default=None, ge=1)  # evaluate only the first N documents
    # generate_until only: true: each context is a user message in the checkpoint's chat template,
    # answered up to its end-of-turn (an instruction-tuned model's format); false: plain text
    chat: bool = False


class ScorerConfig(Section):
    num_actors: int = Field(default=2, ge=1)  # scorer actors, each holding the checkpoint
    # CPUs each scorer actor holds (their integer part, at least 1: its torch threads)
    cpus_per_actor: float = Field(default=1, gt=0)
    rows_per_batch: int = Field(default=64, ge=1)  # rows handed to one scorer actor call
    max_batch: int = Field(default=32, ge=1)  # sequences per forward pass inside an actor
    dtype: Literal["float32", "bfloat16"] = "float32"  # dtype the scorers run the model in
    max_length: int | None = Field(default=None, ge=2)  # None: the checkpoint's max_position_embeddings
    stride: int | None = Field(default=None, ge=1)  # perplexity windows; None: max_length (disjoint)


class GenerationConfig(Section):
    # auto: vLLM where it imports, else raylm's own KV-cache generator
    backend: Literal["auto", "vllm", "torch"] = "auto"
    num_engines: int = Field(default=1, ge=1)  # generation engine actors per checkpoint
    cpus_per_engine: float = Field(default=1, gt=0)  # CPUs each engine actor holds
    # longest prompt + answer an engine holds, in tokens (longer prompts keep their end)
    max_model_len: int = Field(default=512, ge=16)
    prompts_per_call: int = Field(default=32, ge=1)  # prompts sent to an engine in one request


class PreferenceConfig(Section):
    model_a: str  # a checkpoint name from `checkpoints`, or a folder
    model_b: str  # the checkpoint model_a is compared with (a name from `checkpoints`, or a folder)
    reward_model: InputPath  # a scalar-head (reward) checkpoint folder with its tokenizer
    prompts: InputPath  # JSONL, one prompt per line in `prompt_field`
    prompt_field: str = "prompt"  # the prompt's field in each line of `prompts`
    limit: int | None = Field(default=None, ge=1)  # only the first N prompts; None: all
    max_new_tokens: int = Field(default=32, ge=1)  # of each model's response
    temperature: float = Field(default=0.0, ge=0)  # of the responses; 0: greedy
    confidence: float = Field(default=0.95, gt=0, lt=1)  # of the win rate's Wilson interval (ties count half)
    # true: each model answers the prompt as a user message in its own chat template, and the reward
    # model scores [user, assistant] in its template, as it was trained (raylm.data.chat_template); false:
    # the prompt is plain text, continued and scored as text; unset: chat when all three checkpoints
    # have a chat template, text when none has.
    chat: bool | None = None


class DecontaminationConfig(Section):
    train_files: list[InputPath] = []  # globs of training text: .jsonl (text_field), .parquet (text_field) or .txt
    text_field: str = "text"  # the text field of .jsonl and .parquet train_files
    # Token shard folders written by `raylm data` (index.json + .bin): items are tokenised with the
    # tokenizer.json beside them and matched on token n-grams, exactly what the model was trained on.
    shard_dirs: list[InputPath] = []
    shard_split: str = "train"  # the shard split compared with
    # n: an item sharing one n-gram (words in train_files, tokens in shards) is contaminated
    ngram: int = Field(default=13, ge=1)


class PairConfig(Section):
    model_a: str  # a checkpoint name from `checkpoints`, or a folder
    model_b: str  # the checkpoint model_a is compared with
    prompts: InputPath  # JSONL, one prompt per line in `prompt_field`
    prompt_field: str = "prompt"  # the prompt's field in each line of `prompts`
    limit: int | None = Field(default=None, ge=1)  # only the first N prompts
    max_new_tokens: int = Field(default=32, ge=1)  # of each model's response
    temperature: float = Field(default=0.0, ge=0)  # of the responses; 0: greedy
    # true: prompts are user messages in each checkpoint's chat template; false: plain text; unset:
    # chat when every checkpoint involved has a chat template, text when none has
    chat: bool | None = None


class JudgeConfig(PairConfig):
    """LM-as-judge: a judge checkpoint picks the better of model_a's and model_b's responses, asked
    in both orders (position-swap debiasing)."""

    model: str | None = None  # the judge: a checkpoint name or folder, served by a generation engine; required
    template: str = DEFAULT_JUDGE_TEMPLATE  # the judge's prompt, with {prompt}, {response_a}, {response_b}
    judge_max_new_tokens: int = Field(default=8, ge=1)  # of the judge's reply (parsed for A, B or tie)
    label_field: str | None = None  # a field of `prompts` lines with a reference preference (A, B or tie)
    reward_model: InputPath | None = None  # a reward checkpoint whose preferences the judge's are compared with
    confidence: float = Field(default=0.95, gt=0, lt=1)  # of the win rate's interval


class FairnessConfig(Section):
    """Bias metrics on templated prompts with swapped demographic terms (multiple-choice task files)."""

    tasks: list[TaskRef] = Field(min_length=1)  # fairness sets, e.g. examples/tasks/fairness_templates.yaml
    group_field: str = "group"  # the document field naming its demographic group
    template_field: str = "template_id"  # the field naming the template (documents of one template are compared)
    term_field: str = "term"  # the group's word in the document (counted in the training data for amplification)
    train_files: list[InputPath] = []  # globs of training text (.jsonl/.parquet/.txt) for bias amplification
    text_field: str = "text"  # the text field of train_files
    shard_dirs: list[InputPath] = []  # token shard folders (decoded with their tokenizer.json) for bias amplification
    shard_split: str = "train"  # the shard split read
    resamples: int = Field(default=1000, ge=10)  # bootstrap resamples over templates for the intervals
    confidence: float = Field(default=0.95, gt=0, lt=1)  # of the bootstrap intervals


class MemorizationConfig(Section):
    """Exact extraction of training sequences sampled from token shards, canaries and PII in generations."""

    shard_dirs: list[InputPath] = Field(min_length=1)  # token shard folders written by `raylm data` (the training data)
    shard_split: str = "train"  # the split sequences are sampled from
    num_sequences: int = Field(default=100, ge=1)  # sequences sampled per shard folder (random offsets, within one document)
    prefix_tokens: int = Field(default=32, ge=1)  # k: the prompt of each sequence
    suffix_tokens: int = Field(default=32, ge=1)  # the tokens greedy decoding must reproduce exactly
    canaries: list[str] = []  # strings planted in the training data: does the model complete them?
    canary_prompt_fraction: float = Field(default=0.5, gt=0, lt=1)  # of a canary's tokens given as its prompt
    generate_sequences: int = Field(default=16, ge=0)  # sampled prefixes also decoded and scanned for PII
    prompts: InputPath | None = None  # JSONL of further prompts (field `prompt`) whose generations are scanned for PII
    max_new_tokens: int = Field(default=48, ge=1)  # of each generation scanned
    confidence: float = Field(default=0.95, gt=0, lt=1)  # of the extraction rate's interval


class HumanExportConfig(PairConfig):
    """Side-by-side pairs of model_a's and model_b's responses for people to annotate."""


class HumanImportConfig(Section):
    """Annotators' choices read back as preference JSONL (what raylm reward and raylm dpo read)."""

    pairs: InputPath  # the pairs.jsonl that human_export wrote
    choices: InputPath  # the filled annotate.csv, or JSONL lines {"id", "choice"} (left/right/tie/skip)
    output: str | None = None  # preference JSONL written; unset: <output_dir>/human_preferences.jsonl
    confidence: float = Field(default=0.95, gt=0, lt=1)  # of model A's win rate by the people's choices


class Config(StageConfig):
    checkpoints: dict[str, InputPath] = {}  # display name -> Hugging Face folder, compared side by side
    tasks: list[TaskRef] = []  # lm-evaluation-harness-style task YAMLs scored on every checkpoint
    scorer: ScorerConfig = ScorerConfig()  # the log-likelihood scorer actors (loglikelihood and perplexity tasks)
    # the generation engines (generate_until tasks, preference, judge, memorization)
    generation: GenerationConfig = GenerationConfig()
    preference: PreferenceConfig | None = None  # reward-model win rate of model_a's responses over model_b's
    decontamination: DecontaminationConfig | None = None  # which task items share an n-gram with the training data
    judge: JudgeConfig | None = None  # LM-as-judge win rate of model_a over model_b, position-swap debiased
    fairness: FairnessConfig | None = None  # log-likelihood gap, demographic parity, bias amplification per checkpoint
    memorization: MemorizationConfig | None = None  # training-sequence extraction rate, canaries, PII per checkpoint
    human_export: HumanExportConfig | None = None  # write side-by-side pairs (JSONL, CSV, HTML) for annotators
    human_import: HumanImportConfig | None = None  # read annotators' choices back as preference JSONL


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
    pairwise = (config.preference, config.judge, config.human_export, config.human_import)
    if not config.checkpoints and all(section is None for section in pairwise):
        raise ConfigError(f"{config_path}: checkpoints: nothing to evaluate (no checkpoints and no preference, judge, "
                          "human_export or human_import section)")
    for key in ("fairness", "memorization"):
        if getattr(config, key) is not None and not config.checkpoints:
            raise ConfigError(f"{config_path}: {key}: runs over `checkpoints`, and none is given")
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
    for key in ("judge", "human_export"):
        if getattr(config, key) is not None:
            check_pair_section(config, key, config_path)
    if config.fairness is not None:
        check_fairness(config.fairness, config_path)
    if config.memorization is not None:
        check_memorization(config, config_path)
    if config.human_import is not None:
        from raylm.eval.human_eval import AnnotationError, read_choices, read_pairs

        for key in ("pairs", "choices"):
            if not Path(getattr(config.human_import, key)).is_file():
                raise ConfigError(f"{config_path}: human_import.{key}: {getattr(config.human_import, key)} does not exist")
        try:  # every bad line named now, before any Ray work
            read_choices(config.human_import.choices, set(read_pairs(config.human_import.pairs)))
        except AnnotationError as e:
            raise ConfigError(f"{config_path}: human_import: {e}") from None


def pair_folders(config: Config, key: str) -> dict[str, str]:
    """The checkpoints a pairwise section (judge, human_export) reads, by its keys."""
    section = getattr(config, key)
    names = ("model_a", "model_b") + (("model",) if key == "judge" else ())
    return {name: config.checkpoints.get(getattr(section, name), getattr(section, name)) for name in names}


def pair_chat(config: Config, key: str, config_path=None) -> bool:
    """A pairwise section's ``chat``, or unset: whether all its checkpoints have a chat template."""
    from raylm.data.chat_template import has_chat_template

    section = getattr(config, key)
    if section.chat is not None:
        return section.chat
    have = {name: has_chat_template(folder) for name, folder in pair_folders(config, key).items()}
    if all(have.values()) or not any(have.values()):
        return all(have.values())
    raise ConfigError(f"{config_path}: {key}.chat: {', '.join(k for k, v in have.items() if v)} have a chat "
                      f"template and {', '.join(k for k, v in have.items() if not v)} not: set chat: true or false")


def check_pair_section(config: Config, key: str, config_path) -> None:
    section = getattr(config, key)
    if key == "judge":
        if section.model is None:
            raise ConfigError(f"{config_path}: judge.model: no judge model is configured; LM-as-judge needs a judge "
                              "checkpoint (a name from `checkpoints` or a Hugging Face folder) served by a generation engine")
        missing = [f for f in ("{prompt}", "{response_a}", "{response_b}") if f not in section.template]
        if missing:
            raise ConfigError(f"{config_path}: judge.template: {', '.join(missing)} missing from the judge's prompt")
        if section.reward_model is not None:
            check_checkpoint(section.reward_model, "judge.reward_model", config_path)
    for name, folder in pair_folders(config, key).items():
        check_checkpoint(folder, f"{key}.{name}", config_path)
    if pair_chat(config, key, config_path):
        from raylm.data.chat_template import ChatTemplate, ChatTemplateError

        for name, folder in pair_folders(config, key).items():
            try:
                ChatTemplate(folder)
            except ChatTemplateError as e:
                raise ConfigError(f"{config_path}: {key}.{name}: {e} (or set {key}.chat: false)") from None
    read_prompts(section, key)  # a missing file or field fails now, naming file and line


def read_prompts(section: PairConfig | PreferenceConfig, key: str = "") -> list[dict]:
    """The prompt lines of a pairwise section, at most ``limit`` (the whole record: the judge reads
    its label field). A line that is not JSON or lacks the prompt field is an error naming it."""
    path = Path(section.prompts)
    if not path.is_file():
        raise ConfigError(f"{key}.prompts: {path} does not exist")
    prompts = []
    with open(path, "rb") as f:
        for number, record in records(f, path, error=ConfigError):
            if not isinstance(record, dict) or not isinstance(record.get(section.prompt_field), str):
                raise ConfigError(f"{path}:{number}: field {section.prompt_field!r} missing or not text")
            label_field = getattr(section, "label_field", None)
            if label_field is not None:
                label = str(record.get(label_field, "")).strip().upper()
                record[label_field] = {"TIE": "tie"}.get(label, label)
                if record[label_field] not in ("A", "B", "tie"):
                    raise ConfigError(f"{path}:{number}: field {label_field!r}: {record.get(label_field)!r} is not A, B or tie")
            prompts.append(record)
    if not prompts:
        raise ConfigError(f"{key}.prompts: {path} holds no prompts")
    return prompts[: section.limit] if section.limit else prompts


def check_fairness(cfg: FairnessConfig, config_path) -> None:
    for i, ref in enumerate(cfg.tasks):
        task = load_task(ref.path, ref.limit)
        if task.output_type != "multiple_choice":
            raise ConfigError(f"{config_path}: fairness.tasks.{i}: {ref.path} is {task.output_type}; a fairness set is a "
                              "multiple_choice task (its choices are the outcomes)")
        for doc in task.eval_docs:
            for key in ("group_field", "template_field", "term_field"):
                if getattr(cfg, key) not in doc.data:
                    raise ConfigError(f"{doc.where()}: field {getattr(cfg, key)!r} (fairness.{key}) is missing")
        if len({doc.data[cfg.group_field] for doc in task.eval_docs}) < 2:
            raise ConfigError(f"{config_path}: fairness.tasks.{i}: {ref.path} has fewer than two groups to compare")
    check_training_text(cfg, "fairness", config_path)


def check_memorization(config: Config, config_path) -> None:
    from raylm.data.token_shards import TokenStream

    cfg = config.memorization
    for i, folder in enumerate(cfg.shard_dirs):
        try:
            stream = TokenStream(folder, cfg.shard_split)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{config_path}: memorization.shard_dirs.{i}: {e}") from None
        for name, checkpoint in config.checkpoints.items():
            hf = json.loads((Path(checkpoint) / "config.json").read_text())
            if hf.get("vocab_size", stream.vocab_size) < stream.vocab_size:
                raise ConfigError(f"{config_path}: memorization.shard_dirs.{i}: {folder} holds ids of a vocabulary of "
                                  f"{stream.vocab_size}, larger than checkpoint {name}'s ({hf['vocab_size']}): "
                                  "not the tokenizer this model was trained with")
    if cfg.prompts is not None and not Path(cfg.prompts).is_file():
        raise ConfigError(f"{config_path}: memorization.prompts: {cfg.prompts} does not exist")


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
                        scorers: list | None = None, fairness: dict | None = None,
                        extra_rows: list[dict] | None = None) -> dict:
    """Every task on one checkpoint. ``scorers`` is a pool of scorer actors that the caller keeps across
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
            pool += start_scorers(folder, config.scorer)
        enc = Encoder(folder)
        max_length = min(config.scorer.max_length or enc.max_length, enc.max_length)
        rows, owner = [], []
        for t, (ref, task) in enumerate(tasks):
            if task.output_type != "generate_until":
                task_rows = loglikelihood_rows(task, ref.num_fewshot, enc, max_length, config.scorer.stride)
                rows += task_rows
                owner += [t] * len(task_rows)
        for row in extra_rows or ():
            rows.append({"doc": -1, "choice": -1, "tokens": row["tokens"], "n_scored": row["n_scored"]})
            owner.append(-1)
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
    pref = config.preference
    prompts = [record[pref.prompt_field] for record in read_prompts(pref, "preference")]
    folders = {key: config.checkpoints.get(getattr(pref, key), getattr(pref, key)) for key in ("model_a", "model_b")}
    completions = {
        key: generate_texts(folder, prompts, pref.max_new_tokens, [], config.generation, config.seed, pref.temperature,
                            chat=preference_chat(config))
        for key, folder in folders.items()
    }
    scores_a, scores_b = reward_scores(pref.reward_model, preference_chat(config), prompts, completions["model_a"],
                                       completions["model_b"], config)
    result = win_rate(scores_a, scores_b, pref.confidence)
    result.update(model_a=pref.model_a, model_b=pref.model_b, confidence=pref.confidence)
    return result


def reward_scores(reward_model: str, chat: bool, prompts: list[str], answers_a: list[str], answers_b: list[str],
                  config: Config) -> tuple[list[float], list[float]]:
    """A reward model's score of every (prompt, answer) of A and of B."""
    import ray

    from raylm.actors.reward_scorer import RewardRowScorer
    from raylm.data.chat_template import ChatTemplate

    judge = Encoder(reward_model)
    template = ChatTemplate(reward_model) if chat else None
    answers = list(answers_a) + list(answers_b)
    items = [{"id": i, "tokens": judge_tokens(judge, template, prompts[i % len(prompts)], answer)}
             for i, answer in enumerate(answers)]
    scored = ray.data.from_items(items).map_batches(
        RewardRowScorer, fn_constructor_kwargs={"checkpoint_dir": reward_model}, batch_size=config.scorer.rows_per_batch,
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=config.scorer.cpus_per_actor,
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


def check_decontamination(cfg: DecontaminationConfig, config_path) -> None:
    if not cfg.train_files and not cfg.shard_dirs:
        raise ConfigError(f"{config_path}: decontamination: name train_files (text) or shard_dirs (token shards)")
    check_training_text(cfg, "decontamination", config_path)


def check_training_text(cfg: DecontaminationConfig | FairnessConfig, key: str, config_path) -> None:
    """``{key}.train_files`` (globs: each set must match a file) and ``{key}.shard_dirs`` (token shard
    folders with their tokenizer and ``shard_split``), as the decontamination and fairness sections name them."""
    from raylm.data.token_shards import read_index
    from raylm.eval.decontamination import shard_tokenizer

    if cfg.train_files and not train_files(cfg):
        raise ConfigError(f"{config_path}: {key}.train_files: no file matches {cfg.train_files}")
    for i, folder in enumerate(cfg.shard_dirs):
        try:
            index = read_index(folder)
            shard_tokenizer(folder)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{config_path}: {key}.shard_dirs.{i}: {e}") from None
        if cfg.shard_split not in index["splits"]:
            raise ConfigError(f"{config_path}: {key}.shard_split: {folder} has no split {cfg.shard_split!r}")


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


def train_files(cfg: DecontaminationConfig | FairnessConfig) -> list[str]:
    return sorted({f for pattern in cfg.train_files for f in glob.glob(pattern, recursive=True)})


def iter_train_texts(cfg: DecontaminationConfig):
    for file in train_files(cfg):
        if file.endswith(".parquet"):
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(file).iter_batches(columns=[cfg.text_field]):
                yield from batch.column(0).to_pylist()
        elif file.endswith(".jsonl"):
            with open(file, "rb") as f:
                for _, record in records(f, file):
                    yield record.get(cfg.text_field, "")
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


# ---- LM-as-judge and human evaluation ----------------------------------------------------------
def pair_completions(config: Config, key: str, cache: dict) -> tuple[list[dict], dict[str, list[str]]]:
    """A pairwise section's prompt records and each model's responses (generated once per checkpoint,
    prompts and settings: the judge and the human export share them)."""
    section = getattr(config, key)
    records = read_prompts(section, key)
    prompts = [r[section.prompt_field] for r in records]
    chat = pair_chat(config, key)
    out = {}
    for name in ("model_a", "model_b"):
        folder = pair_folders(config, key)[name]
        cache_key = (folder, tuple(prompts), section.max_new_tokens, section.temperature, chat)
        if cache_key not in cache:
            cache[cache_key] = generate_texts(folder, prompts, section.max_new_tokens, [], config.generation,
                                              config.seed, section.temperature, chat=chat)
        out[name] = cache[cache_key]
    return records, out


def judge_report(config: Config, cache: dict) -> tuple[dict, list[dict]]:
    """The judge's debiased win rate of model_a over model_b, its position bias and unparseable
    verdicts, and its agreement with the labels and/or the reward model; plus every verdict."""
    from raylm.eval.judge import agreement, debiased_scores, judge_prompt, pairwise_report, parse_verdict, \
        preference_of, reward_preferences

    cfg = config.judge
    records, answers = pair_completions(config, "judge", cache)
    prompts = [r[cfg.prompt_field] for r in records]
    a, b = answers["model_a"], answers["model_b"]
    judge_inputs = [judge_prompt(p, x, y, cfg.template) for p, x, y in zip(prompts, a, b)]  # A shown first
    judge_inputs += [judge_prompt(p, y, x, cfg.template) for p, x, y in zip(prompts, a, b)]  # swapped
    replies = generate_texts(pair_folders(config, "judge")["model"], judge_inputs, cfg.judge_max_new_tokens, [],
                             config.generation, config.seed, 0.0, chat=pair_chat(config, "judge"))
    n = len(prompts)
    verdicts = [parse_verdict(r) for r in replies]
    report = pairwise_report(verdicts[:n], verdicts[n:], cfg.confidence)
    report.update(model_a=cfg.model_a, model_b=cfg.model_b, judge=cfg.model)
    preferences = [preference_of(x) for x in debiased_scores(verdicts[:n], verdicts[n:])]
    if cfg.label_field is not None:
        labels = [r[cfg.label_field] for r in records]
        report.update({f"labels/{k}": v for k, v in agreement(preferences, labels).items()})
    reward = [None] * n
    if cfg.reward_model is not None:
        scores_a, scores_b = reward_scores(cfg.reward_model, pair_chat(config, "judge"), prompts, a, b, config)
        reward = reward_preferences(scores_a, scores_b)
        report.update({f"reward_model/{k}": v for k, v in agreement(preferences, reward).items()})
    rows = [{"prompt": p, "response_a": x, "response_b": y, "reply_a_first": replies[i], "verdict_a_first": verdicts[i],
             "reply_b_first": replies[n + i], "verdict_b_first": verdicts[n + i], "preference": preferences[i],
             **({"label": records[i][cfg.label_field]} if cfg.label_field else {}),
             **({"reward_preference": reward[i]} if cfg.reward_model else {})}
            for i, (p, x, y) in enumerate(zip(prompts, a, b))]
    return report, rows


def human_export(config: Config, cache: dict) -> dict:
    from raylm.eval.human_eval import make_pairs, write_pairs

    cfg = config.human_export
    records, answers = pair_completions(config, "human_export", cache)
    pairs = make_pairs([r[cfg.prompt_field] for r in records], answers["model_a"], answers["model_b"],
                       cfg.model_a, cfg.model_b, config.seed)
    paths = write_pairs(pairs, config.output_path / "human_eval")
    return {"n_pairs": len(pairs), **{k: str(v) for k, v in paths.items()}}


def human_import(config: Config) -> dict:
    from raylm.eval.human_eval import AnnotationError, read_choices, read_pairs, to_preferences

    cfg = config.human_import
    try:
        pairs = read_pairs(cfg.pairs)
        records, counts = to_preferences(pairs, read_choices(cfg.choices, set(pairs)), cfg.confidence)
    except AnnotationError as e:
        raise ConfigError(f"human_import: {e}") from None
    output = Path(cfg.output) if cfg.output else config.output_path / "human_preferences.jsonl"
    write_jsonl(records, output)
    return {**counts, "output": str(output)}


# ---- fairness and memorization ---------------------------------------------------------------
def prepare_fairness(config: Config) -> tuple[list[tuple[TaskRef, Task]], dict]:
    """The fairness sets as tasks, and what ``evaluate_checkpoint`` needs to score them: their keys and
    the training data's group/outcome co-occurrences (one pass over the training data for all)."""
    from raylm.eval.fairness import cooccurrence_counts

    cfg = config.fairness
    tasks = [(ref, load_task(ref.path, ref.limit)) for ref in cfg.tasks]
    context = {"config": cfg, "keys": {result_key(ref, task) for ref, task in tasks}, "train_counts": {},
               "seed": config.seed}
    if cfg.train_files or cfg.shard_dirs:
        wanted = {}
        for ref, task in tasks:
            terms: dict[str, set] = {}
            for doc in task.eval_docs:
                terms.setdefault(str(doc.data[cfg.group_field]), set()).add(str(doc.data[cfg.term_field]))
            outcomes = sorted({c.strip().lower() for doc in task.eval_docs for c in task.choices(doc)})
            wanted[result_key(ref, task)] = ({g: sorted(t) for g, t in terms.items()}, outcomes)
        texts = list(iter_fairness_texts(cfg))
        for key, (terms, outcomes) in wanted.items():
            context["train_counts"][key] = cooccurrence_counts(texts, terms, outcomes)
    return tasks, context


def iter_fairness_texts(cfg: FairnessConfig):
    yield from iter_train_texts(DecontaminationConfig(train_files=cfg.train_files, text_field=cfg.text_field))
    from tokenizers import Tokenizer

    from raylm.data.token_shards import TokenStream
    from raylm.eval.decontamination import shard_tokenizer

    for folder in cfg.shard_dirs:  # documents: the stream cut at its EOS tokens
        tokenizer = Tokenizer.from_file(str(shard_tokenizer(folder)))
        stream = TokenStream(folder, cfg.shard_split)
        tokens = stream.read(0, stream.num_tokens)
        ends = [-1] + np.flatnonzero(tokens == stream.eos_token_id).tolist()
        for start, end in zip(ends, ends[1:]):
            yield tokenizer.decode(tokens[start + 1 : end].tolist())


def fairness_task_metrics(task: Task, items: list[dict], fairness: dict, key: str) -> dict:
    from raylm.eval.fairness import fairness_metrics

    cfg = fairness["config"]
    docs = task.eval_docs
    fair_items = [{"group": str(doc.data[cfg.group_field]), "template": str(doc.data[cfg.template_field]),
                   "logprobs": item["logprobs"], "favourable": item["gold"], "choices": item["choices"]}
                  for doc, item in zip(docs, items)]
    return fairness_metrics(fair_items, lambda item: item["choices"], fairness["train_counts"].get(key),
                            cfg.resamples, cfg.confidence, fairness["seed"])


def memorization_samples(config: Config) -> list[dict]:
    """The training sequences tested, sampled once for every checkpoint."""
    from raylm.data.token_shards import TokenStream
    from raylm.eval.memorization import sample_sequences

    cfg = config.memorization
    samples = []
    for i, folder in enumerate(cfg.shard_dirs):
        try:
            stream = TokenStream(folder, cfg.shard_split)
            found = sample_sequences(stream, cfg.num_sequences, cfg.prefix_tokens, cfg.suffix_tokens, config.seed + i)
        except ValueError as e:
            raise ConfigError(f"memorization.shard_dirs.{i}: {e}") from None
        samples += [{**sample, "shard_dir": folder} for sample in found]
    return samples


def memorization_generations(name: str, folder: str, samples: list[dict], config: Config) -> dict:
    """Generations from canary prompts, sampled training prefixes and the configured prompts, checked
    for the canaries and scanned for PII-like text."""
    from raylm.eval.memorization import canary_report, scan_pii, split_canary

    cfg = config.memorization
    enc = Encoder(folder)
    canary_prompts, secrets = [], []
    for canary in cfg.canaries:
        try:
            prompt_ids, secret_ids = split_canary(enc.encode(canary), cfg.canary_prompt_fraction)
        except ValueError as e:
            raise ConfigError(f"memorization.canaries: {canary!r}: {e}") from None
        canary_prompts.append(enc.decode(prompt_ids))
        secrets.append(enc.decode(secret_ids))
    prefixes = [enc.decode(s["prefix"]) for s in samples[: cfg.generate_sequences]]
    extra = [r["prompt"] for r in read_prompts(PairConfig(model_a="", model_b="", prompts=cfg.prompts))] if cfg.prompts else []
    prompts = canary_prompts + prefixes + extra
    if not prompts:
        return {}
    continuations = generate_texts(folder, prompts, cfg.max_new_tokens, [], config.generation, config.seed)
    full = [p + c for p, c in zip(prompts, continuations)]
    report = scan_pii(continuations)  # what the model wrote, not what it was given
    report.update(canary_report(cfg.canaries, secrets, continuations[: len(cfg.canaries)], full))
    report["generations"] = [{"prompt": p, "continuation": c} for p, c in zip(prompts, continuations)][:50]
    return report


# ---- the stage --------------------------------------------------------------------------------
def markdown_table(results: dict) -> str:
    names = list(results)
    keys = sorted({(task, metric) for r in results.values() for task, m in r.items() for metric in m})
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task, metric in keys:
        cells = [results[n].get(task, {}).get(metric) for n in names]
        if not any(isinstance(v, (int, float)) for v in cells):
            continue
        lines.append(f"| {task} | {metric} | " + " | ".join(f"{v:.4g}" if isinstance(v, (int, float)) else ""
                                                            for v in cells) + " |")
    return "\n".join(lines) + "\n"


def log_numbers(stage_run: StageRun, prefix: str, values: dict) -> None:
    """The finite numbers of a report as MLflow metrics ``<prefix>/<key>`` (booleans as 0/1)."""
    stage_run.log_metrics({f"{prefix}/{k}": float(v) for k, v in values.items()
                           if isinstance(v, (int, float)) and math.isfinite(float(v))})


def interval(report: dict, key: str) -> str:
    return f"{report[key]:.3f} [{report[key + '_low']:.3f}, {report[key + '_high']:.3f}]"


def run(config: Config, stage_run: StageRun) -> dict:
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    tasks = [(ref, load_task(ref.path, ref.limit)) for ref in config.tasks]
    fairness_tasks, fairness = prepare_fairness(config) if config.fairness is not None else ([], None)
    samples = memorization_samples(config) if config.memorization is not None else []
    mem = config.memorization
    mem_generates = mem is not None and bool(mem.canaries or mem.generate_sequences or mem.prompts)
    out = config.output_path
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"results": {}}
    if samples:  # where each tested sequence starts in its shard folder's token stream
        summary["memorization_samples"] = [{"shard_dir": s["shard_dir"], "start": s["start"]} for s in samples]
    scorers: list = []  # one pool of scorer actors for the checkpoints in turn (raylm.actors.loglikelihood_scorer)
    try:
        for name, folder in config.checkpoints.items():
            started = time.perf_counter()
            extra = [{"tokens": s["prefix"] + s["suffix"], "n_scored": len(s["suffix"])} for s in samples]
            results = (evaluate_checkpoint(name, folder, tasks + fairness_tasks, config, scorers, fairness, extra or None)
                       if tasks or fairness_tasks or extra else {})
            if mem is not None:
                from raylm.eval.memorization import extraction_report

                report = extraction_report([row["is_greedy"] for row in extra], mem.confidence)
                report["suffix_nll_per_token"] = -sum(r["logprob"] for r in extra) / sum(r["n_scored"] for r in extra)
                if mem_generates:
                    for actor in scorers:  # the generation engines need the CPUs
                        ray.kill(actor)
                    scorers.clear()
                    details = memorization_generations(name, folder, samples, config)
                    summary.setdefault("memorization", {})[name] = details
                    report.update({k: v for k, v in details.items() if isinstance(v, (int, float))})
                report.update(n_items=report["n_sequences"], prefix_tokens=mem.prefix_tokens, suffix_tokens=mem.suffix_tokens)
                results["memorization"] = report
                print(f"raylm eval: {name} memorization: {report['extracted']}/{report['n_sequences']} training sequences "
                      f"extracted ({interval(report, 'extraction_rate')}); canaries leaked "
                      f"{report.get('canaries_leaked', 0)}/{len(mem.canaries)}; generations with PII-like text "
                      f"{report.get('pii_texts', 0)}/{report.get('n_texts', 0)}", flush=True)
            seconds = time.perf_counter() - started
            summary["results"][name] = results
            n_items = sum(m["n_items"] for m in results.values())
            stage_run.log_metrics({f"{name}/{task}/{metric}": float(value) for task, m in results.items()
                                   for metric, value in m.items()
                                   if isinstance(value, (int, float)) and math.isfinite(float(value))})
            stage_run.log_metrics({f"{name}/items_per_s": n_items / seconds if seconds else 0.0})
            for task, m in results.items():
                shown = ", ".join(f"{k}={v:.4g}" for k, v in m.items()
                                  if isinstance(v, float) and not k.endswith(("stderr", "_low", "_high"))
                                  and "/" not in k)
                print(f"raylm eval: {name} {task}: {shown}", flush=True)
                if fairness is not None and task in fairness["keys"]:
                    print(f"raylm eval: {name} {task}: ll_gap {interval(m, 'll_gap')}, parity difference "
                          f"{interval(m, 'parity_difference')}", flush=True)
                    if m.get("bias_amplification_undefined"):
                        print(f"raylm eval: {name} {task}: bias amplification undefined for "
                              f"{', '.join(m['bias_amplification_undefined'])}: the training data never puts their "
                              "terms in a document with an outcome word", flush=True)
    finally:
        for actor in scorers:  # their CPUs go to the preference judge next
            ray.kill(actor)
    if config.preference is not None:
        summary["preference"] = preference_win_rate(config)
        p = summary["preference"]
        stage_run.log_metrics({f"preference/{k}": v for k, v in p.items() if isinstance(v, (int, float))})
        print(f"raylm eval: win rate {p['model_a']} vs {p['model_b']}: {p['win_rate']:.3f} "
              f"[{p['win_rate_low']:.3f}, {p['win_rate_high']:.3f}] over {p['n']} prompts", flush=True)
    completions: dict = {}  # responses generated once for the judge and the human export
    if config.judge is not None:
        summary["judge"], verdicts = judge_report(config, completions)
        j = summary["judge"]
        log_numbers(stage_run, "judge", j)
        stage_run.log_artifact(write_jsonl(verdicts, out / "judge_verdicts.jsonl"))
        print(f"raylm eval: judge {j['judge']}: win rate {j['model_a']} vs {j['model_b']} {interval(j, 'win_rate')} "
              f"over {j['n']} prompts (position-swap debiased); {j['unparseable']} unparseable verdicts; first position "
              f"picked {j['first_position_rate']:.2f} of the time, consistency {j['consistency']:.2f}"
              + (" -- POSITION-BIASED" if j["position_biased"] else ""), flush=True)
    if config.human_export is not None:
        summary["human_export"] = human_export(config, completions)
        log_numbers(stage_run, "human_export", summary["human_export"])
        stage_run.log_artifact(out / "human_eval", "human_eval")
        print(f"raylm eval: {summary['human_export']['n_pairs']} side-by-side pairs for annotators in "
              f"{summary['human_export']['csv']} (and .html)", flush=True)
    if config.human_import is not None:
        summary["human_import"] = h = human_import(config)
        log_numbers(stage_run, "human_import", h)
        stage_run.log_artifact(h["output"])
        print(f"raylm eval: {h['annotated']}/{h['pairs']} pairs annotated: {h['preferences']} preference pairs in "
              f"{h['output']}; {h['ties']} ties, {h['skips']} skips, {h['unannotated']} unannotated, {h['unusable']} "
              f"unusable (identical or empty responses)", flush=True)
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
