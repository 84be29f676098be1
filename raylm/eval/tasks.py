"""Evaluation tasks written as lm-evaluation-harness task YAML over local JSONL data.

A task file is read the way lm-evaluation-harness reads it, so the same file runs in both:

    task: stdlib_docstring_mc
    dataset_path: json
    dataset_kwargs: {data_files: {train: train.jsonl, test: test.jsonl}}
    output_type: multiple_choice          # or generate_until, loglikelihood_rolling
    test_split: test
    fewshot_split: train
    doc_to_text: "Docstring: {{docstring}}\\nFunction:"
    doc_to_choice: choices                # a field, a list, or a Jinja template of a list
    doc_to_target: answer                 # an index into the choices, or the answer text
    num_fewshot: 0
    metric_list: [{metric: acc}, {metric: acc_norm}]

Templates are Jinja2 with undefined fields as errors; a field name on its own means that field.
Relative ``data_files`` are resolved against the YAML file's folder (lm-evaluation-harness resolves
them against its working directory: run it from the task folder, or write absolute paths).

Every document is checked when the task is loaded: a missing field, an answer index out of range,
an answer that is not one of the choices, or a line that is not JSON fails with the file, the line
and the field named; nothing is scored until the whole task is valid.

Prompts are built exactly as lm-evaluation-harness builds them (description, then each few-shot
example as ``text + target_delimiter + answer + fewshot_delimiter``, then the document's text), and
few-shot examples are drawn with the same seeded sampler, so the same documents are chosen.
"""

from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

from raylm.config import ConfigError
from raylm.data.jsonl import records

OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood_rolling")
MC_METRICS = ("acc", "acc_norm")
GENERATIVE_METRICS = ("exact_match", "f1", "bleu", "rouge_l")
ROLLING_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
# lm-evaluation-harness keys that do not change what is scored here.
IGNORED_KEYS = {"tag", "group", "task_alias", "dataset_name", "metadata", "repeats", "unsafe_code",
                "should_decontaminate", "doc_to_decontamination_query", "training_split", "validation_split"}
SUPPORTED_KEYS = {"task", "include", "dataset_path", "dataset_kwargs", "output_type", "test_split", "fewshot_split",
                  "doc_to_text", "doc_to_target", "doc_to_choice", "description", "target_delimiter",
                  "fewshot_delimiter", "fewshot_config", "num_fewshot", "metric_list", "generation_kwargs"}
DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_FEWSHOT_SEED = 1234  # lm-evaluation-harness's default fewshot_random_seed


class TaskError(ConfigError):
    """A task file or data line that cannot be evaluated; the message names file, line and field."""


def _regex_replace(text: str, pattern: str, repl: str, count: int = 0) -> str:
    return re.sub(pattern, repl, text, count=count)


_JINJA = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_JINJA.filters["regex_replace"] = _regex_replace


class _TaskLoader(yaml.SafeLoader):
    pass


def _function_tag(loader, node):
    mark = node.start_mark
    raise TaskError(f"{mark.name}:{mark.line + 1}: '!function {node.value}' (Python code in a task) is not supported: "
                    "write the prompt as a Jinja template or a field name")


_TaskLoader.add_constructor("!function", _function_tag)


