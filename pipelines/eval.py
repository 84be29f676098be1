"""`raylm eval`: score Hugging Face checkpoints side by side on lm-evaluation-harness-style tasks.

For each checkpoint, every log-likelihood request of every task (multiple-choice answers, perplexity
windows) goes to a pool of scorer actors holding the model, started before the driver tokenises; generative
tasks go through a pool of generation engine actors (vLLM, or raylm's own generator). Prompts are
tokenised the way lm-evaluation-harness's Hugging Face backend does, so accuracies agree with
``lm_eval``. Results: MLflow metrics ``<checkpoint>/<task>/<metric>``, ``results.json`` and a
Markdown table with one column per checkpoint; optionally a reward-model win rate of one
checkpoint against another, and an n-gram decontamination report against the training shards.

This module is the stage's config, its checks and ``run``; the mechanics are in ``raylm.eval``: requests
(tokenisation, log-likelihood requests), engines (the scorer and generation actor pools), evaluate (one
checkpoint), pairs (the pairwise sections' prompts and responses), and a module per section.

Beyond likelihood (docs/evaluation.md; the math in raylm.eval.judge / fairness / memorization /
human_eval): an LM judge's position-swap-debiased win rate (``judge``), bias metrics on templated
prompts with swapped demographic terms (``fairness``: scored with the tasks, in the same scorer calls),
exact extraction of training sequences (``memorization``: a teacher-forced greedy check in the same
scorer calls) with canaries and PII-like text in generations, and side-by-side pairs for people
(``human_export``) whose choices come back as preference JSONL (``human_import``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from raylm.config import ConfigError, InputPath, Section, StageConfig
from raylm.data.jsonl import write_jsonl
from raylm.eval.decontamination import check_decontamination, decontamination_report
from raylm.eval.evaluate import evaluate_checkpoint
from raylm.eval.fairness import check_fairness, prepare_fairness
from raylm.eval.human_eval import AnnotationError, human_export, human_import, read_choices, read_pairs
from raylm.eval.judge import DEFAULT_TEMPLATE as DEFAULT_JUDGE_TEMPLATE
from raylm.eval.judge import judge_report
from raylm.eval.memorization import check_memorization, extraction_report, memorization_generations, memorization_samples
from raylm.eval.pairs import pair_chat, pair_folders, preference_win_rate, read_prompts
from raylm.eval.tasks import load_task
from raylm.tracking import StageRun

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# What the scorer actors import: Ray's first workers import it as they start (raylm.ray_init).
WORKER_MODULES = ("torch",)


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
        if pair_chat(pref, "preference", config.checkpoints, config_path):  # every template loads (or the run would fail after the tasks)
            from raylm.data.chat_template import ChatTemplate, ChatTemplateError

            for key, folder in pair_folders(pref, "preference", config.checkpoints).items():
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
        check_memorization(config.memorization, config.checkpoints, config_path)
    if config.human_import is not None:
        for key in ("pairs", "choices"):
            if not Path(getattr(config.human_import, key)).is_file():
                raise ConfigError(f"{config_path}: human_import.{key}: {getattr(config.human_import, key)} does not exist")
        try:  # every bad line named now, before any Ray work
            read_choices(config.human_import.choices, set(read_pairs(config.human_import.pairs)))
        except AnnotationError as e:
            raise ConfigError(f"{config_path}: human_import: {e}") from None


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
    for name, folder in pair_folders(section, key, config.checkpoints).items():
        check_checkpoint(folder, f"{key}.{name}", config_path)
    if pair_chat(section, key, config.checkpoints, config_path):
        from raylm.data.chat_template import ChatTemplate, ChatTemplateError

        for name, folder in pair_folders(section, key, config.checkpoints).items():
            try:
                ChatTemplate(folder)
            except ChatTemplateError as e:
                raise ConfigError(f"{config_path}: {key}.{name}: {e} (or set {key}.chat: false)") from None
    # a missing file or field fails now, naming file and line
    read_prompts(section.prompts, section.prompt_field, section.limit, getattr(section, "label_field", None), key)


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
    fairness_tasks, fairness = prepare_fairness(config.fairness, config.seed) if config.fairness is not None else ([], None)
    samples = memorization_samples(config.memorization, config.seed) if config.memorization is not None else []
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
            results = (evaluate_checkpoint(name, folder, tasks + fairness_tasks, config.scorer, config.generation,
                                           config.seed, scorers, fairness, extra or None)
                       if tasks or fairness_tasks or extra else {})
            if mem is not None:
                report = extraction_report([row["is_greedy"] for row in extra], mem.confidence)
                report["suffix_nll_per_token"] = -sum(r["logprob"] for r in extra) / sum(r["n_scored"] for r in extra)
                if mem_generates:
                    for actor in scorers:  # the generation engines need the CPUs
                        ray.kill(actor)
                    scorers.clear()
                    details = memorization_generations(folder, samples, mem, config.generation, config.seed)
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
        summary["preference"] = preference_win_rate(config.preference, config.checkpoints, config.generation,
                                                    config.scorer, config.seed)
        p = summary["preference"]
        stage_run.log_metrics({f"preference/{k}": v for k, v in p.items() if isinstance(v, (int, float))})
        print(f"raylm eval: win rate {p['model_a']} vs {p['model_b']}: {p['win_rate']:.3f} "
              f"[{p['win_rate_low']:.3f}, {p['win_rate_high']:.3f}] over {p['n']} prompts", flush=True)
    completions: dict = {}  # responses generated once for the judge and the human export
    if config.judge is not None:
        summary["judge"], verdicts = judge_report(config.judge, config.checkpoints, config.generation,
                                                  config.scorer, config.seed, completions)
        j = summary["judge"]
        log_numbers(stage_run, "judge", j)
        stage_run.log_artifact(write_jsonl(verdicts, out / "judge_verdicts.jsonl"))
        print(f"raylm eval: judge {j['judge']}: win rate {j['model_a']} vs {j['model_b']} {interval(j, 'win_rate')} "
              f"over {j['n']} prompts (position-swap debiased); {j['unparseable']} unparseable verdicts; first position "
              f"picked {j['first_position_rate']:.2f} of the time, consistency {j['consistency']:.2f}"
              + (" -- POSITION-BIASED" if j["position_biased"] else ""), flush=True)
    if config.human_export is not None:
        summary["human_export"] = human_export(config.human_export, config.checkpoints, config.generation,
                                               config.seed, out, completions)
        log_numbers(stage_run, "human_export", summary["human_export"])
        stage_run.log_artifact(out / "human_eval", "human_eval")
        print(f"raylm eval: {summary['human_export']['n_pairs']} side-by-side pairs for annotators in "
              f"{summary['human_export']['csv']} (and .html)", flush=True)
    if config.human_import is not None:
        summary["human_import"] = h = human_import(config.human_import, out)
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