@dataclass
class Doc:
    """One document of a split, with where it came from (for error messages and reports)."""

    data: dict
    file: Path
    line: int
    split: str = ""

    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Task:
    name: str
    path: Path
    output_type: str
    data_files: dict[str, list[Path]]
    test_split: str
    fewshot_split: str | None
    doc_to_text: Any
    doc_to_target: Any
    doc_to_choice: Any
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = 0
    sampler: str = "default"
    fewshot_seed: int = DEFAULT_FEWSHOT_SEED
    limit: int | None = None
    metrics: list[str] = field(default_factory=list)
    metric_kwargs: dict[str, dict] = field(default_factory=dict)
    until: list[str] = field(default_factory=list)
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS
    _docs: dict[str, list[Doc]] = field(default_factory=dict, repr=False)
    _features: dict[str, set[str]] = field(default_factory=dict, repr=False)

    # -- documents ---------------------------------------------------------------------------
    def docs(self, split: str | None = None) -> list[Doc]:
        split = split or self.test_split
        if split not in self._docs:
            if split not in self.data_files:
                raise TaskError(f"{self.path}: split {split!r} has no data_files (known: {', '.join(self.data_files)})")
            self._docs[split] = [doc for path in self.data_files[split] for doc in read_jsonl(path, split)]
            # lm-evaluation-harness reads a field name as that field when it is a column of the split.
            self._features[split] = {key for doc in self._docs[split] for key in doc.data}
        return self._docs[split]

    @property
    def eval_docs(self) -> list[Doc]:
        docs = self.docs()
        return docs[: self.limit] if self.limit is not None else docs

    @property
    def shots_split(self) -> str:
        return self.fewshot_split or self.test_split

    def _features_of(self, doc: Doc) -> set[str]:
        self.docs(doc.split)
        return self._features[doc.split]

    # -- fields ------------------------------------------------------------------------------
    def _resolve(self, spec: Any, doc: Doc, what: str) -> Any:
        features = self._features_of(doc)
        if isinstance(spec, (int, list)):
            return spec
        if isinstance(spec, dict):
            return list(spec.values())
        if not isinstance(spec, str):
            raise TaskError(f"{self.path}: {what}: expected a field name, a template, a list or an int")
        if spec in features:
            if spec not in doc.data or doc.data[spec] is None:
                raise TaskError(f"{doc.where()}: field {spec!r} is missing (read by {what} of {self.path})")
            return doc.data[spec]
        try:
            return _JINJA.from_string(spec).render(**doc.data)
        except jinja2.UndefinedError as e:
            name = re.search(r"'([^']+)' is undefined", str(e))
            missing = repr(name.group(1)) if name else str(e)
            raise TaskError(f"{doc.where()}: field {missing} is missing (read by {what} of {self.path})") from None
        except jinja2.TemplateError as e:
            raise TaskError(f"{self.path}: {what}: template error on {doc.where()}: {e}") from None

    def _is_field(self, spec: Any, doc: Doc) -> bool:
        return isinstance(spec, str) and spec in self._features_of(doc)

    def text(self, doc: Doc) -> str:
        """The document's prompt text (for a perplexity task: the text to score)."""
        if self.output_type == "loglikelihood_rolling":
            return self.target_text(doc)
        value = self._resolve(self.doc_to_text, doc, "doc_to_text")
        if not isinstance(value, str):
            raise TaskError(f"{doc.where()}: doc_to_text gave {type(value).__name__}, expected text")
        return value

    def choices(self, doc: Doc) -> list[str]:
        value = self._resolve(self.doc_to_choice, doc, "doc_to_choice")
        if isinstance(value, str) and not self._is_field(self.doc_to_choice, doc):
            try:
                value = ast.literal_eval(value)
            except (SyntaxError, ValueError):
                raise TaskError(f"{doc.where()}: doc_to_choice rendered {value!r}, not a list") from None
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            name = self.doc_to_choice if self._is_field(self.doc_to_choice, doc) else "doc_to_choice"
            raise TaskError(f"{doc.where()}: field {name!r}: expected a non-empty list of strings, got {value!r}")
        return value

    def target(self, doc: Doc) -> int | str | list[str]:
        """Multiple choice: the gold choice's index. Otherwise the reference text (or texts)."""
        spec = self.doc_to_target
        if spec is None:  # a perplexity task may name its text with doc_to_text only
            spec = self.doc_to_text
        value = self._resolve(spec, doc, "doc_to_target")
        is_field = self._is_field(spec, doc)
        if not is_field and isinstance(value, str):
            if value.isdigit() and self.doc_to_choice is not None:
                value = int(value)
            elif len(value) >= 2 and value[0] == "[" and value[-1] == "]":
                try:
                    value = ast.literal_eval(value)
                except (SyntaxError, ValueError):
                    pass
        name = spec if is_field else "doc_to_target"
        if self.doc_to_choice is not None:
            choices = self.choices(doc)
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise TaskError(f"{doc.where()}: field {name!r}: expected an answer index or text, got {value!r}")
            if isinstance(value, int) and not 0 <= value < len(choices):
                raise TaskError(f"{doc.where()}: field {name!r}: answer index {value} is out of range "
                                f"for {len(choices)} choices")
            if isinstance(value, str):
                if value not in choices:
                    raise TaskError(f"{doc.where()}: field {name!r}: answer {value!r} is not one of the choices")
                value = choices.index(value)
            return value
        if isinstance(value, list):
            if not value or not all(isinstance(v, str) for v in value):
                raise TaskError(f"{doc.where()}: field {name!r}: expected text or a list of texts, got {value!r}")
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise TaskError(f"{doc.where()}: field {name!r}: expected text, got {value!r}")
        return value

    def target_text(self, doc: Doc) -> str:
        """The answer as text: what follows a few-shot example, and the generation reference."""
        gold = self.target(doc)
        if isinstance(gold, int):
            return self.choices(doc)[gold]
        return gold[0] if isinstance(gold, list) else gold

    def references(self, doc: Doc) -> list[str]:
        """Every acceptable answer text (generation scores the best match)."""
        gold = self.target(doc)
        if isinstance(gold, int):
            return [self.choices(doc)[gold]]
        return gold if isinstance(gold, list) else [gold]

    # -- prompts -----------------------------------------------------------------------------
    def validate(self) -> int:
        """Read every field of every document of the evaluated and few-shot splits (raises TaskError
        naming file, line and field on the first bad one); returns the number of evaluated documents."""
        splits = [self.test_split]
        if self.num_fewshot and self.shots_split != self.test_split:
            splits.append(self.shots_split)
        for split in splits:
            for doc in self.docs(split):
                self.text(doc)
                if self.doc_to_choice is not None:
                    self.choices(doc)
                self.target(doc)
                if self.description:
                    self._resolve(self.description, doc, "description")
        return len(self.eval_docs)

    def contexts(self, num_fewshot: int | None = None) -> list[str]:
        """The prompt of every evaluated document, in file order: the description, ``k`` few-shot
        examples, then the document's text. Examples are drawn as lm-evaluation-harness draws them:
        one generator seeded with ``fewshot_seed``, advanced document by document."""
        k = self.num_fewshot if num_fewshot is None else num_fewshot
        if self.output_type == "loglikelihood_rolling":
            return ["" for _ in self.eval_docs]
        rng = random.Random(self.fewshot_seed)
        same_split = self.shots_split == self.test_split
        pool = self.docs(self.shots_split) if k > 0 else []
        if k > 0 and len(pool) < k + same_split:
            raise TaskError(f"{self.path}: {k}-shot needs {k + same_split} documents in split "
                            f"{self.shots_split!r}; it has {len(pool)}")
        out = []
        for doc in self.eval_docs:
            description = self._resolve(self.description, doc, "description") if self.description else ""
            shots = self._sample_shots(pool, doc, k, rng, same_split) if k > 0 else []
            examples = "".join(self.text(s) + self.target_delimiter + self.target_text(s) + self.fewshot_delimiter
                               for s in shots)
            out.append(description + examples + self.text(doc))
        return out

    def _sample_shots(self, pool: list[Doc], doc: Doc, k: int, rng: random.Random, same_split: bool) -> list[Doc]:
        if self.sampler == "first_n":
            candidates = [d for d in pool if d.data != doc.data] if same_split else pool
            return candidates[:k]
        if not same_split:
            return rng.sample(pool, k)
        drawn = [d for d in rng.sample(pool, k + 1) if d.data != doc.data][:k]
        if len(drawn) < k:  # the pool holds copies of this document
            drawn = rng.sample([d for d in pool if d.data != doc.data], k)
        return drawn


def read_jsonl(path: Path, split: str = "") -> list[Doc]:
    if not path.exists():
        raise TaskError(f"{path}: data file does not exist")
    docs = []
    with open(path, "rb") as f:
        for number, data in records(f, path, error=TaskError):
            if not isinstance(data, dict):
                raise TaskError(f"{path}:{number}: expected a JSON object, got {type(data).__name__}")
            docs.append(Doc(data, path, number, split))
    if not docs:
        raise TaskError(f"{path}: no documents")
    return docs


def _read_task_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.exists():
        raise TaskError(f"{path}: task file does not exist")
    if path.resolve() in seen:
        raise TaskError(f"{path}: include cycle")
    try:
        with open(path, encoding="utf-8") as f:  # a file stream: YAML marks then carry its name
            data = yaml.load(f, Loader=_TaskLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise TaskError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise TaskError(f"{path}: a task file is a mapping of keys")
    if "include" in data:  # lm-evaluation-harness: the included file's keys, overridden by this file's
        base = _read_task_yaml(path.parent / data.pop("include"), seen + (path.resolve(),))
        data = {**base, **data}
    return data


def _data_files(path: Path, spec: Any) -> dict[str, list[Path]]:
    if isinstance(spec, (str, list)):  # Hugging Face datasets names an unnamed split "train"
        spec = {"train": spec}
    if not isinstance(spec, dict) or not spec:
        raise TaskError(f"{path}: dataset_kwargs.data_files: expected a file, a list of files, or split: file(s)")
    out = {}
    for split, files in spec.items():
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise TaskError(f"{path}: dataset_kwargs.data_files.{split}: expected a file name or a list of them")
        out[split] = [(path.parent / f) if not Path(f).is_absolute() else Path(f) for f in files]
    return out


def load_task(path: str | Path, limit: int | None = None, validate: bool = True,
              fewshot_seed: int = DEFAULT_FEWSHOT_SEED) -> Task:
    """Read one task YAML and its data (the first ``limit`` test documents); with ``validate``
    every document is checked now."""
    path = Path(path)
    data = _read_task_yaml(path)
    unknown = set(data) - SUPPORTED_KEYS - IGNORED_KEYS
    if unknown:
        raise TaskError(f"{path}: {', '.join(sorted(unknown))}: not supported by raylm eval "
                        f"(supported: {', '.join(sorted(SUPPORTED_KEYS))})")
    rolling = data.get("output_type") == "loglikelihood_rolling"
    required = ("task", "test_split") + (() if rolling else ("doc_to_text", "doc_to_target"))
    for key in required:
        if key not in data:
            raise TaskError(f"{path}: {key}: required key is missing")
    if rolling and data.get("doc_to_target") is None and data.get("doc_to_text") is None:
        raise TaskError(f"{path}: doc_to_target: required key is missing (the text a perplexity task scores)")
    output_type = data.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise TaskError(f"{path}: output_type: {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
    if data.get("dataset_path") not in ("json", "jsonl"):
        raise TaskError(f"{path}: dataset_path: raylm eval reads local JSONL data: set dataset_path: json "
                        "and dataset_kwargs.data_files")
    data_files = _data_files(path, (data.get("dataset_kwargs") or {}).get("data_files"))
    if output_type == "multiple_choice" and data.get("doc_to_choice") is None:
        raise TaskError(f"{path}: doc_to_choice: required for output_type multiple_choice")
    for split_key in ("test_split", "fewshot_split"):
        split = data.get(split_key)
        if split is not None and split not in data_files:
            raise TaskError(f"{path}: {split_key}: split {split!r} has no data_files (known: {', '.join(data_files)})")
    metrics, metric_kwargs = _metrics(path, output_type, data.get("metric_list"))
    fewshot = data.get("fewshot_config") or {}
    sampler = fewshot.get("sampler", "default")
    if sampler not in ("default", "first_n"):
        raise TaskError(f"{path}: fewshot_config.sampler: {sampler!r} is not one of default, first_n")
    fewshot_delimiter = data.get("fewshot_delimiter", "\n\n")
    gen = dict(data.get("generation_kwargs") or {})
    until = gen.get("until", [fewshot_delimiter])
    until = [until] if isinstance(until, str) else list(until)
    max_gen = gen.get("max_gen_toks", gen.get("max_new_tokens", DEFAULT_MAX_GEN_TOKS))
    if not isinstance(max_gen, int) or max_gen < 1:
        raise TaskError(f"{path}: generation_kwargs.max_gen_toks: expected a positive integer, got {max_gen!r}")
    if gen.get("do_sample") or gen.get("temperature", 0):
        raise TaskError(f"{path}: generation_kwargs: raylm eval decodes greedily (do_sample: false, temperature: 0)")
    num_fewshot = data.get("num_fewshot") or 0
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise TaskError(f"{path}: num_fewshot: expected a non-negative integer, got {num_fewshot!r}")
    task = Task(
        name=str(data["task"]), path=path, output_type=output_type, data_files=data_files,
        test_split=data["test_split"], fewshot_split=data.get("fewshot_split"),
        doc_to_text=data.get("doc_to_text"), doc_to_target=data.get("doc_to_target"),
        doc_to_choice=data.get("doc_to_choice"), description=data.get("description") or "",
        target_delimiter=data.get("target_delimiter", " "), fewshot_delimiter=fewshot_delimiter,
        num_fewshot=num_fewshot, sampler=sampler, metrics=metrics, metric_kwargs=metric_kwargs,
        until=until, max_gen_toks=max_gen, fewshot_seed=fewshot_seed, limit=limit,
    )
    if validate:
        task.validate()
    return task


def _metrics(path: Path, output_type: str, metric_list: Any) -> tuple[list[str], dict[str, dict]]:
    known = {"multiple_choice": MC_METRICS, "generate_until": GENERATIVE_METRICS,
             "loglikelihood_rolling": ROLLING_METRICS}[output_type]
    if metric_list is None:
        return list(known), {}
    if not isinstance(metric_list, list):
        raise TaskError(f"{path}: metric_list: expected a list of {{metric: NAME}}")
    names, kwargs = [], {}
    for i, entry in enumerate(metric_list):
        if not isinstance(entry, dict) or "metric" not in entry:
            raise TaskError(f"{path}: metric_list[{i}]: expected a mapping with a 'metric' key")
        name = {"rougeL": "rouge_l", "rouge": "rouge_l"}.get(entry["metric"], entry["metric"])
        if name not in known:
            raise TaskError(f"{path}: metric_list[{i}].metric: {entry['metric']!r} is not computed for "
                            f"{output_type} (known: {', '.join(known)})")
        names.append(name)
        kwargs[name] = {k: v for k, v in entry.items() if k in ("ignore_case", "ignore_punctuation", "regexes_to_ignore")}
    return names, kwargs


def result_key(ref, task: Task) -> str:
    """The task's name, with its shot count when the config's task reference ``ref`` (``num_fewshot``)
    overrides the YAML's."""
    return task.name if ref.num_fewshot is None else f"{task.name}_{ref.num_fewshot}shot"
